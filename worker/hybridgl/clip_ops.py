"""Pieces of open_clip's ViT run by hand, so that the method can reach inside the model.

Each function computes what the corresponding open_clip module computes (tests compare them),
with the extra hooks HybridGL and GEM need: an additive attention bias, per-head q/k/v, and
text encoding truncated at the end-of-text token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visual_tokens(visual, images: torch.Tensor, pos_embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Patch embedding + class token + positional embedding + ln_pre: the input of block 0."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + (visual.positional_embedding if pos_embedding is None else pos_embedding).to(x.dtype)
    return visual.ln_pre(x)


def qkv(block, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v (B, heads, L, head_dim) of ``y`` (already through ln_1)."""
    attn = block.attn
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, n, _ = y.shape
    split = lambda t: t.reshape(b, n, attn.num_heads, -1).transpose(1, 2)  # noqa: E731
    return split(q), split(k), split(v)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def run_block(block, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
              cls_only: bool = False) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock on (B, L, C) tokens.

    ``attn_bias`` is added to the attention logits (broadcast over heads; -inf blocks a key).
    ``cls_only`` computes only the class token's output (all keys still attend), for the last
    block where nothing else is read.
    """
    attn = block.attn
    q, k, v = qkv(block, block.ln_1(x))
    residual = x
    if cls_only:
        q, residual = q[:, :, :1], x[:, :1]
        if attn_bias is not None:
            attn_bias = attn_bias[..., :1, :]
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
    out = F.linear(merge_heads(out), attn.out_proj.weight, attn.out_proj.bias)
    x = residual + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def image_embedding(visual, tokens_cls: torch.Tensor) -> torch.Tensor:
    """Class-token state after the last block -> unnormalized image embedding."""
    x = visual.ln_post(tokens_cls)
    return x @ visual.proj if visual.proj is not None else x


@torch.inference_mode()
def encode_text_raw(model, tokens: torch.Tensor) -> torch.Tensor:
    """E(x) of HYBRIDGL.md: EOT token -> ln_final -> text_projection, not normalized.

    CLIP's text tower is causal, so the end-of-text token never sees what follows it: running
    only up to the longest EOT position gives the same features for a fraction of the work.
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    t = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype() if hasattr(model.transformer, "get_cast_dtype") else torch.float32
    x = model.token_embedding(t).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    proj = model.text_projection
    if isinstance(proj, torch.nn.Linear):
        return proj(x)
    return x @ proj if proj is not None else x


def bilinear_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of ``F.interpolate(mode='bilinear', align_corners=False,
    antialias=False)`` along one axis: out[i] = w0[i]*in[i0[i]] + w1[i]*in[i1[i]].

    Resizing a composed view equals composing its 4 sampled taps per output pixel, which lets
    views be built at 224x224 without composing full-resolution images per mask.
    """
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = src - i0.float()
    w0 = 1.0 - w1
    return i0, i1, w0, w1
