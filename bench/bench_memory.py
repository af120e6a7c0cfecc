"""Peak memory of one image-index build by image size: SAM's masks upsampled all at once (as
segment-anything does) against a few at a time (ours, ``proposals.UPSAMPLE_BYTES``).

    .venv/bin/python bench/bench_memory.py [--sizes 800x534,3264x2448] [--threads 2]

Each build runs in a fresh subprocess (peak RSS, ``ru_maxrss``, is per process), with MobileSAM and
the ViT-B/16 architecture (random weights, from the test weights); the photo is the truck of
bench_index, resized. "Models" is the RSS after loading them, before the image. Both variants give
the same masks (tests/test_pipeline.py checks it); only their memory differs. Mind the host's
memory: the all-at-once variant of a 12-megapixel image peaks near 18 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, resource, sys, time
import numpy as np, torch
from PIL import Image
sys.path.insert(0, {repo!r})
from bench.bench_index import photo
from worker.hybridgl import proposals
from worker.hybridgl.pipeline import HybridGL
from worker.hybridgl.settings import Settings
from worker.weights_command import OPENAI_CLIP, prepare_test_weights

torch.set_num_threads({threads})
if {all_at_once}:
    proposals.UPSAMPLE_BYTES = 2**62
paths = prepare_test_weights(REPO_WEIGHTS)
pipeline = HybridGL(Settings(sam_model="vit_t", sam_checkpoint=str(paths["vit_t"]), clip_model=OPENAI_CLIP,
                             clip_checkpoint=str(paths[OPENAI_CLIP]), weights_dir=str(paths["dir"]), device="cpu"))
models = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rgb = np.asarray(Image.fromarray(photo()).resize(({w}, {h}), Image.BICUBIC))
started = time.perf_counter()
index = pipeline.index(rgb)
print(json.dumps({{"models_mb": models / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - started, "masks": len(index)}}))
"""


def measure(w: int, h: int, all_at_once: bool, threads: int) -> dict:
    code = CHILD.format(repo=str(REPO), threads=threads, all_at_once=all_at_once, w=w, h=h).replace(
        "REPO_WEIGHTS", repr(str(REPO / ".cache" / "test-weights")))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="800x534,3264x2448", help="comma-separated WxH")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| Image | Masks | Models loaded | Peak, all at once | Peak, ours | Build s (all / ours) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        w, h = map(int, size.lower().split("x"))
        ours = measure(w, h, False, args.threads)
        plain = measure(w, h, True, args.threads)
        if "error" in ours or "error" in plain:
            print(f"| {w}x{h} | | | {plain.get('error', '')} | {ours.get('error', '')} | |")
            continue
        print(f"| {w}x{h} ({w * h / 1e6:.1f} MP) | {ours['masks']} | {ours['models_mb'] / 1024:.2f} GB | "
              f"{plain['peak_mb'] / 1024:.2f} GB | {ours['peak_mb'] / 1024:.2f} GB | "
              f"{plain['seconds']:.1f} / {ours['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
