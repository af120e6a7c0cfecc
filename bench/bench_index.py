"""Index and query speed of the pipeline, against the plain and the official ways, in one run.

    .venv/bin/python bench/bench_index.py [--precisions fp32,auto] [--repeats 3] [--k 5] [--queries 20] [--threads 2]

Models: real MobileSAM and the real ViT-B/16 architecture with random weights (speed does not
depend on the weights), both loaded by the production code from the test weights
(`hybridgl weights --test-weights .cache/test-weights` makes them). Photo: the SAM demo truck
cropped to 4:3 and resized to 1080x810.

Compared, all measured here in the same process:
- ours: ``HybridGL.index`` (our proposal generator, views from bilinear taps, the chosen
  precision), then queries on the built index;
- plain: segment-anything's stock generator, views composed at full resolution, fp32;
- official: what the release does per expression: the plain index rebuilt for every expression.

Index builds of the plain way and ours alternate, ``--repeats`` times, and per-step medians are
reported, so that other work on the machine weighs on both alike (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.hybridgl.gem import gem_patch_features  # noqa: E402
from worker.hybridgl.image_index import ImageIndex  # noqa: E402
from worker.hybridgl.models import pick_dtype  # noqa: E402
from worker.hybridgl.pipeline import HybridGL  # noqa: E402
from worker.hybridgl.proposals import PRESETS  # noqa: E402
from worker.hybridgl.regions import (  # noqa: E402
    ViewBuilder,
    compose_views_full,
    hybrid_features,
    mask_weights,
    plain_hybrid_features,
)
from worker.hybridgl.settings import Settings  # noqa: E402
from worker.weights_command import OPENAI_CLIP, prepare_test_weights  # noqa: E402

EXPRESSIONS = [
    "the truck on the left", "front wheel of the truck", "the window above the door", "the bigger tire",
    "sky", "the man in the white shirt on the left", "bottom right corner", "the smaller wheel under the truck",
    "a tree behind the truck", "the red door", "the mirror", "the ground in front of the truck",
    "the cabin of the truck", "the left most wheel", "the shadow under the truck", "top of the truck",
    "the bumper", "the rear wheel", "the building behind", "the headlight on the right",
]


def photo() -> np.ndarray:
    image = Image.open(REPO / "tests" / "data" / "truck.jpg").convert("RGB")
    return np.asarray(image.crop((100, 0, 1700, 1200)).resize((1080, 810), Image.BICUBIC))


def plain_index(pipeline: HybridGL, rgb: np.ndarray, timings: dict) -> ImageIndex:
    """The plain way: stock SAM generator, full-resolution views, fp32 everywhere."""
    from segment_anything import SamAutomaticMaskGenerator

    from worker.hybridgl.image_index import boxes_from_masks

    s = pipeline.settings
    visual = pipeline.models.clip.visual
    t0 = time.perf_counter()
    generated = SamAutomaticMaskGenerator(pipeline.models.sam, **PRESETS[s.sam_preset]).generate(rgb)
    masks = torch.from_numpy(np.stack([g["segmentation"] for g in generated]))
    t1 = time.perf_counter()
    local, global_ = compose_views_full(rgb, masks, s.view_size, s.blur_kernel, s.normalization)
    t2 = time.perf_counter()
    feats = plain_hybrid_features(visual, local, global_, mask_weights(masks, visual.grid_size[0]),
                                  s.masking_block, s.fusion_weight)
    t3 = time.perf_counter()
    gem = gem_patch_features(visual, rgb, s.gem_size, s.gem_blocks, s.gem_ss_iters, torch.float32)
    t4 = time.perf_counter()
    timings.update(proposals=t1 - t0, views=t2 - t1, regions=t3 - t2, gem=t4 - t3)
    return ImageIndex(key="plain", image_size=rgb.shape[:2], masks=masks, boxes=boxes_from_masks(masks),
                      features=feats, gem_features=gem)


def roofline(pipeline: HybridGL, rgb: np.ndarray, masks: torch.Tensor, seconds: float) -> None:
    """How close the fp32 region features come to this CPU's fp32 matmul rate: their floating-point
    operations (counted by torch) per second of the measured step, against one large matmul's."""
    from torch.utils.flop_counter import FlopCounterMode

    s, visual = pipeline.settings, pipeline.models.clip.visual
    local, global_ = ViewBuilder(rgb, s.view_size, s.blur_kernel, s.normalization).views(masks)
    weights = mask_weights(masks, visual.grid_size[0])
    with FlopCounterMode(display=False) as counter:
        hybrid_features(visual, local, global_, weights, s.masking_block, s.fusion_weight, torch.float32)
    flops = counter.get_total_flops()
    a, b = torch.randn(4096, 768), torch.randn(768, 3072)  # one MLP projection's shape for 21 views
    a @ b
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    peak = 2 * 4096 * 768 * 3072 * repeats / (time.perf_counter() - start)
    print(f"\nfp32 region features: {flops / 1e9:.0f} GFLOP (matmuls and attention, counted by torch) in "
          f"{seconds:.2f} s = {flops / seconds / 1e9:.0f} GFLOP/s; this CPU's fp32 matmul (4096x768 @ 768x3072): "
          f"{peak / 1e9:.0f} GFLOP/s -> {100 * flops / seconds / peak:.0f} % of it")


def fmt(timings: dict) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()) + f"  (total {sum(timings.values()):.2f} s)"


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp32,auto", help="our precisions to measure, comma-separated")
    ap.add_argument("--repeats", type=int, default=3,
                    help="index builds per way, interleaved (plain, ours, plain, ours...): medians are reported")
    ap.add_argument("--k", type=int, default=5, help="expressions per image for the official-way comparison")
    ap.add_argument("--queries", type=int, default=20, help="queries timed on the built index")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--weights", default=str(REPO / ".cache" / "test-weights"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    paths = prepare_test_weights(args.weights)
    base = Settings(sam_model="vit_t", sam_checkpoint=str(paths["vit_t"]), clip_model=OPENAI_CLIP,
                    clip_checkpoint=str(paths[OPENAI_CLIP]), weights_dir=str(paths["dir"]), precision="fp32")
    plain = HybridGL(base)
    rgb = photo()
    print(f"device {plain.models.device}, threads {torch.get_num_threads()}, image {rgb.shape[1]}x{rgb.shape[0]}, "
          f"CLIP {OPENAI_CLIP} (random weights), SAM vit_t (MobileSAM); load average {os.getloadavg()[0]:.1f}")
    ours = {p: HybridGL(base.replace(precision=p), replace(plain.models, dtype=pick_dtype(p, plain.models.device)))
            for p in args.precisions.split(",")}
    for pipeline in ours.values():
        pipeline.index(rgb)  # warm-up: first calls allocate and pick kernels

    # Interleaved, so that a change in the machine's load hits every way alike.
    plain_runs: list[dict] = []
    our_runs: dict[str, list[dict]] = {p: [] for p in ours}
    indexes: dict[str, ImageIndex] = {}
    for _ in range(args.repeats):
        plain_runs.append({})
        reference = plain_index(plain, rgb, plain_runs[-1])
        for precision, pipeline in ours.items():
            our_runs[precision].append({})
            indexes[precision] = pipeline.index(rgb, timings=our_runs[precision][-1])
    plain_t = medians(plain_runs)
    plain_total = statistics.median(sum(r.values()) for r in plain_runs)
    print(f"plain index ({len(reference)} masks), medians of {args.repeats}: {fmt(plain_t)}")

    expressions = EXPRESSIONS[: args.k]
    start = time.perf_counter()
    for expression in expressions:  # the release: everything again per expression
        plain._text_cache.clear()
        plain.query(plain_index(plain, rgb, {}), expression)
    official = time.perf_counter() - start
    if expressions:
        print(f"official way, K={args.k} expressions (plain index rebuilt per expression): {official:.1f} s")

    for precision, pipeline in ours.items():
        index = indexes[precision]
        print(f"\n--- ours, precision {precision} -> {pipeline.models.dtype}")
        t_ours = medians(our_runs[precision])
        ours_total = statistics.median(sum(r.values()) for r in our_runs[precision])
        print(f"index, medians of {args.repeats}: {fmt(t_ours)}")
        print("  per step, plain / ours: " + ", ".join(f"{k} {plain_t[k] / t_ours[k]:.2f}x" for k in t_ours))
        cos = (reference.features * index.features).sum(-1) / index.features.norm(dim=-1)
        gem_cos = (reference.gem_features * index.gem_features).sum(-1) / index.gem_features.norm(dim=-1)
        print(f"  same masks and boxes as plain: {torch.equal(reference.masks, index.masks)} and "
              f"{np.array_equal(reference.boxes, index.boxes)}; cosine to plain: region features min "
              f"{cos.min():.6f}, GEM patch features min {gem_cos.min():.6f}")

        query_times = []
        for expression in EXPRESSIONS[: args.queries]:
            pipeline._text_cache.clear()  # text encoding included: each query is a new expression
            start = time.perf_counter()
            pipeline.query(index, expression)
            query_times.append(time.perf_counter() - start)
        p50 = statistics.median(query_times)
        print(f"query on the index: p50 {p50 * 1000:.1f} ms, max {max(query_times) * 1000:.1f} ms "
              f"over {len(query_times)} new expressions")

        if expressions:
            start = time.perf_counter()
            shared = pipeline.index(rgb)
            for expression in expressions:
                pipeline.query(shared, expression)
            ours_k = time.perf_counter() - start
            print(f"K={args.k} expressions: official {official:.1f} s, ours {ours_k:.1f} s -> "
                  f"{official / ours_k:.1f}x (target >= 4x)")
        print(f"index: plain {plain_total:.1f} s, ours {ours_total:.1f} s -> {plain_total / ours_total:.2f}x "
              f"(target >= 3x)")
        print(f"query p50 / index build: {100 * p50 / ours_total:.2f} % (target <= 1 %)")
    if "fp32" in ours:
        roofline(ours["fp32"], rgb, indexes["fp32"].masks, statistics.median(r["regions"] for r in our_runs["fp32"]))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
