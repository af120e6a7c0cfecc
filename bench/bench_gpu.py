"""Index build per step, query and one worker's pre-labelling compute on a device, per precision.

    .venv/bin/python bench/bench_gpu.py [--device cuda] [--sam-model vit_h] [--precisions fp32,fp16]
                                        [--repeats 5] [--queries 20] [--images 20] [--threads 2]

Prepared for a GPU (issue 10's targets there: index <= 0.4 s, query <= 20 ms, >= 150 images per
minute); runs anywhere (``--device cpu --sam-model vit_t`` checks its plumbing in a few minutes).
Models: SAM (ViT-H by default) and the ViT-B/16 CLIP architecture, both with seeded random weights
(speed does not depend on them, and no weights file is needed), built and run by the production
code (``HybridGL``). Photo: the SAM demo truck at 1080x810, as bench/bench_index.py.

Figures, each a median:
- index build per step (proposals, views, regions, GEM) and in total, ``--repeats`` builds, once
  with SAM's proposals and once with 22 given masks (random SAM weights propose about one mask, see
  RANDOM_WEIGHTS_THRESHOLDS), and their sum: SAM's step plus the CLIP steps for 22 masks;
- a query on the built index, ``--queries`` new expressions (text encoding included);
- images per minute of one worker's compute: ``--images`` distinct images (one marker pixel
  each, so nothing is shared), each indexed and queried once, as a pre-labelling job does after
  its download (download and Label Studio are left out: bench/bench_prelabel.py measures them).
Each step ends with its result copied to the CPU, so the step times include the device's work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_index import EXPRESSIONS, photo  # noqa: E402
from worker.hybridgl.models import Models, _sam_registry, build_clip_model, pick_device, pick_dtype  # noqa: E402
from worker.hybridgl.pipeline import HybridGL  # noqa: E402
from worker.hybridgl.proposals import PRESETS  # noqa: E402
from worker.hybridgl.settings import Settings  # noqa: E402
from worker.weights_command import OPENAI_CLIP  # noqa: E402


# Random weights predict IoUs near 0 and mask logits within +-0.5: with the refcoco preset's thresholds no mask
# would pass the IoU filter and SAM's upscaling and post-processing would be skipped. Scaled to them, most
# masks pass it and SAM does the work it does with real weights, but nearly all are the whole image and NMS
# leaves one; so the CLIP steps are timed again on SYNTHETIC_MASKS given masks, as many as real MobileSAM
# proposes for this photo.
RANDOM_WEIGHTS_THRESHOLDS = dict(pred_iou_thresh=0.02, stability_score_thresh=0.5, stability_score_offset=0.05)
SYNTHETIC_MASKS = 22


def synthetic_masks(h: int, w: int, count: int) -> np.ndarray:
    """``count`` discs of assorted sizes spread over the image (N, H, W) bool."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for _ in range(count):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.4) * min(h, w)
        masks.append((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    return np.stack(masks)


def random_models(sam_model: str, device: torch.device, dtype: torch.dtype) -> Models:
    import open_clip

    torch.manual_seed(0)
    sam = _sam_registry(sam_model)[sam_model](checkpoint=None).eval().to(device, torch.float32)
    clip = build_clip_model(OPENAI_CLIP).eval().to(device)
    return Models(sam, clip, open_clip.get_tokenizer(OPENAI_CLIP), device, dtype,
                  {"sam": f"{sam_model}:random", "clip": f"{OPENAI_CLIP}:random"})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sam-model", default="vit_h", choices=("vit_h", "vit_l", "vit_b", "vit_t"))
    ap.add_argument("--precisions", default="fp32,fp16", help="CLIP precisions, comma-separated")
    ap.add_argument("--repeats", type=int, default=5, help="index builds timed per precision")
    ap.add_argument("--queries", type=int, default=20, help="new expressions timed on the built index")
    ap.add_argument("--images", type=int, default=20, help="distinct images for the throughput figure")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device {device} ({name}); torch {torch.__version__}; SAM {args.sam_model} + CLIP {OPENAI_CLIP}, "
          f"random weights; refcoco preset, thresholds scaled to random weights")
    PRESETS["refcoco"] = {**PRESETS["refcoco"], **RANDOM_WEIGHTS_THRESHOLDS}
    rgb = photo()
    models = random_models(args.sam_model, device, torch.float32)
    for precision in args.precisions.split(","):
        dtype = pick_dtype(precision, device)
        settings = Settings(sam_model=args.sam_model, clip_model=OPENAI_CLIP, device=str(device), precision=precision)
        pipeline = HybridGL(settings, replace(models, dtype=dtype))
        pipeline.index(rgb)  # warm-up: kernels chosen, memory pools filled
        print(f"\n--- {precision} ({dtype})")
        given = synthetic_masks(*rgb.shape[:2], SYNTHETIC_MASKS)
        for label, proposals in (("SAM's proposals", None), (f"{SYNTHETIC_MASKS} given masks", given)):
            runs = []
            for _ in range(args.repeats):
                timings: dict[str, float] = {}
                synchronize(device)
                start = time.perf_counter()
                index = pipeline.index(rgb, proposals, timings=timings)
                synchronize(device)
                timings["total"] = time.perf_counter() - start
                runs.append(timings)
            steps = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"index with {label} ({len(index)} masks), medians of {args.repeats}: "
                  + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in steps.items()))
            if proposals is None:
                sam_step = steps["proposals"]
        clip_steps = steps["views"] + steps["regions"] + steps["gem"]
        print(f"index estimate: SAM's proposals {sam_step * 1000:.0f} ms + CLIP steps with {SYNTHETIC_MASKS} masks "
              f"{clip_steps * 1000:.0f} ms = {(sam_step + clip_steps) * 1000:.0f} ms (target <= 400 ms)")

        query_times = []
        for expression in EXPRESSIONS[: args.queries]:
            pipeline._text_cache.clear()  # each query a new expression: text encoding included
            start = time.perf_counter()
            pipeline.query(index, expression)
            query_times.append(time.perf_counter() - start)
        print(f"query: p50 {statistics.median(query_times) * 1000:.1f} ms, max {max(query_times) * 1000:.1f} ms "
              f"over {len(query_times)} new expressions (target p50 <= 20 ms)")

        images = []
        for k in range(args.images):
            image = rgb.copy()
            image[0, k] = 255 - image[0, k]
            images.append(image)
        start = time.perf_counter()
        for k, image in enumerate(images):
            pipeline.query(pipeline.index(image), EXPRESSIONS[k % len(EXPRESSIONS)])
        seconds = time.perf_counter() - start
        print(f"one worker's compute: {60 * len(images) / seconds:.1f} images/minute ({len(images)} distinct "
              f"images indexed and queried in {seconds:.1f} s; target >= 150)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
