"""Masks -> Label Studio results (brush RLE, polygon, rectangle) and predictions.

Runs in the worker, but stays light: numpy here, cv2 imported inside the polygon function, no
torch, nothing from ``worker``.

Shapes are the ones Label Studio 1.23.2 renders (see DESIGN.md): brush RLE is made from a uint8
mask of 0/255 with ``label_studio_sdk.converter.brush.mask2rle`` (a 0/1 mask renders invisible);
coordinates are percent of the image width/height; ``original_width``/``original_height`` are the
mask's size, which must be the image's size.
"""

from __future__ import annotations

import secrets
import string
from typing import Any

import numpy as np

from backend.labeling import LabelingConfig, OutputTag

__all__ = ["region_results", "prediction", "mask_to_polygon", "mask_to_box", "new_region_id"]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_region_id() -> str:
    """A short random region id, like the 10-character ids Label Studio's editor makes."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def _as_mask(mask: Any) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a mask must be a non-empty 2-D array (height, width), "
                         f"got shape {array.shape}")
    return array != 0


def _label_list(tag: OutputTag, label: str | None) -> list[str]:
    if label is not None and label in tag.labels:
        return [label]
    if len(tag.labels) == 1:
        return [tag.labels[0]]
    return []


def region_results(mask: np.ndarray, label: str | None, config: LabelingConfig, *,
                   score: float | None = None, region_id: str | None = None) -> list[dict]:
    """One Label Studio result per output tag of ``config`` (config order) for one region.

    - ``mask``: 2-D (height, width), the image's size; nonzero pixels are the region.
    - An empty mask (no nonzero pixel) gives ``[]``: no result at all, rather than an invisible
      brush or a degenerate polygon/box.
    - Label: ``[label]`` when the tag has that label; otherwise (``label`` is None, or it belongs
      to another output tag only) the tag's label when it has exactly one, else an empty list,
      which Label Studio shows as a grey unlabelled region the annotator can label.
    - Ids: each result gets ``f"{region_id}-{tag.name}"`` (``region_id`` random when None): Label
      Studio merges results that share an id into one region, so a brush and a box of the same
      object must not share one.
    - ``score`` is set on every result when given (Label Studio shows it), omitted when None.
    """
    binary = _as_mask(mask)
    if not binary.any():
        return []
    height, width = binary.shape
    if region_id is None:
        region_id = new_region_id()

    results: list[dict] = []
    polygon: list[list[float]] | None = None
    box: tuple[float, float, float, float] | None = None
    for tag in config.outputs:
        labels = _label_list(tag, label)
        if tag.kind == "brush":
            from label_studio_sdk.converter.brush import mask2rle

            rle = mask2rle(binary.astype(np.uint8) * np.uint8(255))
            value: dict[str, Any] = {"format": "rle", "rle": [int(v) for v in rle]}
        elif tag.kind == "polygon":
            if polygon is None:
                polygon = mask_to_polygon(binary)
            value = {"points": polygon, "closed": True}
        elif tag.kind == "rectangle":
            if box is None:
                box = mask_to_box(binary)
            x, y, w, h = box
            value = {"x": x, "y": y, "width": w, "height": h, "rotation": 0}
        else:  # pragma: no cover - labeling.py only makes the three kinds
            raise ValueError(f"unsupported output tag kind {tag.kind!r}")
        value[tag.result_type] = labels
        result: dict[str, Any] = {
            "id": f"{region_id}-{tag.name}",
            "type": tag.result_type,
            "from_name": tag.name,
            "to_name": tag.to_name,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": value,
        }
        if score is not None:
            result["score"] = float(score)
        results.append(result)
    return results


def prediction(results: list[dict], score: float, model_version: str) -> dict:
    """One entry of /predict's ``results``: ``{"result", "score", "model_version"}``."""
    return {"result": list(results), "score": float(score), "model_version": str(model_version)}


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0) -> list[list[float]]:
    """The largest outer contour of ``mask`` as ``[[x%, y%], ...]``; ``[]`` for an empty mask.

    The polygon runs along pixel edges, as the box does (a pixel ``(x, y)`` is the square
    ``[x, x+1] x [y, y+1]``), so polygon, box and brush cover the same pixels: with
    ``tolerance=0`` its area is the blob's pixel count and its bounds are the box. It is traced
    with ``cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_NONE)`` on the mask upscaled 2x (each
    pixel a 2x2 block, whose outer boundary pixels sit at ``2x`` and ``2x+1``), whose points
    ``u`` map to the edge ``(u + 1) // 2``; holes are not cut out. The largest contour by area
    (ties: more boundary points) is simplified with ``cv2.approxPolyDP(epsilon=tolerance)`` in
    pixels (0 keeps every corner); points are in percent of width/height.
    """
    import cv2

    binary = _as_mask(mask)
    height, width = binary.shape
    if not binary.any():
        return []
    doubled = np.ascontiguousarray(np.repeat(np.repeat(binary, 2, axis=0), 2, axis=1), dtype=np.uint8)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    largest = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    edges = (largest.reshape(-1, 2) + 1) // 2
    keep = np.any(edges != np.roll(edges, 1, axis=0), axis=1)  # drop repeats the mapping makes
    edges = edges[keep] if keep.any() else edges[:1]
    edges = edges.reshape(-1, 1, 2).astype(np.int32)
    points = cv2.approxPolyDP(edges, float(max(tolerance, 0.0)), True).reshape(-1, 2)
    if len(points) < 3 or cv2.contourArea(points.reshape(-1, 1, 2)) == 0:
        points = cv2.approxPolyDP(edges, 0.0, True).reshape(-1, 2)  # simplified away (a thin blob): every corner
    return [[float(x) * 100.0 / width, float(y) * 100.0 / height] for x, y in points]


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """``(x, y, width, height)`` in percent covering every nonzero pixel (the right/bottom edge is
    ``x_max + 1``/``y_max + 1``). Raises ValueError for an empty mask."""
    binary = _as_mask(mask)
    height, width = binary.shape
    ys, xs = np.nonzero(binary)
    if xs.size == 0:
        raise ValueError("an empty mask has no box")
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    return (x0 * 100.0 / width, y0 * 100.0 / height,
            (x1 - x0) * 100.0 / width, (y1 - y0) * 100.0 / height)
