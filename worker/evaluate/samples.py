"""A sentence to evaluate (``Sample``), its ground truth and its image, whatever the dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.evaluate.masks import coco_segmentation_mask, phrasecut_mask


@dataclass(frozen=True)
class Sample:
    """One sentence to evaluate."""
    key: str                    # unique in the split: REFER sent_id, PhraseCut task_id (as a string)
    image: str                  # image file name (written to results)
    image_path: Path
    image_id: Any
    expression: str
    gt_key: str                 # ground truths shared by sentences of one object are built once
    gt_kind: str                # "coco" | "phrasecut"
    gt_source: Any = field(repr=False)  # COCO segmentation, or PhraseCut's flat list of polygons
    size: tuple[int, int] | None = None  # (H, W) the annotations state
    meta: dict = field(default_factory=dict)


def ground_truth(sample: Sample, height: int, width: int, overlap: str = "union") -> np.ndarray:
    if sample.gt_kind == "coco":
        return coco_segmentation_mask(sample.gt_source, height, width, overlap)
    return phrasecut_mask(sample.gt_source, height, width)


def load_rgb(path: Path) -> np.ndarray:
    """The image as stored (uint8 RGB), EXIF orientation NOT applied: the annotations (and the
    authors' cv2.imread) use the stored pixel grid."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} does not exist (check --images)")
    with Image.open(path) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
