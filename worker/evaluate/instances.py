"""``hybridgl evaluate`` instance mode: every instance of each label, measured.

Two sources of truth, the same measures:

- ``--coco-instances ANNOTATIONS.json --images DIR --out OUT``: COCO-format instance annotations
  (``images``, ``annotations`` with polygon or RLE ``segmentation`` and ``iscrowd``,
  ``categories``); each category name is a prompt, all of them classified at once per image as
  label-name prompts are in pre-labeling (``HybridGL.instances``). Resumable like the benchmarks:
  ``results.jsonl`` gets one line per image as it goes, ``run.json`` refuses another annotation
  file or other settings, ``summary.json`` / ``summary.md`` are rewritten at the end.
- ``--labelstudio-export EXPORT.json --instances``: a Label Studio export whose tasks have a
  prediction and an annotation made from it: the prediction's regions (with their scores) against
  the annotation's (the corrected truth). No model is loaded.

Measures, per label and overall, with a predicted region matching an unmatched true one of the same
label at mask IoU >= 0.5, most confident first (COCO's rule; a prediction matching a crowd region,
by intersection over the prediction's area >= 0.5, is ignored):
precision and recall of the regions kept; mask AP50 (COCO's 101-point interpolated precision over
the predictions' scores); presence precision and recall (per image and label: predicted present =
at least one region, truly present = at least one true region); and the threshold on a label's
scores that gives the best F1, for tuning ``hybridgl_threshold`` (meaningful when the run kept
low-scoring regions, e.g. ``--instance-threshold 0``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.evaluate import EvaluateError
from worker.evaluate.files import open_run, read_results, write_atomic
from worker.evaluate.labelstudio_report import LS_KINDS, base_id, pick_annotation, labelstudio_regions

RESULTS_FILE, RUN_FILE, SUMMARY_JSON, SUMMARY_MD = "results.jsonl", "run.json", "summary.json", "summary.md"

IOU = 0.5
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("instances: every instance of each label (precision, recall, AP50, presence)")
    group.add_argument("--coco-instances", dest="coco_instances", type=Path, metavar="ANNOTATIONS_JSON",
                       help="COCO instance annotations; category names are the prompts (with --images, --out; "
                            "--limit counts images)")
    group.add_argument("--instances", action="store_true",
                       help="with --labelstudio-export: measure the predictions' regions against the annotations "
                            "as instances (precision, recall, AP50, presence per label)")


def wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "coco_instances", None) or getattr(args, "instances", False))


def run(args: argparse.Namespace) -> int:
    if getattr(args, "coco_instances", None):
        if getattr(args, "dataset", None) or getattr(args, "labelstudio_export", None):
            raise EvaluateError("--coco-instances is a mode of its own: leave out --dataset and --labelstudio-export")
        return run_coco(args)
    if not getattr(args, "labelstudio_export", None):
        raise EvaluateError("--instances measures a Label Studio export: give --labelstudio-export EXPORT_JSON")
    return run_labelstudio(args)


# --- matching and measures -----------------------------------------------------------------------

def match(predicted: list[tuple[float, np.ndarray]], truth: list[np.ndarray],
          crowd: list[np.ndarray] = ()) -> list[list[float]]:
    """One label on one image: ``[[score, outcome], ...]`` most confident first; outcome 1 = true
    positive, 0 = false positive, -1 = ignored (matches a crowd region)."""
    order = sorted(range(len(predicted)), key=lambda i: -predicted[i][0])
    used = [False] * len(truth)
    areas = [int(t.sum()) for t in truth]
    out = []
    for i in order:
        score, mask = predicted[i]
        best, best_iou = -1, IOU
        for j, t in enumerate(truth):
            if used[j]:
                continue
            inter = int(np.logical_and(mask, t).sum())
            union = int(mask.sum()) + areas[j] - inter
            iou = inter / union if union else 0.0
            if iou >= best_iou:
                best, best_iou = j, iou
        if best >= 0:
            used[best] = True
            out.append([float(score), 1])
            continue
        area = int(mask.sum())
        ignored = any(area and np.logical_and(mask, c).sum() / area >= IOU for c in crowd)
        out.append([float(score), -1 if ignored else 0])
    return out


def ap50(scored: list[list[float]], n_truth: int) -> float | None:
    """COCO-style 101-point interpolated average precision (None without true regions)."""
    if n_truth == 0:
        return None
    kept = sorted((p for p in scored if p[1] >= 0), key=lambda p: -p[0])
    if not kept:
        return 0.0
    tp = np.cumsum([p[1] for p in kept])
    precision = tp / np.arange(1, len(kept) + 1)
    recall = tp / n_truth
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this recall or more
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.mean([envelope[k] if k < len(envelope) else 0.0 for k in at]))


def best_f1_threshold(scored: list[list[float]], n_truth: int) -> dict | None:
    kept = sorted((p for p in scored if p[1] >= 0), key=lambda p: -p[0])
    if not kept or n_truth == 0:
        return None
    tp = np.cumsum([p[1] for p in kept])
    n = np.arange(1, len(kept) + 1)
    f1 = 2 * tp / (n + n_truth)
    k = int(np.argmax(f1))
    return {"threshold": kept[k][0], "f1": float(f1[k]), "precision": float(tp[k] / n[k]),
            "recall": float(tp[k] / n_truth)}


def summarize(records: list[dict]) -> dict:
    """Per-label and overall measures from per-image lines ``{"labels": {name: {"gt", "pred"}}}``."""
    per: dict[str, dict[str, Any]] = {}
    for record in records:
        for name, item in record["labels"].items():
            acc = per.setdefault(name, {"gt": 0, "pred": [], "present_pred": 0, "present_gt": 0, "present_both": 0})
            acc["gt"] += item["gt"]
            acc["pred"] += item["pred"]
            predicted, true = bool(item["pred"]), item["gt"] > 0
            acc["present_pred"] += predicted
            acc["present_gt"] += true
            acc["present_both"] += predicted and true
    labels = {}
    for name in sorted(per):
        acc = per[name]
        tp = sum(1 for p in acc["pred"] if p[1] == 1)
        fp = sum(1 for p in acc["pred"] if p[1] == 0)
        labels[name] = {
            "true_regions": acc["gt"], "predicted_regions": tp + fp, "true_positives": tp,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / acc["gt"] if acc["gt"] else None,
            "AP50": ap50(acc["pred"], acc["gt"]),
            "presence_precision": acc["present_both"] / acc["present_pred"] if acc["present_pred"] else None,
            "presence_recall": acc["present_both"] / acc["present_gt"] if acc["present_gt"] else None,
            "best_f1": best_f1_threshold(acc["pred"], acc["gt"]),
        }
    sums = {k: sum(per[n][k] for n in per) for k in ("gt", "present_pred", "present_gt", "present_both")}
    tp = sum(v["true_positives"] for v in labels.values())
    predicted = sum(v["predicted_regions"] for v in labels.values())
    aps = [v["AP50"] for v in labels.values() if v["AP50"] is not None]
    overall = {
        "images": len(records), "true_regions": sums["gt"], "predicted_regions": predicted, "true_positives": tp,
        "precision": tp / predicted if predicted else None, "recall": tp / sums["gt"] if sums["gt"] else None,
        "mAP50": float(np.mean(aps)) if aps else None,
        "presence_precision": sums["present_both"] / sums["present_pred"] if sums["present_pred"] else None,
        "presence_recall": sums["present_both"] / sums["present_gt"] if sums["present_gt"] else None,
    }
    return {"overall": overall, "labels": labels}


def markdown(summary: dict, title: str) -> str:
    def f(v):
        return "-" if v is None else f"{100 * v:.1f}"

    o = summary["overall"]
    lines = [f"# {title}", "",
             f"{o['images']} images, {o['true_regions']} true regions, {o['predicted_regions']} predicted; "
             f"mask IoU >= {IOU} for a match.", "",
             "| label | true | predicted | precision | recall | AP50 | presence P | presence R | best-F1 threshold |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, v in summary["labels"].items():
        best = v["best_f1"]
        lines.append(f"| {name} | {v['true_regions']} | {v['predicted_regions']} | {f(v['precision'])} | "
                     f"{f(v['recall'])} | {f(v['AP50'])} | {f(v['presence_precision'])} | "
                     f"{f(v['presence_recall'])} | {'-' if best is None else format(best['threshold'], '.3f')} |")
    lines.append(f"| **all** | {o['true_regions']} | {o['predicted_regions']} | {f(o['precision'])} | "
                 f"{f(o['recall'])} | {f(o['mAP50'])} (mean) | {f(o['presence_precision'])} | "
                 f"{f(o['presence_recall'])} | |")
    return "\n".join(lines) + "\n"


def _write(out: Path | None, summary: dict, title: str, extra: dict | None = None) -> str:
    text = markdown(summary, title)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / SUMMARY_JSON, json.dumps({**(extra or {}), **summary}, indent=1) + "\n")
        write_atomic(out / SUMMARY_MD, text)
    return text


# --- COCO instances ------------------------------------------------------------------------------

def load_coco(path: Path) -> tuple[list[dict], dict[int, str], dict[int, list[dict]]]:
    """(images in file order, category id -> name, image id -> annotations); clear errors on a bad file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (--coco-instances)") from None
    except json.JSONDecodeError as exc:
        raise EvaluateError(f"{path} is not JSON ({exc})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)] \
        if isinstance(data, dict) else ["images", "annotations", "categories"]
    if missing:
        raise EvaluateError(f"{path} is not COCO instance annotations: it lacks the list(s) {', '.join(missing)}")
    categories = {}
    for c in data["categories"]:
        name = str(c.get("name", "")).strip()
        if not name:
            raise EvaluateError(f"{path}: category {c.get('id')} has no name, and names are the prompts")
        categories[int(c["id"])] = name
    if not categories:
        raise EvaluateError(f"{path} has no categories: nothing to prompt for")
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        if int(a["category_id"]) not in categories:
            raise EvaluateError(f"{path}: annotation {a.get('id')} has category {a['category_id']}, not in categories")
        by_image.setdefault(int(a["image_id"]), []).append(a)
    return data["images"], categories, by_image


def run_coco(args: argparse.Namespace) -> int:
    if getattr(args, "images", None) is None or getattr(args, "out", None) is None:
        raise EvaluateError("--coco-instances needs --images (the image folder) and --out (results go there)")
    images, categories, by_image = load_coco(args.coco_instances)
    names = list(dict.fromkeys(categories.values()))
    limit = getattr(args, "limit", None)
    selected = images if limit is None else images[:limit]
    from worker.hybridgl.settings import settings_from_args

    settings = settings_from_args(args)
    run = open_run(Path(args.out), {"mode": "coco-instances", "annotations": str(Path(args.coco_instances).resolve())},
                   settings)
    out, run_path, results_path = run.out, run.run_path, run.results_path
    todo = [im for im in selected if str(im["id"]) not in run.done]
    if todo:
        from tqdm import tqdm

        from worker.hybridgl.pipeline import HybridGL

        pipeline = HybridGL(settings)
        run.start(settings, pipeline.model_version, prompts=names)
        with open(results_path, "a", encoding="utf-8") as f:
            for image in tqdm(todo, unit="img", desc="instances", disable=not getattr(args, "progress", True),
                              file=sys.stderr):
                line = evaluate_image(pipeline, image, Path(args.images), names, categories,
                                      by_image.get(int(image["id"]), []), getattr(args, "index_cache", None))
                f.write(json.dumps(line) + "\n")
                f.flush()
    records = list(read_results(results_path).values())
    summary = summarize(records)
    text = _write(out, summary, f"Instances: {Path(args.coco_instances).name}",
                  {"run": json.loads(run_path.read_text()) if run_path.is_file() else None})
    print(text)
    return 0


def evaluate_image(pipeline, image: dict, folder: Path, names: list[str], categories: dict[int, str],
                   annotations: list[dict], index_cache: Path | None) -> dict:
    from worker.evaluate.benchmark import cached_index
    from worker.evaluate.masks import coco_segmentation_mask
    from worker.evaluate.samples import load_rgb

    rgb = load_rgb(folder / image["file_name"])
    h, w = rgb.shape[:2]
    if (image.get("height"), image.get("width")) not in ((h, w), (None, None)):
        raise EvaluateError(f"image {image['file_name']} is {w}x{h} but the annotations say "
                            f"{image.get('width')}x{image.get('height')}: wrong image folder or file?")
    index = cached_index(pipeline, rgb, index_cache)
    answer = pipeline.instances(index, names)
    masks = index.masks.numpy()
    predicted: dict[str, list] = {n: [] for n in names}
    for found in answer.instances:
        predicted[names[found.target]].append((found.score, masks[found.index]))
    truth: dict[str, list] = {n: [] for n in names}
    crowd: dict[str, list] = {n: [] for n in names}
    for a in annotations:
        mask = coco_segmentation_mask(a["segmentation"], h, w)
        (crowd if a.get("iscrowd") else truth)[categories[int(a["category_id"])]].append(mask)
    labels = {n: {"gt": len(truth[n]), "pred": match(predicted[n], truth[n], crowd[n])} for n in names}
    return {"key": str(image["id"]), "image_id": image["id"], "file_name": image["file_name"],
            "proposals": len(masks), "labels": labels, "t": round(time.time(), 3)}


# --- a Label Studio export -----------------------------------------------------------------------

def run_labelstudio(args: argparse.Namespace) -> int:
    path = Path(args.labelstudio_export)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (--labelstudio-export)") from None
    if not isinstance(tasks, list):
        raise EvaluateError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    summary = summarize(labelstudio_records(tasks))
    out = getattr(args, "out", None)
    print(_write(Path(out) if out else None, summary, f"Instances: {path.name}"))
    return 0


def labelstudio_records(tasks: list[dict]) -> list[dict]:
    """Per task with a prediction and a submitted annotation: its regions against the annotation's, on
    the output tag of the prediction's first region (a region is repeated once per output tag)."""
    records = []
    for task in tasks:
        predictions = [p for p in task.get("predictions") or [] if p.get("result")]
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not predictions or not annotations:
            continue
        prediction = predictions[-1]
        annotation = pick_annotation(annotations, prediction)
        where = f"task {task.get('id')}"
        tag = next((r.get("from_name") for r in prediction["result"] if r.get("type") in LS_KINDS), None)
        scores = {base_id(r.get("id")): r.get("score", prediction.get("score")) for r in prediction["result"]}
        predicted = [r for r in labelstudio_regions(prediction["result"], where) if r.from_name == tag]
        truth = [r for r in labelstudio_regions(annotation.get("result") or [], where) if r.from_name == tag]
        labels = {}
        for name in {r.label for r in predicted} | {r.label for r in truth}:
            mine = [(float(scores.get(r.id) if scores.get(r.id) is not None else 1.0), r.mask)
                    for r in predicted if r.label == name]
            true = [r.mask for r in truth if r.label == name]
            labels[name] = {"gt": len(true), "pred": match(mine, true)}
        records.append({"key": str(task.get("id")), "labels": labels})
    return records
