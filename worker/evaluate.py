"""``hybridgl evaluate``: the paper's benchmarks, and what pre-labeling saves on a team's own data.

Two modes, one command:

**Benchmark** (``--dataset``): RefCOCO / RefCOCO+ (splitBy unc: val, testA, testB), RefCOCOg (umd:
val, test) and PhraseCut (test), as HYBRIDGL.md section 7 states the protocol. Every sentence counts.
Sentences are grouped by image and the image index (SAM proposals, region and GEM features) is built
once per image; each sentence is then ONE query whose result gives both answers: pure HybridGL
(``QueryResult.pure``: the argmax of ``s``) and the answer with spatial guidance
(``QueryResult.chosen``). Against the ground truth at the image's original resolution,
``I = |pred & gt|`` and ``U = |pred | gt|``; ``oIoU = 100 * sum(I) / sum(U)`` and
``mIoU = 100 * mean(I / U)`` (a sentence with ``U = 0`` counts 0), overall and per relation flag
(``explanation["relation"]``).

Files in ``--out``:

- ``results.jsonl``: one JSON line per sentence, appended and flushed as it is computed: ``key``
  (the sentence id as a string: REFER ``sent_id``, PhraseCut ``task_id``), ``image``, ``image_id``,
  ``expression``, ``I_pure``, ``U_pure``, ``I_final``, ``U_final``, ``gt_area``, ``relation``,
  ``direction``, ``proposals``, ``chosen``, ``pure`` (proposal indices; null when SAM found no
  region), ``error`` (null, or why the sentence got an empty answer), ``t`` (unix time written), and
  for REFER ``sent_id``, ``ref_id``, ``ann_id``.
  A later run with the same ``--out`` reads it and skips the sentences already there (resumable; a
  line cut short by an interruption is dropped and recomputed).
- ``run.json``: what the lines were computed with (dataset, split, splitBy, sentence field, ground
  truth rule, ``model_version``, every setting). A run whose dataset fields or model version differ
  refuses to append to the same folder.
- ``summary.json`` and ``summary.md``: recomputed from every line of ``results.jsonl`` at the end of
  each run (so a ``--limit`` run followed by a full run summarizes all sentences).

**Label Studio export** (``--labelstudio-export export.json``): no model, no torch. For each task of
a Label Studio JSON export, each prediction is compared with the task's submitted annotation, region
by region: IoU, share accepted unchanged, share corrected (and their IoU), predicted regions
deleted, regions added by annotators; per ``model_version``, per label, and both.

``add_arguments(parser)`` adds this command's options and imports nothing heavy; ``run(args)`` does
the work (the method's settings come from ``worker.cli.settings_from_args``: flags when the parser
has them, else ``HYBRIDGL_*`` variables, else defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("refcoco", "refcoco+", "refcocog", "phrasecut")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# The order relation flags are reported in (worker/hybridgl/language.py RELATIONS).
RELATION_ORDER = ("none", "left", "right", "up", "down", "big", "small", "within")

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
LS_SUMMARY_JSON = "labelstudio_summary.json"
LS_SUMMARY_MD = "labelstudio_summary.md"
LS_REGIONS = "labelstudio_regions.jsonl"


# =================================================================================================
# Command line
# =================================================================================================
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This command's own options (the method's settings flags are added by the caller)."""
    bench = parser.add_argument_group("benchmark (the paper's protocol, HYBRIDGL.md section 7)")
    bench.add_argument("--dataset", choices=DATASETS,
                       help="benchmark to run: refcoco, refcoco+, refcocog (REFER files + COCO train2014 images) "
                            "or phrasecut (VGPhraseCut files + Visual Genome images)")
    bench.add_argument("--split", help="split to evaluate: val, testA, testB (refcoco, refcoco+ with unc), "
                                       "val, test (refcocog with umd), test (phrasecut). "
                                       "Default: val; test for phrasecut")
    bench.add_argument("--split-by", dest="split_by",
                       help="REFER split scheme, the X of refs(X).p: unc (default for refcoco, refcoco+), "
                            "umd (default for refcocog), google")
    bench.add_argument("--data-dir", dest="data_dir", type=Path,
                       help="annotation folder: for refcoco* the folder holding refs(<split-by>).p and "
                            "instances.json (or its parent, which holds <dataset>/); for phrasecut the "
                            "folder holding refer_<split>.json (VGPhraseCut_v0)")
    bench.add_argument("--images", type=Path,
                       help="image folder: COCO train2014 for refcoco* (files named as instances.json's "
                            "file_name); for phrasecut default <data-dir>/images (<image_id>.jpg)")
    bench.add_argument("--sentence-field", dest="sentence_field", choices=("raw", "sent"), default="raw",
                       help="REFER sentence text to query with: raw (default: what the authors' code "
                            "uses) or sent (REFER's lower-cased, tokenized form)")
    bench.add_argument("--gt-overlap", dest="gt_overlap", choices=("union", "single"), default="union",
                       help="REFER ground truth where an object's polygons overlap: union (default) or "
                            "single (only pixels covered by exactly one polygon: the authors' loader, "
                            "which keeps REFER getMask()'s sum == 1)")
    bench.add_argument("--out", type=Path,
                       help="output folder: results.jsonl (resumable), run.json, summary.json, summary.md "
                            "(required for a benchmark; optional with --labelstudio-export)")
    bench.add_argument("--limit", type=int, metavar="N",
                       help="evaluate only the first N sentences (images in annotation-file order, "
                            "all sentences of an image together): a quick look")
    bench.add_argument("--index-cache", dest="index_cache", type=Path, metavar="DIR",
                       help="keep each image's index here (without SAM's embedding, ~0.5 MB per image) and "
                            "reuse it: a rerun with other query-side settings (for example the release "
                            "switches --no-right-fires --sticky-k, or --alpha) skips all image work")
    bench.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show a progress bar over sentences (rate, ETA) on stderr (default: on)")

    ls = parser.add_argument_group("a team's own data: a Label Studio export")
    ls.add_argument("--labelstudio-export", dest="labelstudio_export", type=Path, metavar="EXPORT_JSON",
                    help="Label Studio JSON export (Export > JSON) of tasks with predictions and submitted "
                         "annotations: compare them region by region (no model is loaded)")
    ls.add_argument("--accept-iou", dest="accept_iou", type=float, default=0.99,
                    help="a predicted region counts as accepted unchanged when its annotation region has "
                         "the same label and at least this IoU with it (default 0.99)")


def run(args: argparse.Namespace) -> int:
    """``hybridgl evaluate``: a benchmark run (``--dataset``) or a Label Studio export report."""
    if getattr(args, "labelstudio_export", None):
        if getattr(args, "dataset", None):
            raise ValueError("--labelstudio-export and --dataset are separate modes: give one of them")
        return run_labelstudio(args)
    if not getattr(args, "dataset", None):
        raise ValueError("give --dataset (refcoco, refcoco+, refcocog, phrasecut) for a benchmark, "
                         "or --labelstudio-export EXPORT_JSON to measure pre-labeling on your own data")
    return run_benchmark(args)


# =================================================================================================
# Ground truth rasterization
# =================================================================================================
def coco_polygon_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """One COCO polygon ``[x1, y1, x2, y2, ...]`` as an (H, W) bool mask, pixel for pixel what
    pycocotools' ``frPyObjects`` + ``decode`` give (a port of ``rleFrPoly`` in cocoapi's maskApi.c:
    vertices scaled by 5 and rounded, edges walked at that resolution, the pixels whose centres lie
    between the down-sampled y-crossings of each column filled). An integer rectangle
    ``x0, y0, x1, y0, x1, y1, x0, y1`` covers exactly columns x0..x1-1 and rows y0..y1-1."""
    h, w = int(height), int(width)
    xy = np.asarray(polygon, dtype=np.float64).ravel()
    k = len(xy) // 2
    if k == 0 or h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    scale = 5.0
    # C's (int) cast truncates toward zero, as numpy's float -> int conversion does.
    x = np.append((scale * xy[0:2 * k:2] + 0.5).astype(np.int64), 0)
    y = np.append((scale * xy[1:2 * k:2] + 0.5).astype(np.int64), 0)
    x[k], y[k] = x[0], y[0]
    us: list[np.ndarray] = []
    vs: list[np.ndarray] = []
    for j in range(k):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            t = np.arange(dx + 1, dtype=np.int64)
            if flip:
                t = dx - t
            # dx == dy == 0 (a repeated vertex) divides 0 by 0 in C; that point's v is never read.
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append((ys + s * t + 0.5).astype(np.int64))
        else:
            t = np.arange(dy + 1, dtype=np.int64)
            if flip:
                t = dy - t
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append((xs + s * t + 0.5).astype(np.int64))
    u = np.concatenate(us)
    v = np.concatenate(vs)
    # Points along the y-boundary, down-sampled.
    uj, up, vj, vp = u[1:], u[:-1], v[1:], v[:-1]
    xd = np.where(uj < up, uj, uj - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = (uj != up) & (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.minimum(vj, vp).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, h))
    xi = xd[keep].astype(np.int64)
    yi = yd[keep].astype(np.int64)
    # RLE counts from the boundary points (column-major positions), zero runs merged as in C.
    a = np.sort(np.append(xi * h + yi, h * w))
    a = np.diff(a, prepend=0)
    counts = [int(a[0])]
    j = 1
    while j < len(a):
        if a[j] > 0:
            counts.append(int(a[j]))
            j += 1
        else:
            j += 1
            if j < len(a):
                counts[-1] += int(a[j])
                j += 1
    return rle_decode(counts, h, w)


def rle_decode(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """COCO RLE counts (column-major runs, starting with a run of 0s) -> (H, W) bool mask."""
    c = np.asarray(counts, dtype=np.int64)
    if (c < 0).any() or int(c.sum()) != height * width:
        raise ValueError(f"RLE counts sum to {int(c.sum())}, not {height}x{width} = {height * width} pixels")
    values = (np.arange(len(c)) % 2).astype(bool)
    return np.repeat(values, c).reshape(width, height).T


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> counts (a port of ``rleFrString``: LEB128-like, 5 bits per
    character from ASCII 48, bit 0x20 = more, sign bit 0x10 on the last character; counts after the
    second are stored as differences to the count two places back)."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("truncated compressed RLE string")
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
    return counts


def coco_segmentation_mask(segmentation: Any, height: int, width: int, overlap: str = "union") -> np.ndarray:
    """A COCO ``segmentation`` at the image's size: a list of polygons (``overlap``: ``union``, or
    ``single`` = pixels covered by exactly one polygon), or an RLE dict ``{"size": [h, w], "counts":
    [...] or "compressed string"}``."""
    h, w = int(height), int(width)
    if isinstance(segmentation, list):
        cover = np.zeros((h, w), dtype=np.int32)
        for polygon in segmentation:
            cover += coco_polygon_mask(polygon, h, w)
        return cover == 1 if overlap == "single" else cover >= 1
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size")
        if size is not None and (int(size[0]), int(size[1])) != (h, w):
            raise ValueError(f"RLE segmentation is {size[0]}x{size[1]}, the image {h}x{w}")
        counts = segmentation["counts"]
        if isinstance(counts, (str, bytes)):
            counts = rle_counts_from_string(counts)
        return rle_decode(counts, h, w)
    raise ValueError(f"unsupported COCO segmentation {type(segmentation).__name__}: expected a list of "
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


# =================================================================================================
# Datasets
# =================================================================================================
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


class _RefsUnpickler(pickle.Unpickler):
    """REFER's ``refs(*).p`` are pickles, and unpickling can run code. These files hold only lists,
    dicts, strings and numbers, which need no class lookup: every class lookup is refused, so a
    tampered file fails instead of running anything."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a REFER refs file holds only lists, dicts, strings and "
            "numbers (is this file really a REFER refs(*).p?)")


def _py2_text(obj: Any) -> Any:
    """Python 2 ``str`` arrive as bytes (loaded with ``encoding="bytes"``): decode them as UTF-8
    (latin-1 where that fails), keys included."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj.decode("latin-1")
    if isinstance(obj, dict):
        return {_py2_text(k): _py2_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_py2_text(v) for v in obj]
    return obj


def load_refs(path: Path) -> list[dict]:
    """A REFER ``refs(<splitBy>).p``: a list of {ref_id, ann_id, image_id, split, sentences: [{sent,
    raw, tokens, sent_id}], category_id, file_name, ...}. Read without running code (see
    ``_RefsUnpickler``), Python 2 byte strings decoded."""
    with open(path, "rb") as f:
        try:
            refs = _RefsUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path}: {exc}") from None
    refs = _py2_text(refs)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path} is not a REFER refs file (expected a list of dicts)")
    return refs


def _refer_dir(data_dir: Path, dataset: str, split_by: str) -> Path:
    name = f"refs({split_by}).p"
    for d in (data_dir, data_dir / dataset):
        if (d / name).is_file() and (d / "instances.json").is_file():
            return d
    raise FileNotFoundError(
        f"no {name} and instances.json in {data_dir} or {data_dir / dataset}: --data-dir is the REFER "
        f"folder of {dataset} (see the README for where to get it)")


def load_refer(data_dir: Path, dataset: str, split_by: str, split: str, images: Path,
               sentence_field: str = "raw") -> list[Sample]:
    """REFER's files, read as its API does: refs whose ``split`` is ``split``, in file order; each
    ref's object is ``instances.json``'s annotation ``ann_id`` (its ``segmentation``), its image is
    the ``images`` entry ``image_id`` (``file_name``, ``height``, ``width``; the refs' own
    ``file_name`` carries an annotation suffix and is not a file). Every sentence of every ref is a
    sample; the text is the sentence's ``raw`` (or ``sent``). Samples come grouped by image, images
    in order of first appearance."""
    folder = _refer_dir(Path(data_dir), dataset, split_by)
    refs = load_refs(folder / f"refs({split_by}).p")
    with open(folder / "instances.json", encoding="utf-8") as f:
        instances = json.load(f)
    imgs = {img["id"]: img for img in instances.get("images", [])}
    anns = {ann["id"]: ann for ann in instances.get("annotations", [])}
    chosen = [r for r in refs if r.get("split") == split]
    if not chosen:
        splits = sorted({str(r.get("split")) for r in refs})
        raise ValueError(f"no refs with split {split!r} in {folder / f'refs({split_by}).p'}; "
                         f"its splits: {', '.join(splits)}")
    other = "sent" if sentence_field == "raw" else "raw"
    by_image: dict[Any, list[Sample]] = {}
    seen: set[str] = set()
    for ref in chosen:
        ann = anns.get(ref["ann_id"])
        img = imgs.get(ref["image_id"])
        if ann is None or img is None:
            raise ValueError(f"ref {ref.get('ref_id')}: annotation {ref.get('ann_id')} or image "
                             f"{ref.get('image_id')} is missing from {folder / 'instances.json'}")
        for sent in ref.get("sentences", []):
            key = str(sent["sent_id"])
            if key in seen:
                raise ValueError(f"sentence id {key} appears twice in split {split!r}")
            seen.add(key)
            text = sent.get(sentence_field)
            if text is None:
                text = sent.get(other, "")
            by_image.setdefault(img["id"], []).append(Sample(
                key=key, image=img["file_name"], image_path=Path(images) / img["file_name"],
                image_id=img["id"], expression=str(text), gt_key=f"ann:{ann['id']}", gt_kind="coco",
                gt_source=ann["segmentation"], size=(int(img["height"]), int(img["width"])),
                meta={"sent_id": sent["sent_id"], "ref_id": ref.get("ref_id"), "ann_id": ann["id"]}))
    return [s for group in by_image.values() for s in group]


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
            raise ValueError(f"task id {key} appears twice in {path}")
        seen.add(key)
        polygons = [polygon for instance in task["Polygons"] for polygon in instance]
        name = f"{task['image_id']}.jpg"
        by_image.setdefault(task["image_id"], []).append(Sample(
            key=key, image=name, image_path=images / name, image_id=task["image_id"],
            expression=str(task["phrase"]), gt_key=f"task:{key}", gt_kind="phrasecut", gt_source=polygons,
            meta={"task_id": task["task_id"]}))
    return [s for group in by_image.values() for s in group]


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


# =================================================================================================
# Metrics
# =================================================================================================
def iou_metrics(pairs: Iterable[tuple[int, int]]) -> dict:
    """``pairs`` of (I, U) -> {sentences, I, U, oIoU = 100*sum(I)/sum(U), mIoU = 100*mean(I/U)}
    (``U = 0`` counts 0 in the mean; ``oIoU`` is 0 when ``sum(U) = 0``)."""
    total_i = total_u = 0
    ious: list[float] = []
    for i, u in pairs:
        total_i += int(i)
        total_u += int(u)
        ious.append(int(i) / int(u) if u else 0.0)
    return {"sentences": len(ious), "I": total_i, "U": total_u,
            "oIoU": 100.0 * total_i / total_u if total_u else 0.0,
            "mIoU": 100.0 * math.fsum(ious) / len(ious) if ious else 0.0}


def summarize(records: Iterable[dict], run_info: dict | None = None, split_sentences: int | None = None) -> dict:
    """The summary of result lines: pure and final (with guidance) metrics, overall and per
    relation flag, plus what the lines were computed with."""
    recs = list(records)
    info = dict(run_info or {})
    settings = info.get("settings") or {}

    def block(rs: list[dict]) -> dict:
        return {"sentences": len(rs),
                "pure": iou_metrics((r["I_pure"], r["U_pure"]) for r in rs),
                "final": iou_metrics((r["I_final"], r["U_final"]) for r in rs)}

    by_relation: dict[str, list[dict]] = {}
    for r in recs:
        by_relation.setdefault(r.get("relation") or "none", []).append(r)
    order = {name: i for i, name in enumerate(RELATION_ORDER)}
    summary = {
        "dataset": info.get("dataset"), "split": info.get("split"), "split_by": info.get("split_by"),
        "model_version": info.get("model_version"),
        "sentences": len(recs), "images": len({r.get("image") for r in recs}),
        "split_sentences": split_sentences,
        "complete": split_sentences is not None and len(recs) >= split_sentences,
        "errors": sum(1 for r in recs if r.get("error")),
        **{k: v for k, v in block(recs).items() if k != "sentences"},
        "by_relation": {name: block(by_relation[name])
                        for name in sorted(by_relation, key=lambda n: (order.get(n, len(order)), n))},
        "release_switches": {"right_fires": settings.get("right_fires"), "sticky_k": settings.get("sticky_k"),
                             "is_release": settings.get("right_fires") is False and settings.get("sticky_k") is True},
        "run": {k: v for k, v in info.items() if k not in ("settings", "model_version")},
        "settings": settings,
    }
    return summary


def summary_markdown(summary: dict) -> str:
    name = " ".join(str(x) for x in (summary.get("dataset"), summary.get("split_by"), summary.get("split")) if x)
    total = summary.get("split_sentences")
    sw = summary.get("release_switches") or {}
    lines = [
        f"## HybridGL on {name or 'a benchmark'}",
        "",
        f"{summary['sentences']}{f' of {total}' if total is not None else ''} sentences, "
        f"{summary['images']} image{'' if summary['images'] == 1 else 's'}; "
        f"model_version `{summary.get('model_version')}`; right_fires={_flag(sw.get('right_fires'))}, "
        f"sticky_k={_flag(sw.get('sticky_k'))}"
        + (" (the release's behaviour)" if sw.get("is_release") else "")
        + (f"; {summary['errors']} without an answer (counted as an empty mask)" if summary.get("errors") else ""),
        "",
        "| Subset | Sentences | Pure oIoU | Pure mIoU | Guided oIoU | Guided mIoU |",
        "|---|---:|---:|---:|---:|---:|",
        _md_row("all", summary["sentences"], summary["pure"], summary["final"]),
    ]
    for relation, block in summary["by_relation"].items():
        lines.append(_md_row(f"relation {relation}", block["sentences"], block["pure"], block["final"]))
    lines += ["", ("oIoU = 100·ΣI/ΣU, mIoU = 100·mean(I/U); Pure = argmax of the CLIP score, Guided = with "
                   "spatial guidance (relation + coherence); relation = the expression's relation flag."), ""]
    return "\n".join(lines)


def _flag(value: Any) -> str:
    return "?" if value is None else str(value).lower()


def _md_row(name: str, n: int, pure: dict, final: dict) -> str:
    return f"| {name} | {n} | {pure['oIoU']:.2f} | {pure['mIoU']:.2f} | {final['oIoU']:.2f} | {final['mIoU']:.2f} |"


# =================================================================================================
# Benchmark run
# =================================================================================================
def read_results(path: Path) -> dict[str, dict]:
    """``results.jsonl`` -> {key: line} (a later line with the same key wins)."""
    records: dict[str, dict] = {}
    if not Path(path).is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path} line {number} is not JSON: remove it to recompute it") from None
                records[str(record["key"])] = record
    return records


def _repair_results(path: Path) -> None:
    """Drop a last line cut short by an interrupted run (it is then recomputed)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _benchmark_settings(args: argparse.Namespace, dataset: str):
    """The method's settings (flags, else HYBRIDGL_* variables, else defaults); PhraseCut gets the
    paper's phrasecut SAM preset unless a preset was chosen explicitly."""
    from worker.cli import settings_from_args
    from worker.hybridgl.settings import env_name

    settings = settings_from_args(args)
    explicit = getattr(args, "sam_preset", None) is not None or os.environ.get(env_name("sam_preset"))
    if dataset == "phrasecut" and not explicit and settings.sam_preset != "phrasecut":
        settings = settings.replace(sam_preset="phrasecut")
    return settings


def run_benchmark(args: argparse.Namespace) -> int:
    dataset = args.dataset
    if getattr(args, "data_dir", None) is None:
        raise ValueError("--data-dir is required with --dataset (the annotation folder)")
    if getattr(args, "out", None) is None:
        raise ValueError("--out is required with --dataset (results.jsonl, summary.json, summary.md go there)")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 0:
        raise ValueError("--limit must be 0 or more")
    if dataset == "phrasecut":
        split = args.split or "test"
        split_by = None
        samples = load_phrasecut(args.data_dir, split, args.images)
    else:
        split = args.split or "val"
        split_by = args.split_by or DEFAULT_SPLIT_BY[dataset]
        if args.images is None:
            raise ValueError("--images is required for REFER datasets (the COCO train2014 image folder)")
        samples = load_refer(args.data_dir, dataset, split_by, split, args.images, args.sentence_field)

    identity = {"dataset": dataset, "split": split, "split_by": split_by,
                "sentence_field": args.sentence_field if dataset != "phrasecut" else None,
                "gt_overlap": args.gt_overlap if dataset != "phrasecut" else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_path, results_path = out / RUN_FILE, out / RESULTS_FILE
    previous = json.loads(run_path.read_text(encoding="utf-8")) if run_path.is_file() else None
    if previous is not None:
        differ = [k for k in identity if previous.get(k) != identity[k]]
        if differ:
            there = ", ".join(f"{k}={previous.get(k)!r}" for k in differ)
            now = ", ".join(f"{k}={identity[k]!r}" for k in differ)
            raise ValueError(f"{out} holds results of another run ({there} instead of {now}): use another --out")
    settings = _benchmark_settings(args, dataset)
    if previous is not None and previous.get("settings"):
        # Settings that change answers must match (checked without loading a model); the weights
        # are checked through model_version once a model is loaded.
        changed = {k: (previous["settings"].get(k), v) for k, v in settings.scoped("index", "query").items()
                   if previous["settings"].get(k) != v}
        if changed:
            raise ValueError(f"{out} holds results computed with other settings "
                             f"({', '.join(f'{k}={a!r} there, {b!r} now' for k, (a, b) in changed.items())}): "
                             "use another --out for another configuration")
    _repair_results(results_path)
    done = read_results(results_path)
    selected = samples if limit is None else samples[:limit]
    todo = [s for s in selected if s.key not in done]

    run_info = previous or {**identity, "model_version": None, "settings": None}
    if todo:
        from worker.hybridgl.pipeline import HybridGL

        pipeline = HybridGL(settings)
        if previous is not None and previous.get("model_version") != pipeline.model_version:
            raise ValueError(f"{out} holds results of model_version {previous.get('model_version')}, these settings "
                             f"give {pipeline.model_version}: use another --out for another configuration")
        run_info = {**identity, "model_version": pipeline.model_version, "settings": dataclasses.asdict(settings),
                    "started": (previous or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_atomic(run_path, json.dumps(run_info, indent=1) + "\n")
        print(f"hybridgl evaluate: {dataset} {split_by or ''} {split}: {len(todo)} sentences to do "
              f"({len(done)} already in {results_path}), model_version {pipeline.model_version}",
              file=sys.stderr)
        evaluate_samples(pipeline, todo, results_path, overlap=args.gt_overlap,
                         index_cache=getattr(args, "index_cache", None),
                         progress=getattr(args, "progress", True), previous=done.values())
    records = read_results(results_path)
    summary = summarize(records.values(), run_info, split_sentences=len(samples))
    _write_atomic(out / SUMMARY_JSON, json.dumps(summary, indent=1) + "\n")
    markdown = summary_markdown(summary)
    _write_atomic(out / SUMMARY_MD, markdown)
    print(markdown)
    return 0


def evaluate_samples(pipeline, samples: Sequence[Sample], results_path: Path, *, overlap: str = "union",
                     index_cache: Path | None = None, progress: bool = True,
                     previous: Iterable[dict] = ()) -> None:
    """Query every sample, appending one line per sentence to ``results_path`` (flushed each time).
    Samples of one image must be adjacent: its index and ground truths are built once."""
    from tqdm import tqdm

    from worker.hybridgl.pipeline import NoRegionError

    sums = dict.fromkeys(("I_pure", "U_pure", "I_final", "U_final"), 0)
    for r in previous:
        for k in sums:
            sums[k] += r[k]
    groups: list[list[Sample]] = []
    for s in samples:
        if groups and groups[-1][0].image_path == s.image_path:
            groups[-1].append(s)
        else:
            groups.append([s])
    with open(results_path, "a", encoding="utf-8") as f, \
            tqdm(total=len(samples), unit="sent", disable=not progress, dynamic_ncols=True,
                 desc="evaluate", file=sys.stderr) as bar:
        for group in groups:
            rgb = load_rgb(group[0].image_path)
            h, w = rgb.shape[:2]
            if group[0].size is not None and group[0].size != (h, w):
                raise ValueError(f"image {group[0].image_path} is {w}x{h} but the annotations say "
                                 f"{group[0].size[1]}x{group[0].size[0]}: wrong image folder or file?")
            index = _index(pipeline, rgb, index_cache)
            masks = index.masks.numpy()
            gts: dict[str, np.ndarray] = {}
            for s in group:
                gt = gts.get(s.gt_key)
                if gt is None:
                    gt = gts[s.gt_key] = ground_truth(s, h, w, overlap)
                gt_area = int(np.count_nonzero(gt))
                line = {"key": s.key, **s.meta, "image": s.image, "image_id": s.image_id,
                        "expression": s.expression, "proposals": len(masks), "gt_area": gt_area, "error": None}
                try:
                    result = pipeline.query(index, s.expression)
                except NoRegionError as exc:
                    line.update(_empty_answer(pipeline, s.expression, gt_area, str(exc)))
                except ValueError as exc:  # the expression is refused (empty, too long)
                    line.update(_empty_answer(None, s.expression, gt_area, str(exc)))
                else:
                    pure_mask, final_mask = masks[result.pure], result.mask
                    line.update({
                        "relation": result.explanation["relation"], "direction": result.explanation["direction"],
                        "chosen": int(result.chosen), "pure": int(result.pure),
                        "I_pure": int(np.count_nonzero(pure_mask & gt)),
                        "U_pure": int(np.count_nonzero(pure_mask | gt)),
                        "I_final": int(np.count_nonzero(final_mask & gt)),
                        "U_final": int(np.count_nonzero(final_mask | gt)),
                    })
                line["t"] = round(time.time(), 3)
                f.write(json.dumps(line) + "\n")
                f.flush()
                for k in sums:
                    sums[k] += line[k]
                bar.set_postfix_str(f"oIoU pure {_pct(sums['I_pure'], sums['U_pure'])} "
                                    f"guided {_pct(sums['I_final'], sums['U_final'])}", refresh=False)
                bar.update(1)


def _pct(i: int, u: int) -> str:
    return f"{100.0 * i / u:.2f}" if u else "-"


def _empty_answer(pipeline, expression: str, gt_area: int, error: str) -> dict:
    relation = direction = "none"
    if pipeline is not None:
        try:
            parsed = pipeline.parse(expression)
            relation, direction = parsed.relation, parsed.direction
        except ValueError:
            pass
    return {"relation": relation, "direction": direction, "chosen": None, "pure": None, "error": error,
            "I_pure": 0, "U_pure": gt_area, "I_final": 0, "U_final": gt_area}


def index_cache_path(cache_dir: Path, key: str) -> Path:
    """Where ``--index-cache`` keeps the index whose key is ``key``."""
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.index.npz"


def save_index(path: Path, index) -> None:
    """Store an index for ``--index-cache`` (without SAM's embedding: point refinement is not used here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(dataclasses.replace(index, sam_embedding=None, sam_input_size=None).to_bytes())
    os.replace(tmp, path)


def _index(pipeline, rgb: np.ndarray, cache_dir: Path | None):
    """The image's index, from ``cache_dir`` when an index with the same key (image content + every
    index setting + weights) is there; built and stored otherwise."""
    if cache_dir is None:
        return pipeline.index(rgb)
    from worker.hybridgl.image_index import ImageIndex
    from worker.hybridgl.images import image_hash

    key = pipeline.index_key(image_hash(rgb))
    path = index_cache_path(cache_dir, key)
    if path.is_file():
        try:
            index = ImageIndex.from_bytes(path.read_bytes())
            if index.key == key:
                return index
        except Exception:  # noqa: BLE001, S110 - a damaged cache file is rebuilt
            pass
    index = pipeline.index(rgb)
    save_index(path, index)
    return index


# =================================================================================================
# Label Studio export: what pre-labeling saves
# =================================================================================================
_LS_KINDS = {"brushlabels": "brush", "brush": "brush", "polygonlabels": "polygon", "polygon": "polygon",
             "rectanglelabels": "rectangle", "rectangle": "rectangle"}
NO_LABEL = "(no label)"


@dataclass
class Region:
    id: str | None
    from_name: str
    kind: str
    label: str
    mask: np.ndarray = field(repr=False)


def _base_id(rid: Any) -> str | None:
    # Label Studio's editor keeps "<id>#<annotation>" internally; exports carry the plain id.
    return None if rid is None else str(rid).split("#", 1)[0]


def labelstudio_mask(kind: str, value: dict, width: int, height: int) -> np.ndarray:
    """One Label Studio region value -> (H, W) bool mask at the original image size.

    - brush ``{"format": "rle", "rle": [...]}``: ``label_studio_sdk.converter.brush.decode_rle``,
      reshaped to H x W x 4 (RGBA); the region is where alpha > 0.
    - polygon ``{"points": [[x%, y%], ...]}``: vertices at x% of the width, y% of the height, filled
      with PIL (boundary pixels included).
    - rectangle ``{"x", "y", "width", "height"}`` in percent, ``rotation`` in degrees clockwise about
      the top-left corner: unrotated, the pixels [round(x), round(x + width)) x [round(y),
      round(y + height)); rotated, the polygon of its corners.
    """
    from PIL import Image, ImageDraw

    w, h = int(width), int(height)
    if kind == "brush":
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise ValueError(f"brush value in format {value.get('format')!r}: only 'rle' is supported")
        from label_studio_sdk.converter.brush import decode_rle

        flat = np.asarray(decode_rle(value["rle"]))
        if flat.size != w * h * 4:
            raise ValueError(f"brush RLE holds {flat.size} values; a {w}x{h} RGBA image has {w * h * 4}")
        return flat.reshape(h, w, 4)[:, :, 3] > 0
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    if kind == "polygon":
        points = [(round(float(x) * w / 100.0, 6), round(float(y) * h / 100.0, 6)) for x, y in value.get("points", [])]
        if len(points) >= 2:
            draw.polygon(points, outline=1, fill=1)
        return np.asarray(image) > 0
    if kind == "rectangle":
        x0, y0 = float(value["x"]) * w / 100.0, float(value["y"]) * h / 100.0
        rw, rh = float(value["width"]) * w / 100.0, float(value["height"]) * h / 100.0
        rotation = float(value.get("rotation") or 0.0) % 360.0
        if rotation == 0.0:
            mask = np.zeros((h, w), dtype=bool)
            c0, c1 = math.floor(x0 + 0.5), math.floor(x0 + rw + 0.5)
            r0, r1 = math.floor(y0 + 0.5), math.floor(y0 + rh + 0.5)
            mask[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
            return mask
        a = math.radians(rotation)
        corners = [(x0 + cx * math.cos(a) - cy * math.sin(a), y0 + cx * math.sin(a) + cy * math.cos(a))
                   for cx, cy in ((0, 0), (rw, 0), (rw, rh), (0, rh))]
        draw.polygon(corners, outline=1, fill=1)
        return np.asarray(image) > 0
    raise ValueError(f"unsupported region kind {kind!r}")


def labelstudio_regions(result: list[dict], where: str = "") -> list[Region]:
    """Brush, polygon and rectangle regions of a result list (others, e.g. choices or text, are
    ignored). The label is the value's ``brushlabels``/``polygonlabels``/``rectanglelabels``, or a
    ``labels`` result with the same id (a separate <Labels> tag)."""
    labels_by_id: dict[str, list[str]] = {}
    for item in result or []:
        if item.get("type") == "labels":
            labels_by_id[_base_id(item.get("id"))] = list((item.get("value") or {}).get("labels") or [])
    regions = []
    for item in result or []:
        rtype = item.get("type")
        kind = _LS_KINDS.get(rtype)
        if kind is None:
            continue
        value = item.get("value") or {}
        rid = _base_id(item.get("id"))
        labels = list(value.get(rtype) or []) if rtype.endswith("labels") else []
        labels = labels or labels_by_id.get(rid, [])
        width, height = item.get("original_width"), item.get("original_height")
        if not width or not height:
            raise ValueError(f"{where}: a {rtype} result without original_width/original_height")
        regions.append(Region(id=rid, from_name=str(item.get("from_name", "")), kind=kind,
                              label=", ".join(str(x) for x in labels) if labels else NO_LABEL,
                              mask=labelstudio_mask(kind, value, width, height)))
    return regions


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        from PIL import Image

        b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.NEAREST))
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def match_regions(predicted: list[Region], annotated: list[Region]) -> list[tuple[int, int, str, float]]:
    """Pairs (prediction index, annotation index, how, IoU). First by region id: when an annotator
    accepts a prediction, Label Studio copies its results into the annotation with the same ids (also
    when the annotator then edits the region, so an id says where a region came from, not that it is
    unchanged). Then the rest greedily by best IoU, among regions of the same control (from_name) and
    label, IoU > 0."""
    pairs: list[tuple[int, int, str, float]] = []
    used_p: set[int] = set()
    used_a: set[int] = set()
    by_id = {(r.from_name, r.id): j for j, r in enumerate(annotated) if r.id}
    for i, p in enumerate(predicted):
        j = by_id.get((p.from_name, p.id)) if p.id else None
        if j is not None and j not in used_a:
            pairs.append((i, j, "id", _mask_iou(p.mask, annotated[j].mask)))
            used_p.add(i)
            used_a.add(j)
    candidates = []
    for i, p in enumerate(predicted):
        if i in used_p:
            continue
        for j, a in enumerate(annotated):
            if j in used_a or a.from_name != p.from_name or a.label != p.label:
                continue
            iou = _mask_iou(p.mask, a.mask)
            if iou > 0:
                candidates.append((-iou, i, j))
    for neg, i, j in sorted(candidates):
        if i not in used_p and j not in used_a:
            pairs.append((i, j, "iou", -neg))
            used_p.add(i)
            used_a.add(j)
    return sorted(pairs)


def _pick_annotation(annotations: list[dict], prediction: dict) -> dict:
    pid = prediction.get("id")
    if pid is not None:
        for a in annotations:
            if a.get("parent_prediction") == pid:
                return a
    truth = [a for a in annotations if a.get("ground_truth")]
    pool = truth or annotations
    return max(pool, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def labelstudio_report(tasks: list[dict], accept_iou: float = 0.99) -> dict:
    """Compare each task's predictions with its submitted annotation.

    Per task: annotations with ``was_cancelled`` are ignored; a prediction is compared with the
    annotation made from it (``parent_prediction`` = the prediction's id), else the ground-truth
    annotation, else the latest. Each predicted region is ``unchanged`` (matched, same label,
    IoU >= ``accept_iou``), ``corrected`` (matched otherwise) or ``deleted`` (no match); annotation
    regions left unmatched are ``added``. A task is ``untouched`` when all its predicted regions are
    unchanged and none was added. Returns {"groups": {"model_version": ..., "label": ...,
    "model_version/label": ...}, "overall": ..., "tasks": counts, "regions": one record per region}.
    """
    if isinstance(tasks, dict):
        tasks = [tasks]
    regions: list[dict] = []
    task_rows: list[dict] = []
    counts = {"tasks": len(tasks), "compared": 0, "without_prediction": 0, "without_annotation": 0}
    for task in tasks:
        tid = task.get("id")
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        predictions = task.get("predictions") or []
        if not predictions:
            counts["without_prediction"] += 1
            continue
        if not annotations:
            counts["without_annotation"] += 1
            continue
        counts["compared"] += 1
        for prediction in predictions:
            version = str(prediction.get("model_version") or "(none)")
            annotation = _pick_annotation(annotations, prediction)
            where = f"task {tid}"
            pred = labelstudio_regions(prediction.get("result") or [], where + " prediction")
            ann = labelstudio_regions(annotation.get("result") or [], where + " annotation")
            pairs = match_regions(pred, ann)
            matched_p = {i: (j, how, iou) for i, j, how, iou in pairs}
            matched_a = {j for _, j, _, _ in pairs}
            rows = []
            for i, p in enumerate(pred):
                row = {"task": tid, "model_version": version, "from_name": p.from_name, "kind": p.kind,
                       "label": p.label, "prediction_region": p.id, "annotation": annotation.get("id")}
                if i in matched_p:
                    j, how, iou = matched_p[i]
                    same_label = ann[j].label == p.label
                    row.update({"annotation_region": ann[j].id, "matched_by": how, "iou": iou,
                                "label_changed": not same_label,
                                "status": "unchanged" if same_label and iou >= accept_iou else "corrected"})
                else:
                    row.update({"annotation_region": None, "matched_by": None, "iou": 0.0,
                                "label_changed": False, "status": "deleted"})
                rows.append(row)
            for j, a in enumerate(ann):
                if j not in matched_a:
                    rows.append({"task": tid, "model_version": version, "from_name": a.from_name, "kind": a.kind,
                                 "label": a.label, "prediction_region": None, "annotation": annotation.get("id"),
                                 "annotation_region": a.id, "matched_by": None, "iou": None,
                                 "label_changed": False, "status": "added"})
            regions.extend(rows)
            task_rows.append({"model_version": version,
                              "untouched": all(r["status"] == "unchanged" for r in rows)})

    def stats(rows: list[dict], tasks_rows: list[dict] | None = None) -> dict:
        predicted = [r for r in rows if r["status"] != "added"]
        matched = [r for r in predicted if r["status"] != "deleted"]
        corrected = [r for r in predicted if r["status"] == "corrected"]
        n = len(predicted)
        share = (lambda k: k / n if n else None)
        mean = (lambda xs: math.fsum(xs) / len(xs) if xs else None)
        out = {
            "predicted": n,
            "unchanged": sum(r["status"] == "unchanged" for r in predicted),
            "corrected": len(corrected),
            "deleted": sum(r["status"] == "deleted" for r in predicted),
            "added": sum(r["status"] == "added" for r in rows),
            "label_changed": sum(bool(r["label_changed"]) for r in predicted),
            "mean_iou": mean([r["iou"] for r in matched]),
            "mean_iou_corrected": mean([r["iou"] for r in corrected]),
            "mean_iou_all": mean([r["iou"] for r in predicted]),
        }
        out["share_unchanged"] = share(out["unchanged"])
        out["share_corrected"] = share(out["corrected"])
        out["share_deleted"] = share(out["deleted"])
        if tasks_rows is not None:
            out["tasks"] = len(tasks_rows)
            out["tasks_untouched"] = sum(t["untouched"] for t in tasks_rows)
        return out

    def grouped(key) -> dict:
        groups: dict[str, list[dict]] = {}
        for r in regions:
            groups.setdefault(key(r), []).append(r)
        return {k: groups[k] for k in sorted(groups)}

    by_version = {v: stats(rows, [t for t in task_rows if t["model_version"] == v])
                  for v, rows in grouped(lambda r: r["model_version"]).items()}
    for v in sorted({t["model_version"] for t in task_rows} - set(by_version)):
        by_version[v] = stats([], [t for t in task_rows if t["model_version"] == v])
    return {
        "accept_iou": accept_iou,
        "tasks": counts,
        "overall": stats(regions, task_rows),
        "groups": {
            "model_version": dict(sorted(by_version.items())),
            "label": {k: stats(rows) for k, rows in grouped(lambda r: r["label"]).items()},
            "model_version/label": {k: stats(rows) for k, rows in
                                    grouped(lambda r: f"{r['model_version']} / {r['label']}").items()},
        },
        "regions": regions,
    }


def labelstudio_markdown(report: dict) -> str:
    c = report["tasks"]
    lines = [
        "## Pre-labeling: predictions against submitted annotations",
        "",
        (f"{c['compared']} tasks compared ({c['tasks']} in the export; {c['without_prediction']} without a "
         f"prediction, {c['without_annotation']} without a submitted annotation). Accepted unchanged = same label "
         f"and IoU ≥ {report['accept_iou']:g} with the annotator's region."),
        "",
    ]
    header = ("| {} | Predicted regions | Accepted unchanged | Corrected (mean IoU) | Deleted | Added by annotators "
              "| Mean IoU (matched) |")
    for title, key in (("model_version", "model_version"), ("Label", "label"),
                       ("model_version / label", "model_version/label")):
        lines += [header.format(title), "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in report["groups"][key].items():
            tasks = f" ({s['tasks_untouched']} of {s['tasks']} tasks untouched)" if "tasks" in s else ""
            lines.append(
                f"| {name}{tasks} | {s['predicted']} | {_share(s['unchanged'], s['share_unchanged'])} | "
                f"{_share(s['corrected'], s['share_corrected'])} ({_num(s['mean_iou_corrected'])}) | "
                f"{_share(s['deleted'], s['share_deleted'])} | {s['added']} | {_num(s['mean_iou'])} |")
        lines.append("")
    return "\n".join(lines)


def _share(count: int, share: float | None) -> str:
    return f"{count} ({100.0 * share:.1f} %)" if share is not None else str(count)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_labelstudio(args: argparse.Namespace) -> int:
    path = Path(args.labelstudio_export)
    if not path.is_file():
        raise FileNotFoundError(f"Label Studio export {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            tasks = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc}): export the project with Export > JSON") from None
    if not isinstance(tasks, (list, dict)):
        raise ValueError(f"{path} is not a Label Studio JSON export (a list of tasks)")  # noqa: TRY004 - a user error
    report = labelstudio_report(tasks, accept_iou=getattr(args, "accept_iou", 0.99))
    markdown = labelstudio_markdown(report)
    out = getattr(args, "out", None)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / LS_SUMMARY_JSON,
                      json.dumps({k: v for k, v in report.items() if k != "regions"}, indent=1) + "\n")
        _write_atomic(out / LS_SUMMARY_MD, markdown)
        _write_atomic(out / LS_REGIONS, "".join(json.dumps(r) + "\n" for r in report["regions"]))
    print(markdown)
    return 0
