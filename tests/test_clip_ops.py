"""The hand-run pieces of CLIP against open_clip's own modules and straightforward references.

Random weights: these check arithmetic and plumbing, not accuracy.
"""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker.hybridgl.clip_ops import encode_text_raw, run_block, visual_tokens
from worker.hybridgl.gem import gem_input, gem_patch_features, resample_positional_embedding
from worker.hybridgl.regions import (
    ViewBuilder,
    compose_views_full,
    hybrid_features,
    mask_weights,
    plain_hybrid_features,
)

from pathlib import Path

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.CLIPVisionCfg(layers=4, width=96, patch_size=16, image_size=224, head_width=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
    )
    return model.eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.open(DATA / "dog.jpg").convert("RGB"))


def _masks(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([
        (xx < w // 3),
        ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 4) ** 2,
        (yy > h - 20) & (xx > w - 30),  # small: may give all-zero patch weights
        torch.zeros(h, w, dtype=torch.bool).index_put_((torch.tensor([5]), torch.tensor([7])), torch.tensor(True)),
    ])


def test_run_block_equals_open_clip_block(clip):
    torch.manual_seed(1)
    x = torch.randn(3, 197, 96)
    block = clip.visual.transformer.resblocks[0]
    torch.testing.assert_close(run_block(block, x), block(x), atol=1e-5, rtol=1e-5)
    bias = torch.zeros(3, 1, 197, 197)
    bias[:, 0, 0, 50:] = float("-inf")
    reference = block(x, attn_mask=bias.expand(3, 3, 197, 197).reshape(9, 197, 197))
    torch.testing.assert_close(run_block(block, x, attn_bias=bias), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_block(block, x, attn_bias=bias, cls_only=True), reference[:, :1], atol=1e-5, rtol=1e-5)


def test_open_clip_boolean_mask_trap(clip):
    """Why we pass a float -inf bias: open_clip's block turns a boolean mask into 0/1 floats,
    which masks nothing. If this ever changes upstream the test tells us."""
    torch.manual_seed(2)
    x = torch.randn(1, 197, 96)
    block = clip.visual.transformer.resblocks[0]
    blocked = torch.zeros(197, 197, dtype=torch.bool)
    blocked[0, 1:] = True  # "block" every patch for the CLS query
    bias = torch.zeros(1, 1, 197, 197)
    bias[0, 0, 0, 1:] = float("-inf")
    assert not torch.allclose(block(x, attn_mask=blocked)[:, 0], run_block(block, x, attn_bias=bias)[:, 0], atol=1e-3)


def test_encode_text_raw_equals_open_clip(clip):
    tok = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    tokens = tok(["the man in the white shirt on the left", "dog", "a photo of a the man."])
    torch.testing.assert_close(encode_text_raw(clip, tokens), clip.encode_text(tokens, normalize=False),
                               atol=1e-5, rtol=1e-5)


def test_mask_weights_equal_interpolate(photo):
    masks = _masks(*photo.shape[:2])
    expected = F.interpolate(masks[:, None].float(), (14, 14), mode="bilinear", align_corners=False,
                             antialias=False)[:, 0].reshape(len(masks), -1)
    torch.testing.assert_close(mask_weights(masks, 14), expected, atol=1e-6, rtol=0)
    antialiased = F.interpolate(masks[:, None].float(), (14, 14), mode="bilinear", align_corners=False,
                                antialias=True)[:, 0].reshape(len(masks), -1)
    assert not torch.allclose(mask_weights(masks, 14), antialiased, atol=1e-3)


@pytest.mark.parametrize("normalization", ["imagenet", "clip"])
def test_views_from_taps_equal_full_resolution_composition(photo, normalization):
    masks = _masks(*photo.shape[:2])
    local, global_ = ViewBuilder(photo, normalization=normalization).views(masks)
    ref_local, ref_global = compose_views_full(photo, masks, normalization=normalization)
    torch.testing.assert_close(local, ref_local, atol=2e-5, rtol=0)
    torch.testing.assert_close(global_, ref_global, atol=2e-5, rtol=0)
    # The local background is CLIP's mean placed in normalized units (imagenet) or 0 (clip).
    expected_bg = torch.tensor([0.48145466, 0.4578275, 0.40821073]) if normalization == "imagenet" else torch.zeros(3)
    torch.testing.assert_close(local[3, :, 100, 100], expected_bg)


@pytest.mark.parametrize("masking_block", [2, 3, 4])
def test_hybrid_features_equal_reference(clip, photo, masking_block):
    masks = _masks(*photo.shape[:2])
    local, global_ = ViewBuilder(photo).views(masks)
    m = mask_weights(masks, 14)
    assert (m[2:] == 0).all(dim=1).any(), "the fixture should include a mask with m == 0 everywhere"
    expected = plain_hybrid_features(clip.visual, local, global_, m, masking_block, 2.0)
    got = hybrid_features(clip.visual, local, global_, m, masking_block, 2.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_no_fusion_is_the_local_views_image_feature(clip, photo):
    masks = _masks(*photo.shape[:2])
    local, global_ = ViewBuilder(photo).views(masks)
    got = hybrid_features(clip.visual, local, global_, mask_weights(masks, 14), masking_block=4)
    with torch.inference_mode():
        expected = F.normalize(clip.encode_image(local), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _reference_gem(visual, image, size, gem_blocks, ss_iters):
    """HYBRIDGL.md step 5b transcribed naively, per head, with the block's MultiheadAttention weights."""
    grid = size // 16
    pos = visual.positional_embedding
    cls_pos, patch_pos = pos[:1], pos[1:]
    old = int(patch_pos.shape[0] ** 0.5)
    patch_pos = F.interpolate(patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2), size=(grid, grid),
                              mode="bicubic", align_corners=False, antialias=True)
    pos = torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)])
    x = visual_tokens(visual, gem_input(image, size), pos)
    blocks = visual.transformer.resblocks
    x_gem = None
    for i, block in enumerate(blocks):
        if i == len(blocks) - gem_blocks:
            x_gem = x.clone()
        if x_gem is not None:
            y = block.ln_1(x)[0]
            attn = block.attn
            heads = attn.num_heads
            q, k, v = (y @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
            hd = q.shape[-1] // heads
            inv_temp = y.norm(dim=-1).mean() * hd ** -0.5
            outs = []
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                vh = v[:, sl]
                acc = 0
                for z in (v[:, sl], k[:, sl], q[:, sl]):
                    for _ in range(ss_iters):
                        zn = z / z.norm(dim=-1, keepdim=True)
                        z = torch.softmax(zn @ zn.T * inv_temp, dim=-1) @ zn
                    zn = z / z.norm(dim=-1, keepdim=True)
                    acc = acc + torch.softmax(zn @ zn.T * inv_temp, dim=-1) @ vh
                outs.append(acc / 3)
            out = torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
            x_gem = x_gem + out[None]
        x = block(x)
    feats = visual.ln_post(x_gem[0, 1:]) @ visual.proj
    return F.normalize(feats, dim=-1)


def test_gem_patch_features_equal_reference(clip, photo):
    with torch.inference_mode():
        expected = _reference_gem(clip.visual, photo, 448, 2, 1)
    got = gem_patch_features(clip.visual, photo, 448, gem_blocks=2, ss_iters=1)
    assert got.shape == (28 * 28, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_positional_embedding_resampling_keeps_cls(clip):
    pos = clip.visual.positional_embedding.detach()
    out = resample_positional_embedding(pos, 28)
    assert out.shape == (1 + 28 * 28, pos.shape[1])
    torch.testing.assert_close(out[0], pos[0])
