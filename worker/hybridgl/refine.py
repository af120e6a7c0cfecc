"""Point prompts on an indexed image: SAM refines a mask from clicks on the cached embedding."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from .errors import InputError
from .image_index import ImageIndex


@torch.inference_mode()
def refine_mask(sam, index: ImageIndex, points: np.ndarray, labels: np.ndarray,
                previous: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The mask SAM predicts for clicks ``points`` (K, 2) in pixels, ``labels`` 1 = include, 0 = exclude,
    and SAM's own estimate of its quality (predicted IoU).

    ``previous`` (H, W bool), the mask being corrected, adds its box as a prompt so that the
    clicks adjust that region instead of starting over. No image encoding: the index keeps the
    SAM embedding.
    """
    if index.sam_embedding is None or index.sam_input_size is None:
        raise InputError("this image index has no SAM embedding (it was built from user proposals): "
                         "clicks need SAM's own index")
    h, w = index.image_size
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = sam.device
    coords = torch.as_tensor(transform.apply_coords(points.astype(np.float64), (h, w)), dtype=torch.float32,
                             device=device)[None]
    point_labels = torch.as_tensor(labels, dtype=torch.int, device=device)[None]
    box = None
    if previous is not None and previous.any():
        ys, xs = np.nonzero(previous)
        box = torch.as_tensor(transform.apply_boxes(np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], float),
                                                    (h, w)), dtype=torch.float32, device=device)
    sparse, dense = sam.prompt_encoder(points=(coords, point_labels), boxes=box, masks=None)
    low_res, iou = sam.mask_decoder(image_embeddings=index.sam_embedding[None].to(device),
                                    image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                    dense_prompt_embeddings=dense, multimask_output=False)
    masks = sam.postprocess_masks(low_res, index.sam_input_size, (h, w))
    return (masks[0, 0] > sam.mask_threshold).cpu().numpy(), float(iou[0, 0])
