"""Ground-truth masks of the benchmarks: COCO segmentations (REFER) with pycocotools, PhraseCut
polygons as its own code draws them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from worker.evaluate import EvaluateError


def coco_polygon_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """One COCO polygon ``[x1, y1, x2, y2, ...]`` as an (H, W) bool mask: pycocotools'
    ``frPyObjects`` + ``decode``. An integer rectangle ``x0, y0, x1, y0, x1, y1, x0, y1`` covers
    exactly columns x0..x1-1 and rows y0..y1-1."""
    from pycocotools import mask as coco_mask

    h, w = int(height), int(width)
    xy = [float(v) for v in np.asarray(polygon, dtype=np.float64).ravel()]
    if len(xy) < 2 or h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    if len(xy) < 6:  # pycocotools reads a polygon of under 3 points as a box: repeat its last vertex
        xy += xy[-2:] * ((6 - len(xy)) // 2)
    return coco_mask.decode(coco_mask.frPyObjects([xy], h, w))[:, :, 0].astype(bool)


def _compressed_rle_total(s: str | bytes) -> int:
    """The pixel count of COCO's compressed RLE string: the sum of its counts (the decoding rule of
    ``rleFrString`` in cocoapi's maskApi.c). pycocotools 2.0.11 decodes a string whose counts fall
    short of H x W into uninitialised memory without a word, so the total is checked here first; this
    is the only part of cocoapi we read ourselves."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = k = 0
        more = True
        while more:
            if p >= len(data):
                raise EvaluateError("truncated compressed RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x % (1 << 32))  # stored as uint in C
    return sum(counts)


def coco_segmentation_mask(segmentation: Any, height: int, width: int, overlap: str = "union") -> np.ndarray:
    """A COCO ``segmentation`` at the image's size: a list of polygons (``overlap``: ``union``, or
    ``single`` = pixels covered by exactly one polygon), or an RLE dict ``{"size": [h, w], "counts":
    [...] or "compressed string"}``."""
    from pycocotools import mask as coco_mask

    h, w = int(height), int(width)
    if isinstance(segmentation, list):
        cover = np.zeros((h, w), dtype=np.int32)
        for polygon in segmentation:
            cover += coco_polygon_mask(polygon, h, w)
        return cover == 1 if overlap == "single" else cover >= 1
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size")
        if size is not None and (int(size[0]), int(size[1])) != (h, w):
            raise EvaluateError(f"RLE segmentation is {size[0]}x{size[1]}, the image {h}x{w}")
        counts = segmentation["counts"]
        if isinstance(counts, (str, bytes)):
            total = _compressed_rle_total(counts)
            rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            values = np.asarray(counts, dtype=np.int64)
            total = -1 if (values < 0).any() else int(values.sum())
            rle = coco_mask.frPyObjects({"size": [h, w], "counts": [int(v) for v in values]}, h, w)
        if total != h * w:
            raise EvaluateError(f"RLE counts sum to {total}, not {h}x{w} = {h * w} pixels")
        return coco_mask.decode(rle).astype(bool)
    raise EvaluateError(f"unsupported COCO segmentation {type(segmentation).__name__}: expected a list of "
                        "polygons or an RLE dict with 'counts'")


def phrasecut_mask(polygons: Iterable[Sequence[Sequence[float]]], height: int, width: int) -> np.ndarray:
    """PhraseCut's ground truth, as its ``utils/data_transfer.polygons_to_mask``: every polygon
    (a list of [x, y]) with at least 2 points, vertices truncated with ``int()``, drawn with PIL's
    ``ImageDraw.polygon(outline=1, fill=1)`` (boundary pixels included), union."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(image)
    for polygon in polygons:
        if len(polygon) < 2:
            continue
        draw.polygon([(int(x), int(y)) for x, y in polygon], outline=1, fill=1)
    return np.asarray(image) > 0
