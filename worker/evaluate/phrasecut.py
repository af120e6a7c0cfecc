"""The PhraseCut format: ``refer_<split>.json`` + Visual Genome images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.evaluate import EvaluateError
from worker.evaluate.samples import Sample


def load_phrasecut(data_dir: Path, split: str, images: Path | None = None) -> list[Sample]:
    """PhraseCut's ``refer_<split>.json``: a list of tasks, of which this reads ``task_id``,
    ``image_id``, ``phrase`` and ``Polygons`` (per instance a list of polygons, each a list of
    [x, y]); the ground truth is the union of every polygon of every instance (``phrasecut_mask``),
    at the image's size. The image is ``<images>/<image_id>.jpg`` (default images folder:
    ``<data_dir>/images``). Samples grouped by image, images in order of first appearance."""
    path = Path(data_dir) / f"refer_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --data-dir is the VGPhraseCut_v0 folder holding "
                                f"refer_{split}.json (see the README for where to get it)")
    images = Path(images) if images is not None else Path(data_dir) / "images"
    with open(path, encoding="utf-8") as f:
        tasks = json.load(f)
    by_image: dict[Any, list[Sample]] = {}
    seen: set[str] = set()
    for task in tasks:
        key = str(task["task_id"])
        if key in seen:
            raise EvaluateError(f"task id {key} appears twice in {path}")
        seen.add(key)
        polygons = [polygon for instance in task["Polygons"] for polygon in instance]
        name = f"{task['image_id']}.jpg"
        by_image.setdefault(task["image_id"], []).append(Sample(
            key=key, image=name, image_path=images / name, image_id=task["image_id"],
            expression=str(task["phrase"]), gt_key=f"task:{key}", gt_kind="phrasecut", gt_source=polygons,
            meta={"task_id": task["task_id"]}))
    return [s for group in by_image.values() for s in group]
