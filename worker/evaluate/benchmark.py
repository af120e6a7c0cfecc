"""A benchmark run: the method over a dataset's samples, one resumable result line per sentence, and
the summary files (the protocol of HYBRIDGL.md section 7; files described in the package docstring)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from worker.evaluate import EvaluateError
from worker.evaluate.files import open_run, read_results, write_atomic
from worker.evaluate.metrics import summarize, summary_markdown
from worker.evaluate.phrasecut import load_phrasecut
from worker.evaluate.refer import DEFAULT_SPLIT_BY, load_refer
from worker.evaluate.samples import Sample, ground_truth, load_rgb

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def _benchmark_settings(args: argparse.Namespace, dataset: str):
    """The method's settings (flags, else HYBRIDGL_* variables, else defaults); PhraseCut gets the
    paper's phrasecut SAM preset unless a preset was chosen explicitly."""
    from worker.hybridgl.settings import env_name, settings_from_args

    settings = settings_from_args(args)
    explicit = getattr(args, "sam_preset", None) is not None or os.environ.get(env_name("sam_preset"))
    if dataset == "phrasecut" and not explicit and settings.sam_preset != "phrasecut":
        settings = settings.replace(sam_preset="phrasecut")
    return settings


def run_benchmark(args: argparse.Namespace) -> int:
    dataset = args.dataset
    if getattr(args, "data_dir", None) is None:
        raise EvaluateError("--data-dir is required with --dataset (the annotation folder)")
    if getattr(args, "out", None) is None:
        raise EvaluateError("--out is required with --dataset (results.jsonl, summary.json, summary.md go there)")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 0:
        raise EvaluateError("--limit must be 0 or more")
    if dataset == "phrasecut":
        split = args.split or "test"
        split_by = None
        samples = load_phrasecut(args.data_dir, split, args.images)
    else:
        split = args.split or "val"
        split_by = args.split_by or DEFAULT_SPLIT_BY[dataset]
        if args.images is None:
            raise EvaluateError("--images is required for REFER datasets (the COCO train2014 image folder)")
        samples = load_refer(args.data_dir, dataset, split_by, split, args.images, args.sentence_field)

    identity = {"dataset": dataset, "split": split, "split_by": split_by,
                "sentence_field": args.sentence_field if dataset != "phrasecut" else None,
                "gt_overlap": args.gt_overlap if dataset != "phrasecut" else None}
    settings = _benchmark_settings(args, dataset)
    run = open_run(Path(args.out), identity, settings)
    done, out, results_path = run.done, run.out, run.results_path
    selected = samples if limit is None else samples[:limit]
    todo = [s for s in selected if s.key not in done]

    run_info = run.previous or {**identity, "model_version": None, "settings": None}
    if todo:
        from worker.hybridgl.pipeline import HybridGL

        pipeline = HybridGL(settings)
        run_info = run.start(settings, pipeline.model_version)
        print(f"hybridgl evaluate: {dataset} {split_by or ''} {split}: {len(todo)} sentences to do "
              f"({len(done)} already in {results_path}), model_version {pipeline.model_version}",
              file=sys.stderr)
        evaluate_samples(pipeline, todo, results_path, overlap=args.gt_overlap,
                         index_cache=getattr(args, "index_cache", None),
                         progress=getattr(args, "progress", True), previous=done.values())
    records = read_results(results_path)
    summary = summarize(records.values(), run_info, split_sentences=len(samples))
    write_atomic(out / SUMMARY_JSON, json.dumps(summary, indent=1) + "\n")
    markdown = summary_markdown(summary)
    write_atomic(out / SUMMARY_MD, markdown)
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
                raise EvaluateError(f"image {group[0].image_path} is {w}x{h} but the annotations say "
                                    f"{group[0].size[1]}x{group[0].size[0]}: wrong image folder or file?")
            index = cached_index(pipeline, rgb, index_cache)
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
    """Store an index for ``--index-cache`` (``to_bytes`` leaves SAM's embedding out: point refinement is not
    used here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(index.to_bytes())
    os.replace(tmp, path)


def cached_index(pipeline, rgb: np.ndarray, cache_dir: Path | None):
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
