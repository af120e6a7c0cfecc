"""Steps 5 and 6: relationship guidance, coherence (GEM) scores, position prior, final choice.

Plain functions of small arrays, so each formula of HYBRIDGL.md can be checked by hand.
"""

from __future__ import annotations

import numpy as np
import torch


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def stable_top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values; equal values keep the lower index first."""
    return np.argsort(-values, kind="stable")[:k]


def relation_scores(relation: str, candidates: np.ndarray, references: np.ndarray, p: np.ndarray,
                    w: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Raw sums T_i = sum_j rel(i, j) for the candidates (before the softmax).

    ``boxes`` are (x, y, w, h); ``w`` holds the reference weights indexed by mask.
    """
    x, y, bw, bh = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    cx, cy, area = x + bw / 2, y + bh / 2, bw * bh
    i = candidates[:, None]
    j = references[None, :]
    pw = p[i] * w[j]
    if relation == "none":
        return p[candidates] * len(references)
    if relation == "within":
        ix = np.clip(np.minimum(x[i] + bw[i], x[j] + bw[j]) - np.maximum(x[i], x[j]), 0, None)
        iy = np.clip(np.minimum(y[i] + bh[i], y[j] + bh[j]) - np.maximum(y[i], y[j]), 0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(area[i] > 0, ix * iy / np.where(area[i] > 0, area[i], 1), 0.0)
        return (pw * share).sum(1)
    condition = {
        "left": cx[i] < cx[j], "right": cx[i] > cx[j],
        "up": cy[i] < cy[j], "down": cy[i] > cy[j],
        "big": area[i] > area[j], "small": area[i] < area[j],
    }[relation]
    return np.where(condition, pw, 0.0).sum(1)


def column_prior(direction: str, width: int, height: int, vertical: bool = False) -> torch.Tensor:
    """Prior over pixels for a direction word (H, W); up/down are flat unless ``vertical``."""
    if direction == "left":
        return torch.linspace(1, 0, width).expand(height, width)
    if direction == "right":
        return torch.linspace(0, 1, width).expand(height, width)
    if direction == "middle":
        half = width // 2
        return torch.cat([torch.linspace(0, 1, half), torch.linspace(1, 0, width - half)]).expand(height, width)
    if vertical and direction in ("up", "down"):
        ramp = torch.linspace(1, 0, height) if direction == "up" else torch.linspace(0, 1, height)
        return ramp[:, None].expand(height, width)
    return torch.ones(height, width)


def gem_scores(heat: torch.Tensor | None, masks: torch.Tensor, boxes: np.ndarray, pixel_area: np.ndarray,
               beta: float, indices: np.ndarray | None = None) -> np.ndarray:
    """gem_i = (2 - beta) mean(A in mask_i) - beta mean(A outside mask_i) for the given masks.

    ``heat`` is A after prior and mean-normalization; None = constant map, which scores 0.
    Empty and whole-image masks score -inf (the release gives NaN there, which argmax picks).
    Sums run inside each mask's box only: the rest of the mask is empty by definition.
    """
    indices = np.arange(len(masks)) if indices is None else indices
    out = np.zeros(len(indices))
    total_pixels = masks.shape[1] * masks.shape[2]
    total = float(heat.sum()) if heat is not None else 0.0
    for n, idx in enumerate(indices):
        inside_count = int(pixel_area[idx])
        if inside_count == 0 or inside_count == total_pixels:
            out[n] = -np.inf
            continue
        if heat is None:
            continue
        x, y, w, h = (int(v) for v in boxes[idx])
        crop = masks[idx, y:y + h + 1, x:x + w + 1]
        inside = float(heat[y:y + h + 1, x:x + w + 1][crop].sum())
        out[n] = (2 - beta) * inside / inside_count - beta * (total - inside) / (total_pixels - inside_count)
    return out


def normalized_heat(heat: torch.Tensor | None, prior: torch.Tensor) -> torch.Tensor | None:
    """A <- A * prior; A <- A / mean(A)."""
    if heat is None:
        return None
    a = heat * prior
    mean = a.mean()
    if not mean > 0:
        return None
    return a / mean


def first_argmax(values: np.ndarray) -> int:
    """Index of the first maximum (NaN never wins)."""
    v = np.where(np.isnan(values), -np.inf, values)
    return int(np.argmax(v))
