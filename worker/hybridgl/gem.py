"""Step 5b: GEM ("Grounding Everything", Bousselham et al. CVPR 2024) on the same CLIP model.

Our own implementation on open_clip 3.x's blocks (the ``gem_torch`` package assumes an older
token layout). The image half (patch features) is computed once per image; the heat map for a
phrase is text-side work.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .clip_ops import image_embedding, merge_heads, qkv, run_block, visual_tokens
from .regions import CLIP_MEAN, CLIP_STD


def gem_input(image: np.ndarray, size: int = 448) -> torch.Tensor:
    """The original image resized with PIL bicubic to size x size, /255, CLIP mean/std: (1, 3, S, S)."""
    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    t = torch.tensor(np.asarray(resized)).permute(2, 0, 1).float() / 255.0
    t = (t - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    return t[None]


def resample_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Class position kept, the square patch grid resampled bicubically (antialias=True, as GEM)."""
    cls, patches = pos[:1], pos[1:]
    old = int(round(patches.shape[0] ** 0.5))
    if old == grid:
        return pos
    p = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([cls, p.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def _self_self(z: torch.Tensor, inv_temp: torch.Tensor, iters: int) -> torch.Tensor:
    """a_z of GEM: ``iters`` rounds of z <- softmax(n(z) n(z)^T t) n(z), then the attention itself."""
    for _ in range(iters):
        zn = F.normalize(z, dim=-1)
        z = torch.softmax(zn @ zn.transpose(-1, -2) * inv_temp, dim=-1) @ zn
    zn = F.normalize(z, dim=-1)
    return torch.softmax(zn @ zn.transpose(-1, -2) * inv_temp, dim=-1)


@torch.inference_mode()
def gem_patch_features(visual, image: np.ndarray, size: int = 448, gem_blocks: int = 6, ss_iters: int = 1,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2-normalized GEM patch features (grid*grid, D), row-major."""
    device = next(visual.parameters()).device
    patch = visual.conv1.kernel_size[0]
    grid = size // patch
    pos = resample_positional_embedding(visual.positional_embedding.float(), grid)
    blocks = visual.transformer.resblocks
    first_gem = len(blocks) - gem_blocks
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        x = visual_tokens(visual, gem_input(image, size).to(device), pos.to(device))
        x_gem = None
        for i, block in enumerate(blocks):
            if i == first_gem:
                x_gem = x
            if i >= first_gem:
                y = block.ln_1(x)
                q, k, v = qkv(block, y)
                head_dim = q.shape[-1]
                inv_temp = y.float().norm(dim=-1).mean() * head_dim ** -0.5
                out = sum(_self_self(z.float(), inv_temp, ss_iters) @ v.float() for z in (v, k, q)) / 3.0
                out = F.linear(merge_heads(out).to(x.dtype), block.attn.out_proj.weight, block.attn.out_proj.bias)
                x_gem = x_gem + out
            if i < len(blocks) - 1 or x_gem is None:
                x = run_block(block, x)  # the ordinary path; its last output is never read
    feats = image_embedding(visual, x_gem[0, 1:].float())
    return F.normalize(feats, dim=-1)


def heat_map(patch_features: torch.Tensor, text_feature: torch.Tensor, out_hw: tuple[int, int],
             size: int = 448) -> torch.Tensor | None:
    """Normalized heat map A (H, W) for one normalized text feature; None when it is constant."""
    grid = int(round(patch_features.shape[0] ** 0.5))
    sim = (patch_features.float() @ text_feature.float()).reshape(1, 1, grid, grid)
    if not sim.max() > sim.min():  # constant: interpolation would only stretch rounding noise
        return None
    a = F.interpolate(sim, (size, size), mode="bilinear", align_corners=False, antialias=False)
    a = _min_max(a)
    if a is None:
        return None
    a = F.interpolate(a, out_hw, mode="bilinear", align_corners=False, antialias=True)
    a = _min_max(a)
    return None if a is None else a[0, 0]


def _min_max(a: torch.Tensor) -> torch.Tensor | None:
    lo, hi = a.min(), a.max()
    if not hi > lo:
        return None
    return (a - lo) / (hi - lo)
