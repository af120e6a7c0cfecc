"""Pre-labelling throughput with 1 and with 2 workers, in one run.

    .venv/bin/python bench/bench_prelabel.py [--tasks 8] [--side 400]

Starts a real Label Studio (tests/labelstudio.py) and uses a real Redis (DB 13 of REDIS_URL's server,
emptied first). Two projects get the same number of new images of the same sizes, derived from the
photos in tests/data (each has its own content, so no image index is cached anywhere), and
`hybridgl prelabel` (``python -m backend.prelabel``) pre-labels them:
- project 1 with one worker, HYBRIDGL_TORCH_THREADS=2;
- project 2 with two workers, HYBRIDGL_TORCH_THREADS=1 each;
so that both use the machine's 2 cores. The workers first pre-label one warm-up image each
(first-job costs out of the measure). Models: MobileSAM and the 6-block test ViT (the test
weights, as tests/conftest.py's ``tiny_settings``). Prints images per minute for both and the ratio.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.labelstudio import start_label_studio  # noqa: E402
from tests.services import DATA, service_env, start_worker  # noqa: E402
from worker.hybridgl.settings import Settings  # noqa: E402
from worker.weights_command import TINY_CLIP, prepare_test_weights  # noqa: E402

CONFIG = (REPO / "label_config" / "batch_prompts.xml").read_text()
PHOTOS = (("dog.jpg", "the dog"), ("groceries.jpg", "the bag"), ("truck.jpg", "the truck"))


def new_image(directory: Path, base: str, side: int, tag: str) -> str:
    """``base`` scaled to ``side`` px on its long side, one marker pixel depending on ``tag``: new content."""
    image = Image.open(DATA / base).convert("RGB")
    scale = side / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    digest = hashlib.sha256(tag.encode()).digest()
    image.putpixel((digest[0] % 16, digest[1] % 16), tuple(digest[2:5]))
    name = f"{Path(base).stem}-{tag}.png"
    image.save(directory / name)
    return name


def make_project(ls, title: str, count: int, side: int, tag: str) -> tuple[int, list[int]]:
    project = ls.create_project(title, CONFIG)
    ls.add_local_storage(project["id"])
    tasks = []
    for k in range(count):
        base, prompt = PHOTOS[k % len(PHOTOS)]
        tasks.append({"image": ls.local_files_url(new_image(ls.images_dir, base, side, f"{tag}-{k}")),
                      "prompt": prompt})
    return project["id"], ls.import_tasks(project["id"], tasks)


def prelabel(env: dict, project: int, work: Path) -> dict:
    summary = work / f"summary-{project}.json"
    done = subprocess.run([sys.executable, "-m", "backend.prelabel", "--project", str(project), "--no-progress",
                           "--summary-json", str(summary)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"prelabel exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return json.loads(summary.read_text())


def one_prediction_each(ls, task_ids: list[int]) -> None:
    counts = [len(ls.predictions(t)) for t in task_ids]
    if counts != [1] * len(task_ids):
        raise RuntimeError(f"expected one prediction per task, got {counts}")


def measure(ls, env: dict, workers: int, threads: int, count: int, side: int, redis_url: str, work: Path,
            label: str) -> dict:
    """Start the workers (each warmed up on its own image), pre-label a fresh project, stop them."""
    worker_env = dict(env, HYBRIDGL_TORCH_THREADS=str(threads))
    services = []
    try:
        for n in range(workers):
            services.append(start_worker(worker_env, f"bench-{label}-{n}", work, redis_url))
        # Warm-up, one image per worker: idle workers wait on the queue in turn, so each takes one.
        warm, warm_ids = make_project(ls, f"warm-up {label}", workers, side, f"warm-{label}")
        prelabel(env, warm, work)
        one_prediction_each(ls, warm_ids)
        project, ids = make_project(ls, f"bench {label}", count, side, label)
        wall = time.perf_counter()
        summary = prelabel(env, project, work)
        wall = time.perf_counter() - wall
        one_prediction_each(ls, ids)
        if summary["predicted"] != count:
            raise RuntimeError(f"predicted {summary['predicted']} of {count}: {summary}")
        return {"workers": workers, "threads": threads, "seconds": summary["seconds"], "wall": wall,
                "per_minute": summary["images_per_minute"], "load": os.getloadavg()[0]}
    finally:
        for service in services:
            service.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8, help="new images per measured project")
    ap.add_argument("--side", type=int, default=400, help="long side of the images, in pixels")
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()

    paths = prepare_test_weights(REPO / ".cache" / "test-weights")
    settings = Settings(sam_model="vit_t", sam_checkpoint=str(paths["vit_t"]), clip_model=TINY_CLIP,
                        clip_checkpoint=str(paths[TINY_CLIP]), weights_dir=str(paths["dir"]), device="cpu",
                        masking_block=4, gem_blocks=3)
    redis_url = args.redis.rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(redis_url).flushdb()
    work = Path(tempfile.mkdtemp(prefix="hybridgl-bench-prelabel-"))
    ls = start_label_studio(work / "label-studio")
    try:
        env = service_env(settings, redis_url, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token)
        print(f"{args.tasks} new images per run ({args.side} px long side, from {', '.join(p for p, _ in PHOTOS)}); "
              f"MobileSAM + 6-block test ViT, fp32, CPU ({os.cpu_count()} cores); Label Studio {ls.url}", flush=True)
        one = measure(ls, env, 1, 2, args.tasks, args.side, redis_url, work, "one")
        two = measure(ls, env, 2, 1, args.tasks, args.side, redis_url, work, "two")
        for result in (one, two):
            print(f"  {result['workers']} worker(s) x {result['threads']} torch thread(s): "
                  f"{result['per_minute']:.1f} images/minute ({args.tasks} images in {result['seconds']:.1f} s; "
                  f"command wall time {result['wall']:.1f} s)")
        print(f"  2 workers / 1 worker: {two['per_minute'] / one['per_minute']:.2f}x")
        print(f"  (1-minute load average at the end of each run: {one['load']:.1f}, {two['load']:.1f}; above the "
              "workers' count, other processes shared the cores)")
    finally:
        ls.stop()
        redis.Redis.from_url(redis_url).flushdb()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
