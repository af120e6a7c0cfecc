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

Modules: ``refer`` and ``phrasecut`` read the two dataset formats into ``samples.Sample``s;
``masks`` rasterizes their ground truth (COCO's with pycocotools); ``metrics`` computes oIoU/mIoU and
the summaries; ``files`` is the resumable run folder both model-running modes share (``run.json``,
``results.jsonl``); ``benchmark`` runs the method over samples; ``labelstudio_report`` is
the export mode; ``instances`` is the instance mode (``--coco-instances``, ``--labelstudio-export
--instances``: every instance of each label, see its docstring). This package's ``add_arguments(parser)`` adds the command's options and imports
nothing heavy; ``run(args)`` does the work (the method's settings come from
``worker.hybridgl.settings.settings_from_args``: flags when the parser has them, else ``HYBRIDGL_*``
variables, else defaults).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from worker.hybridgl.errors import UserError

DATASETS = ("refcoco", "refcoco+", "refcocog", "phrasecut")


class EvaluateError(UserError, ValueError):
    """The command's input (flags, annotation files, images, output folder) cannot be used as given."""


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
    from worker.evaluate.instances import add_arguments as add_instance_arguments

    add_instance_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``hybridgl evaluate``: a benchmark run (``--dataset``), a Label Studio export report, or instances."""
    from worker.evaluate import instances

    if instances.wanted(args):
        return instances.run(args)
    if getattr(args, "labelstudio_export", None):
        if getattr(args, "dataset", None):
            raise EvaluateError("--labelstudio-export and --dataset are separate modes: give one of them")
        from worker.evaluate.labelstudio_report import run_labelstudio

        return run_labelstudio(args)
    if not getattr(args, "dataset", None):
        raise EvaluateError("give --dataset (refcoco, refcoco+, refcocog, phrasecut) for a benchmark, "
                            "or --labelstudio-export EXPORT_JSON to measure pre-labeling on your own data")
    from worker.evaluate.benchmark import run_benchmark

    return run_benchmark(args)


# The package's public names, imported on first use so that building the command line stays light.
_EXPORTS = {
    "masks": ("coco_polygon_mask", "coco_segmentation_mask", "phrasecut_mask"),
    "samples": ("Sample", "ground_truth", "load_rgb"),
    "refer": ("load_refs", "load_refer"),
    "phrasecut": ("load_phrasecut",),
    "metrics": ("iou_metrics", "summarize", "summary_markdown"),
    "benchmark": ("run_benchmark", "evaluate_samples", "read_results", "index_cache_path", "save_index"),
    "labelstudio_report": ("labelstudio_mask", "labelstudio_regions", "match_regions", "labelstudio_report",
                           "labelstudio_markdown", "run_labelstudio"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["DATASETS", "add_arguments", "run", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
