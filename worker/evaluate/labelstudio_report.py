"""``hybridgl evaluate --labelstudio-export``: what pre-labeling saved annotators, from a Label
Studio JSON export (predictions compared with the submitted annotations, region by region). No model."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.evaluate import EvaluateError
from worker.evaluate.files import write_atomic

LS_SUMMARY_JSON = "labelstudio_summary.json"
LS_SUMMARY_MD = "labelstudio_summary.md"
LS_REGIONS = "labelstudio_regions.jsonl"
LS_KINDS = {"brushlabels": "brush", "brush": "brush", "polygonlabels": "polygon", "polygon": "polygon",
             "rectanglelabels": "rectangle", "rectangle": "rectangle"}
NO_LABEL = "(no label)"


@dataclass
class Region:
    id: str | None
    from_name: str
    kind: str
    label: str
    mask: np.ndarray = field(repr=False)


def base_id(rid: Any) -> str | None:
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
            raise EvaluateError(f"brush value in format {value.get('format')!r}: only 'rle' is supported")
        from label_studio_sdk.converter.brush import decode_rle

        flat = np.asarray(decode_rle(value["rle"]))
        if flat.size != w * h * 4:
            raise EvaluateError(f"brush RLE holds {flat.size} values; a {w}x{h} RGBA image has {w * h * 4}")
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
    raise EvaluateError(f"unsupported region kind {kind!r}")


def labelstudio_regions(result: list[dict], where: str = "") -> list[Region]:
    """Brush, polygon and rectangle regions of a result list (others, e.g. choices or text, are
    ignored). The label is the value's ``brushlabels``/``polygonlabels``/``rectanglelabels``, or a
    ``labels`` result with the same id (a separate <Labels> tag)."""
    labels_by_id: dict[str, list[str]] = {}
    for item in result or []:
        if item.get("type") == "labels":
            labels_by_id[base_id(item.get("id"))] = list((item.get("value") or {}).get("labels") or [])
    regions = []
    for item in result or []:
        rtype = item.get("type")
        kind = LS_KINDS.get(rtype)
        if kind is None:
            continue
        value = item.get("value") or {}
        rid = base_id(item.get("id"))
        labels = list(value.get(rtype) or []) if rtype.endswith("labels") else []
        labels = labels or labels_by_id.get(rid, [])
        width, height = item.get("original_width"), item.get("original_height")
        if not width or not height:
            raise EvaluateError(f"{where}: a {rtype} result without original_width/original_height")
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


def pick_annotation(annotations: list[dict], prediction: dict) -> dict:
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
            annotation = pick_annotation(annotations, prediction)
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
            raise EvaluateError(f"{path} is not JSON ({exc}): export the project with Export > JSON") from None
    if not isinstance(tasks, (list, dict)):
        raise EvaluateError(f"{path} is not a Label Studio JSON export (a list of tasks)")  # noqa: TRY004 - a user error
    report = labelstudio_report(tasks, accept_iou=getattr(args, "accept_iou", 0.99))
    markdown = labelstudio_markdown(report)
    out = getattr(args, "out", None)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / LS_SUMMARY_JSON,
                      json.dumps({k: v for k, v in report.items() if k != "regions"}, indent=1) + "\n")
        write_atomic(out / LS_SUMMARY_MD, markdown)
        write_atomic(out / LS_REGIONS, "".join(json.dumps(r) + "\n" for r in report["regions"]))
    print(markdown)
    return 0
