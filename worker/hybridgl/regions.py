"""Steps 2 and 3: two views per mask and the hybrid global-local region feature."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .clip_ops import bilinear_taps, image_embedding, run_block, visual_tokens
from .errors import SettingsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def view_normalization(normalization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, local background) as (3,) tensors, background in normalized units.

    As released, both views use ImageNet statistics and the local background is CLIP's mean
    vector placed directly in normalized units (raw RGB about 152, 142, 127).
    """
    if normalization == "imagenet":
        return torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD), torch.tensor(CLIP_MEAN)
    if normalization == "clip":
        return torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD), torch.zeros(3)
    raise SettingsError(f"unknown normalization {normalization!r}")


class ViewBuilder:
    """Global and local 224x224 views of every mask of one image.

    Views are composed from the 4 bilinear taps of each output pixel, which is the same arithmetic
    as composing at full resolution and resizing (``compose_views_full`` does it that way; tests
    compare them), at a cost that does not grow with the image size.
    """

    def __init__(self, image: np.ndarray, size: int = 224, blur_kernel: int = 15, normalization: str = "imagenet"):
        h, w = image.shape[:2]
        self.size = size
        mean, std, self.background = view_normalization(normalization)
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)
        blurred = cv2.GaussianBlur(image, (blur_kernel, blur_kernel), 0)
        self.yi0, self.yi1, self.yw0, self.yw1 = bilinear_taps(h, size)
        self.xi0, self.xi1, self.xw0, self.xw1 = bilinear_taps(w, size)
        # Normalized sharp and blurred images, sampled at the taps: (2 rows, 2 cols, 3, S, S).
        self.sharp = self._taps(self._normalize(image))
        self.blurred = self._taps(self._normalize(blurred))

    def _normalize(self, rgb: np.ndarray) -> torch.Tensor:
        t = torch.tensor(rgb).permute(2, 0, 1).float() / 255.0
        return (t - self.mean) / self.std

    def _taps(self, t: torch.Tensor) -> torch.Tensor:
        rows = [t[..., yi, :] for yi in (self.yi0, self.yi1)]
        return torch.stack([torch.stack([r[..., xi] for xi in (self.xi0, self.xi1)]) for r in rows])

    def _mask_taps(self, masks: torch.Tensor) -> torch.Tensor:
        rows = [masks[:, yi, :] for yi in (self.yi0, self.yi1)]
        # (N, 2, 2, 1, S, S) bool
        return torch.stack([torch.stack([r[..., xi] for xi in (self.xi0, self.xi1)], 1) for r in rows], 1)[:, :, :, None]

    def _combine(self, taps: torch.Tensor) -> torch.Tensor:
        """Bilinear weights over taps (N, 2, 2, 3, S, S) -> (N, 3, S, S), in PyTorch's order."""
        yw0, yw1 = self.yw0.view(-1, 1), self.yw1.view(-1, 1)
        xw0, xw1 = self.xw0.view(1, -1), self.xw1.view(1, -1)
        return yw0 * (xw0 * taps[:, 0, 0] + xw1 * taps[:, 0, 1]) + yw1 * (xw0 * taps[:, 1, 0] + xw1 * taps[:, 1, 1])

    def views(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local, global) views, each (N, 3, S, S) float32, for boolean masks (N, H, W)."""
        m = self._mask_taps(masks)
        local = torch.where(m, self.sharp, self.background.view(3, 1, 1))
        global_ = torch.where(m, self.sharp, self.blurred)
        return self._combine(local), self._combine(global_)


def compose_views_full(image: np.ndarray, masks: torch.Tensor, size: int = 224, blur_kernel: int = 15,
                       normalization: str = "imagenet") -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way, as released: compose each view at full resolution, then resize.

    Kept as the reference for tests and the benchmark baseline.
    """
    mean, std, background = view_normalization(normalization)
    mean, std = mean.view(3, 1, 1), std.view(3, 1, 1)
    blurred = cv2.GaussianBlur(image, (blur_kernel, blur_kernel), 0)
    sharp_n = (torch.tensor(image).permute(2, 0, 1).float() / 255.0 - mean) / std
    locals_, globals_ = [], []
    for mask in masks:
        g = np.where(mask.numpy()[:, :, None], image, blurred)  # uint8 composition, as released
        g = (torch.from_numpy(g).permute(2, 0, 1).float() / 255.0 - mean) / std
        loc = torch.where(mask[None], sharp_n, background.view(3, 1, 1))
        both = torch.stack([loc, g])
        both = F.interpolate(both, (size, size), mode="bilinear", align_corners=False, antialias=False)
        locals_.append(both[0])
        globals_.append(both[1])
    return torch.stack(locals_), torch.stack(globals_)


def mask_weights(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """m of HYBRIDGL.md step 3: each mask bilinearly resized to the patch grid, row-major (N, grid^2).

    ``antialias=False`` explicitly: torchvision-style antialiasing changes most choices.
    """
    h, w = masks.shape[-2:]
    yi0, yi1, yw0, yw1 = bilinear_taps(h, grid)
    xi0, xi1, xw0, xw1 = bilinear_taps(w, grid)
    m = masks.float()
    r0, r1 = m[:, yi0], m[:, yi1]
    out = yw0.view(-1, 1) * (xw0 * r0[..., xi0] + xw1 * r0[..., xi1]) + \
        yw1.view(-1, 1) * (xw0 * r1[..., xi0] + xw1 * r1[..., xi1])
    return out.reshape(len(masks), -1)


@torch.inference_mode()
def hybrid_features(visual, local_views: torch.Tensor, global_views: torch.Tensor, weights: torch.Tensor,
                    masking_block: int = 9, fusion_weight: float = 2.0,
                    dtype: torch.dtype = torch.float32, batch: int = 64) -> torch.Tensor:
    """Hybrid G2L region features f_i (N, D), L2-normalized, for N masks.

    Blocks before ``masking_block`` run on local and global views independently; from there the
    global stream's class token may only attend to patches inside the mask, and the local stream
    receives ``fusion_weight`` x the mask-weighted global tokens at the start of every fused block.
    """
    device = next(visual.parameters()).device
    outs = []
    for start in range(0, len(local_views), batch):
        sl = slice(start, start + batch)
        outs.append(_hybrid_batch(visual, local_views[sl].to(device), global_views[sl].to(device),
                                  weights[sl].to(device), masking_block, fusion_weight, dtype))
    return torch.cat(outs) if outs else torch.zeros((0, visual.output_dim))


@torch.inference_mode()
def plain_hybrid_features(visual, local_views: torch.Tensor, global_views: torch.Tensor, weights: torch.Tensor,
                          masking_block: int = 9, fusion_weight: float = 2.0) -> torch.Tensor:
    """Step 3 transcribed plainly with open_clip's own blocks and a per-head float mask, every block
    run in full: the reference for tests and the benchmark's baseline."""
    heads = visual.transformer.resblocks[0].attn.num_heads
    n = len(local_views)
    x = visual_tokens(visual, torch.cat([local_views, global_views]))
    for block in visual.transformer.resblocks[:masking_block]:
        x = block(x)
    loc, glob = x[:n], x[n:]
    length = glob.shape[1]
    mask = torch.zeros(n, length, length)
    mask[:, 0, 1:][weights <= 0] = float("-inf")
    mask = mask.repeat_interleave(heads, dim=0)
    w = torch.cat([torch.ones(n, 1), weights], dim=1)[..., None]
    for block in visual.transformer.resblocks[masking_block:]:
        g_hat = glob * w
        glob_next = block(glob, attn_mask=mask)
        loc = block(loc + fusion_weight * g_hat)
        glob = glob_next
    return F.normalize(image_embedding(visual, loc[:, 0]), dim=-1)


def _hybrid_batch(visual, local_views, global_views, weights, masking_block, fusion_weight, dtype):
    n = len(local_views)
    blocks = visual.transformer.resblocks
    autocast = torch.autocast(local_views.device.type, dtype=dtype, enabled=dtype != torch.float32)
    fuse = masking_block < len(blocks)
    with autocast:
        # Without fusion the feature is the local view's plain image feature: no global stream.
        x = visual_tokens(visual, torch.cat([local_views, global_views]) if fuse else local_views)
        for block in blocks[:masking_block]:
            x = run_block(block, x)
        loc, glob = x[:n], x[n:]
        if fuse:
            # Additive bias on the class-token query row only: -inf for patches outside the mask.
            length = glob.shape[1]
            bias = torch.zeros((n, 1, length, length), device=x.device, dtype=torch.float32)
            bias[:, 0, 0, 1:] = torch.where(weights > 0, 0.0, float("-inf"))
            token_w = torch.cat([torch.ones((n, 1), device=x.device), weights], dim=1)[..., None]
            fused = blocks[masking_block:]
            for i, block in enumerate(fused):
                last = i == len(fused) - 1
                g_hat = glob * token_w.to(glob.dtype)
                if not last:  # the global stream's output of the last block is never read
                    glob = run_block(block, glob, attn_bias=bias)
                loc = run_block(block, loc + fusion_weight * g_hat, cls_only=last)
    feats = image_embedding(visual, loc[:, 0].float())
    return F.normalize(feats, dim=-1)
