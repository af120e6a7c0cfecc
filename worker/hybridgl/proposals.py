"""Step 1: SAM automatic mask proposals.

This is segment-anything's ``SamAutomaticMaskGenerator`` algorithm, step for step and built from
its own utility functions, so the masks, their order and their boxes are the generator's (a test
compares both on real photos; another compares the decoder's logits bit for bit). What differs
changes no result:

- the mask decoder (``decode_point_prompts``) keeps the image embedding one image wide instead of
  copying it per point prompt, so the first two-way block's image side runs once per batch;
- masks below ``pred_iou_thresh`` are dropped *before* the decoder upscales their image tokens
  and before their logits are upsampled to the image size (the IoU prediction depends on
  neither), which saves most of SAM's post-processing time;
- masks stay boolean tensors throughout instead of going through RLE and back;
- survivors are upsampled a few at a time (``UPSAMPLE_BYTES``), so memory grows with the image's
  pixels times the masks kept, not times every mask SAM decoded.

It also returns the full-image SAM embedding, so that point prompts (interactive clicks) can
refine a mask later without running the image encoder again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms, box_area

from .errors import SettingsError

# HYBRIDGL.md step 1. Values not named are SAM's defaults.
PRESETS: dict[str, dict] = {
    "refcoco": dict(points_per_side=8, pred_iou_thresh=0.7, stability_score_thresh=0.7,
                    crop_n_layers=0, crop_n_points_downscale_factor=1, min_mask_region_area=800),
    "phrasecut": dict(points_per_side=64, pred_iou_thresh=0.86, stability_score_thresh=0.92,
                      crop_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=100),
}
UPSAMPLE_BYTES = 256 * 2**20  # float logits upsampled to image size at once (memory bound, not a result)
SAM_DEFAULTS = dict(stability_score_offset=1.0, box_nms_thresh=0.7, crop_overlap_ratio=512 / 1500,
                    crop_nms_thresh=0.7)


@dataclass
class Proposals:
    masks: torch.Tensor  # (N, H, W) bool, in the generator's output order
    boxes: np.ndarray  # (N, 4) float64 x, y, w, h (SAM's bbox: inclusive pixel indices)
    embedding: torch.Tensor | None  # (256, 64, 64) SAM embedding of the whole image
    input_size: tuple[int, int]  # size of the resized image the embedding saw (h, w)


class MaskProposer:
    """Automatic masks for one SAM model and one preset."""

    def __init__(self, sam, preset: str = "refcoco", points_per_batch: int = 64):
        if preset not in PRESETS:
            raise SettingsError(f"unknown SAM preset {preset!r}; choose one of {', '.join(PRESETS)}")
        self.sam = sam
        self.params = {**SAM_DEFAULTS, **PRESETS[preset]}
        self.points_per_batch = points_per_batch
        p = self.params
        self.point_grids = build_all_layer_point_grids(
            p["points_per_side"], p["crop_n_layers"], p["crop_n_points_downscale_factor"])
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> Proposals:
        """``image``: uint8 RGB (H, W, 3)."""
        p = self.params
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, p["crop_n_layers"], p["crop_overlap_ratio"])
        data = MaskData()
        embedding = None
        input_size = (0, 0)
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            crop_data, crop_embedding, crop_input_size = self._process_crop(image, crop_box, layer_idx, orig_size)
            if embedding is None:  # the first crop is the whole image
                embedding, input_size = crop_embedding, crop_input_size
            data.cat(crop_data)

        if len(crop_boxes) > 1 and len(data["iou_preds"]) > 0:
            # Prefer masks from smaller crops, as SAM does.
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(data["boxes"].float(), scores.to(data["boxes"].device),
                               torch.zeros_like(data["boxes"][:, 0]), iou_threshold=p["crop_nms_thresh"])
            data.filter(keep)

        masks = data["masks"] if "masks" in data._stats else torch.zeros((0, *orig_size), dtype=torch.bool)
        boxes = data["boxes"] if "boxes" in data._stats else torch.zeros((0, 4))
        if p["min_mask_region_area"] > 0 and len(masks) > 0:
            masks, boxes = self._remove_small_regions(masks, boxes, p["min_mask_region_area"],
                                                      max(p["box_nms_thresh"], p["crop_nms_thresh"]))
        boxes = boxes.cpu().double().numpy()
        xywh = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) \
            if len(boxes) else np.zeros((0, 4))
        return Proposals(masks=masks.cpu(), boxes=xywh, embedding=embedding, input_size=input_size)

    def _process_crop(self, image, crop_box, layer_idx, orig_size):
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        input_image = self.transform.apply_image(crop)
        input_tensor = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        input_size = tuple(input_tensor.shape[-2:])
        features = self.sam.image_encoder(self.sam.preprocess(input_tensor))

        points_for_image = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        data = MaskData()
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            data.cat(self._process_batch(points, features, crop_size, input_size, crop_box, orig_size))

        if len(data["iou_preds"]) > 0:
            keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                               torch.zeros_like(data["boxes"][:, 0]), iou_threshold=self.params["box_nms_thresh"])
            data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["iou_preds"]))])
        data["masks"] = uncrop_masks(data["masks"], crop_box, *orig_size)
        return data, features[0], input_size

    def _process_batch(self, points, features, crop_size, input_size, crop_box, orig_size):
        p = self.params
        sam = self.sam
        in_points = torch.as_tensor(self.transform.apply_coords(points, crop_size), device=self.device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=self.device)
        low_res, iou_preds, kept = decode_point_prompts(sam, features, in_points, in_labels, p["pred_iou_thresh"])
        data = MaskData(iou_preds=iou_preds.flatten(0, 1)[kept.flatten()],
                        points=torch.as_tensor(points.repeat(iou_preds.shape[1], axis=0))[kept.flatten().cpu()])
        # Only the survivors are upsampled: the same per-mask computation as SAM's predict_torch, a few
        # masks at a time so that the float logits at image size stay within UPSAMPLE_BYTES (a 12-megapixel
        # photo's 100 survivors would need 5 GB at once); only the boolean masks that pass are kept.
        chunk = max(1, UPSAMPLE_BYTES // (4 * crop_size[0] * crop_size[1]))
        masks, stability, passed = [], [], []
        for start in range(0, len(low_res), chunk):
            logits = sam.postprocess_masks(low_res[start:start + chunk, None], input_size, crop_size)[:, 0]
            score = calculate_stability_score(logits, sam.mask_threshold, p["stability_score_offset"])
            keep = score >= p["stability_score_thresh"] if p["stability_score_thresh"] > 0.0 else \
                torch.ones_like(score, dtype=torch.bool)
            masks.append(logits[keep] > sam.mask_threshold)
            stability.append(score[keep])
            passed.append(keep)
            del logits
        if passed:
            data.filter(torch.cat(passed))
            data["masks"], data["stability_score"] = torch.cat(masks), torch.cat(stability)
        else:
            data["masks"] = torch.zeros((0, *crop_size), dtype=torch.bool, device=low_res.device)
            data["stability_score"] = torch.zeros(0, device=low_res.device)
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_size[1], orig_size[0]])
        if not torch.all(keep):
            data.filter(keep)
        return data

    @staticmethod
    def _remove_small_regions(masks: torch.Tensor, boxes: torch.Tensor, min_area: int, nms_thresh: float):
        """SAM's ``postprocess_small_regions`` on boolean masks (no RLE round trip)."""
        new_masks, scores = [], []
        for mask in masks.cpu().numpy():
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(torch.as_tensor(mask))
            scores.append(float(not (changed_holes or changed_islands)))
        new_masks_t = torch.stack(new_masks)
        new_boxes = batched_mask_to_box(new_masks_t)
        keep = batched_nms(new_boxes.float(), torch.as_tensor(scores), torch.zeros_like(new_boxes[:, 0]),
                           iou_threshold=nms_thresh)
        boxes = boxes.clone().cpu()
        out_masks = masks.cpu().clone()
        for i in keep.tolist():
            if scores[i] == 0.0:  # SAM keeps a changed mask's recomputed box and mask
                out_masks[i] = new_masks_t[i]
                boxes[i] = new_boxes[i]
        return out_masks[keep], boxes[keep]


def decode_point_prompts(sam, features: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                         iou_thresh: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's mask decoder (``MaskDecoder.predict_masks``, multimask output) for a batch of single-point
    prompts on one image, computing only what the generator keeps.

    Returns (low-res logits (K, h, w) of the masks whose predicted IoU exceeds ``iou_thresh``, in
    prompt-major order; predicted IoUs (B, 3); which masks those are (B, 3) bool). Every kept value is
    the stock decoder's, bit for bit (tests compare), with two savings:

    - the stock decoder copies the image embedding, its positional encoding and the (mask-less, so
      shared) dense prompt embedding once per prompt; here they stay one image wide and broadcast,
      so the first two-way block's image-side projections run once instead of once per prompt (the
      image tokens only start to differ per prompt at the end of that block);
    - the upscaling of the image tokens and the mask product run only for the prompts that have a
      mask above ``iou_thresh``: the predicted IoU does not depend on them.
    """
    decoder = sam.mask_decoder
    sparse, dense = sam.prompt_encoder(points=(points[:, None, :], labels[:, None]), boxes=None, masks=None)
    # Without a mask prompt ``dense`` is one learned embedding expanded over the batch: the same for all.
    src = features + dense[:1]
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    # TwoWayTransformer broadcasts a one-image ``src`` against the batch of prompts: its first block's
    # image-side projections see one image, and the image tokens come out one per prompt.
    hs, keys = decoder.transformer(src, sam.prompt_encoder.get_dense_pe(), tokens)
    iou_preds = decoder.iou_prediction_head(hs[:, 0, :])[:, 1:]
    kept = iou_preds > iou_thresh if iou_thresh > 0.0 else torch.ones_like(iou_preds, dtype=torch.bool)
    prompts = kept.any(dim=1).nonzero()[:, 0]
    mask_tokens = hs[:, 1:1 + decoder.num_mask_tokens, :]
    hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                           dim=1)[prompts]
    c, (h, w) = src.shape[1], src.shape[-2:]
    upscaled = decoder.output_upscaling(keys[prompts].transpose(1, 2).view(len(prompts), c, h, w))
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, decoder.num_mask_tokens, h, w)[:, 1:]
    return masks[kept[prompts]], iou_preds, kept
