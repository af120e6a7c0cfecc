"""`hybridgl prelabel --preview N --out DIR`: look at the predictions before the big run.

Runs N tasks chosen evenly over the project (first and last included) through the workers with
``deliver="return"``, so nothing is written to Label Studio, and writes ``DIR/index.html``: one
self-contained page (images and masks inlined) with each image, its regions drawn with their
labels and scores, and the thresholds in force, so that a team can tune the label thresholds
(``<Label hybridgl_threshold=...>``, ``HYBRIDGL_INSTANCE_THRESHOLD``) before pre-labeling
everything. ``DIR/preview.json`` has the same content for scripts.

Light like the rest of ``backend``: numpy and Pillow, no torch, nothing from ``worker``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from backend import jobspec as js
from backend.labeling import LabelingConfig
from backend.prompts import PromptError, build_request

PAGE_WIDTH = 720  # pixels an image is shown at (inlined at this size: the page stays small)
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
          "#fabed4", "#469990", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075")


def spread(ids: list[int], n: int) -> list[int]:
    """``n`` of ``ids`` evenly spaced over the list, first and last included (all when n >= len)."""
    if n >= len(ids):
        return list(ids)
    if n == 1:
        return [ids[0]]
    return [ids[round(k * (len(ids) - 1) / (n - 1))] for k in range(n)]


def run_preview(runner, config: LabelingConfig, label_config: str) -> int:
    """Predict ``runner.args.preview`` tasks, write the page; returns the exit code (0, or 1 if a task failed)."""
    args = runner.args
    out = Path(args.out)
    tasks = {t["id"]: t for t in runner.client.tasks(runner.project_id, task_ids=args.tasks)}
    chosen = spread(sorted(tasks), int(args.preview))
    runner.say(f"preview: {len(chosen)} of {len(tasks)} task(s), spread over the project; nothing is written to "
               "Label Studio")
    policy = runner.settings.label_names_policy()
    entries: list[dict[str, Any]] = []
    jobs: dict[str, dict] = {}
    digest = None
    for task_id in chosen:
        entry: dict[str, Any] = {"task_id": task_id, "regions": [], "error": None}
        entries.append(entry)
        try:
            req = build_request(tasks[task_id], None, config, label_names_as_prompts=policy)
        except PromptError as exc:
            entry["error"] = str(exc)
            continue
        if not req.expressions:
            entry["error"] = "nothing to segment (no prompt in the task, and label names are not used as prompts)"
            continue
        entry["image"] = req.image
        entry["expressions"] = [e.text for e in req.expressions]
        digest = digest or js.store_label_config(runner.conn, label_config)
        spec = js.prediction_job(
            model_version=runner.version, project=runner.project_key, task_id=task_id, image=req.image,
            expressions=[{"text": e.text, "label": e.label} for e in req.expressions], clicks=[], config=config,
            config_digest=digest, interactive=False, origin="preview")
        # On the batch queue (annotators' prompts keep priority), answered in the job's result only, and
        # always recomputed (the thresholds in the config may have just changed).
        spec = dataclasses.replace(spec, payload={**spec.payload, "deliver": js.Delivery.RETURN.value},
                                   job_id=f"preview-{uuid.uuid4().hex}", description=f"preview task {task_id}")
        runner.jobs.enqueue(spec)
        jobs[spec.job_id] = entry
    deadline = time.monotonic() + runner.settings.job_timeout * (1 + runner.settings.job_retries)
    outcomes = runner.jobs.wait(list(jobs), deadline) if jobs else {}
    thresholds: dict[str, float] = {}
    for job_id, entry in jobs.items():
        outcome = outcomes[job_id]
        if outcome.status != "finished":
            entry["error"] = outcome.error or "not finished in time"
            continue
        value = outcome.value or {}
        prediction = value.get("prediction") or {}
        entry["score"] = prediction.get("score")
        entry["regions"] = _regions(prediction.get("result") or [], config)
        thresholds.update(value.get("thresholds") or {})
        try:
            entry["picture"] = _picture(runner.client.fetch_image(entry["image"], entry["task_id"]))
        except Exception as exc:  # noqa: BLE001 - the page says why the image is missing
            entry["error"] = f"image: {exc}"
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text(render(runner.project_id, runner.version, entries, thresholds, config))
    (out / "preview.json").write_text(json.dumps({
        "project": runner.project_id, "model_version": runner.version, "thresholds": thresholds,
        "tasks": [{k: v for k, v in e.items() if k != "picture"} | {
            "regions": [{k: v for k, v in r.items() if k != "mask"} for r in e["regions"]]} for e in entries]},
        indent=1))
    failed = [e for e in entries if e["error"]]
    for entry in failed:
        runner.say(f"  task {entry['task_id']} failed: {entry['error']}")
    runner.say(f"preview written to {page} ({sum(len(e['regions']) for e in entries)} region(s) on "
               f"{len(entries) - len(failed)} image(s)" + (f"; {len(failed)} task(s) failed, see the page" if failed
                                                          else "") + ")")
    return 1 if failed else 0


def _regions(results: list[dict], config: LabelingConfig) -> list[dict]:
    """One entry per region: the results of the config's first output tag (the others repeat it)."""
    first = config.outputs[0].name if config.outputs else None
    regions = []
    for r in results:
        if r.get("from_name") != first:
            continue
        value = r.get("value") or {}
        labels = value.get(r.get("type"), []) or []
        region = {"label": labels[0] if labels else "", "score": r.get("score"), "kind": r.get("type"),
                  "width": r.get("original_width"), "height": r.get("original_height")}
        if r.get("type") == "brushlabels":
            from label_studio_sdk.converter.brush import decode_rle

            h, w = int(r["original_height"]), int(r["original_width"])
            region["mask"] = np.asarray(decode_rle(value["rle"])).reshape(h, w, 4)[:, :, 3] > 0
        elif r.get("type") == "polygonlabels":
            region["points"] = value.get("points") or []
        else:
            region["box"] = [value.get("x", 0), value.get("y", 0), value.get("width", 0), value.get("height", 0)]
        regions.append(region)
    return regions


def _picture(data: bytes) -> dict:
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = image.size
    scale = min(1.0, PAGE_WIDTH / w)
    shown = image.resize((max(1, round(w * scale)), max(1, round(h * scale))))
    buf = io.BytesIO()
    shown.save(buf, "JPEG", quality=85)
    return {"width": w, "height": h, "uri": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}


def _mask_uri(mask: np.ndarray, color: str, size: tuple[int, int]) -> str:
    from PIL import Image

    rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask] = (*rgb, 140)
    image = Image.fromarray(layer, "RGBA").resize(size, Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bounds(region: dict, w: int, h: int) -> tuple[float, float, float, float]:
    if "mask" in region:
        ys, xs = np.nonzero(region["mask"])
        return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    if "points" in region and region["points"]:
        xs = [p[0] * w / 100 for p in region["points"]]
        ys = [p[1] * h / 100 for p in region["points"]]
        return min(xs), min(ys), max(xs), max(ys)
    x, y, bw, bh = region.get("box") or (0, 0, 0, 0)
    return x * w / 100, y * h / 100, (x + bw) * w / 100, (y + bh) * h / 100


def _svg(entry: dict, colors: dict[str, str]) -> str:
    picture = entry["picture"]
    w, h = picture["width"], picture["height"]
    shown = (min(w, PAGE_WIDTH), round(h * min(1.0, PAGE_WIDTH / w)))
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{shown[0]}" height="{shown[1]}" role="img">',
             f'<image href="{picture["uri"]}" x="0" y="0" width="{w}" height="{h}"/>']
    for n, region in enumerate(entry["regions"]):
        color = colors.setdefault(region["label"], COLORS[len(colors) % len(COLORS)])
        x0, y0, x1, y1 = _bounds(region, w, h)
        score = region["score"]
        caption = f"{region['label'] or '(no label)'} {score:.2f}" if score is not None else region["label"]
        parts.append(f'<g class="region" data-label="{html.escape(region["label"])}" data-score="{score}">')
        if "mask" in region:
            parts.append(f'<image href="{_mask_uri(region["mask"], color, shown)}" x="0" y="0" width="{w}" '
                         f'height="{h}" preserveAspectRatio="none"/>')
        elif "points" in region:
            pts = " ".join(f"{p[0] * w / 100:.1f},{p[1] * h / 100:.1f}" for p in region["points"])
            parts.append(f'<polygon points="{pts}" fill="{color}" fill-opacity="0.5"/>')
        parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" fill="none" '
                     f'stroke="{color}" stroke-width="{max(w, h) / 300:.1f}"/>')
        font = max(w, h) / 40
        parts.append(f'<text x="{x0:.1f}" y="{max(y0 - font / 4, font):.1f}" font-size="{font:.1f}" fill="{color}" '
                     f'stroke="white" stroke-width="{font / 12:.2f}" paint-order="stroke">#{n + 1} '
                     f'{html.escape(caption)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def render(project: int, version: str | None, entries: list[dict], thresholds: dict[str, float],
           config: LabelingConfig) -> str:
    """The self-contained page."""
    colors: dict[str, str] = {}
    configured = dict(config.thresholds)
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{value:g}</td><td>"
                   f"{'label config' if name in configured else 'HYBRIDGL_INSTANCE_THRESHOLD'}</td></tr>"
                   for name, value in thresholds.items())
    blocks = []
    for entry in entries:
        head = f"task {entry['task_id']}"
        if entry.get("score") is not None:
            head += f" · prediction score {entry['score']:.3f}"
        body = []
        if entry["error"]:
            body.append(f'<p class="error">{html.escape(entry["error"])}</p>')
        if entry.get("picture"):
            body.append(_svg(entry, colors))
        if entry["regions"]:
            items = "".join(f"<li>#{n + 1} {html.escape(r['label'] or '(no label)')}: "
                            f"{'' if r['score'] is None else format(r['score'], '.3f')}</li>"
                            for n, r in enumerate(entry["regions"]))
            body.append(f"<ol>{items}</ol>")
        elif not entry["error"]:
            body.append("<p>no region: nothing asked for was found</p>")
        prompts = ", ".join(html.escape(t) for t in entry.get("expressions", []))
        blocks.append(f'<section class="task" data-task="{entry["task_id"]}" data-regions="{len(entry["regions"])}">'
                      f"<h2>{html.escape(head)}</h2><p class=\"prompts\">prompts: {prompts}</p>{''.join(body)}"
                      "</section>")
    table = (f"<table><tr><th>prompt</th><th>threshold</th><th>from</th></tr>{rows}</table>" if rows else
             "<p>no label name or plural prompt among these tasks: every region is HybridGL's single choice "
             "(score = its probability among the proposals)</p>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>HybridGL preview: project {project}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}section{{margin:1.5em 0}}svg{{display:block;border:1px solid #ccc}}
.error{{color:#b00}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}</style></head>
<body><h1>Preview of project {project}</h1>
<p>model_version {html.escape(str(version))} · {len(entries)} task(s) · nothing was written to Label Studio.
A region's score is the confidence of its decision; the prediction's score is its least confident region.</p>
<h2>Thresholds in force</h2>{table}
{''.join(blocks)}
</body></html>
"""
