"""Pre-labelling throughput: 1 against 2 workers, and a worker with and without prefetch when the image
host is slow, in one run.

    .venv/bin/python bench/bench_prelabel.py [--tasks 8] [--side 400] [--host-delay 1.0] [--only workers|prefetch]

Starts a real Label Studio (tests/labelstudio.py) and uses a real Redis (DB 13 of REDIS_URL's server,
emptied first). Each measured project gets the same number of new images of the same sizes, derived
from the photos in tests/data (each has its own content, so no image index is cached anywhere), and
`hybridgl prelabel` (``python -m backend.prelabel``) pre-labels them:
- workers: project 1 with one worker, HYBRIDGL_TORCH_THREADS=2; project 2 with two workers,
  HYBRIDGL_TORCH_THREADS=1 each; so that both use the machine's 2 cores. Images from Label Studio.
- prefetch: one worker with 2 threads, its images on an image host that answers each request after
  ``--host-delay`` seconds (a local HTTP server that waits, as a distant host would), with
  HYBRIDGL_PREFETCH=false and then true.
The workers first pre-label one warm-up image each (first-job costs out of the measure). Models:
MobileSAM and the 6-block test ViT (the test weights, as tests/conftest.py's ``tiny_settings``).
Prints images per minute for each and the ratios. A benchmark, not a test.
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

from backend import queue as q  # noqa: E402
from tests.labelstudio import start_label_studio  # noqa: E402
from tests.services import DATA, serve_directory, service_env, start_worker  # noqa: E402
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


def make_project(ls, title: str, count: int, side: int, tag: str, host: tuple[str, Path] | None = None
                 ) -> tuple[int, list[int]]:
    """A project of ``count`` new images: in Label Studio's local files, or on ``host`` (its URL and folder)."""
    project = ls.create_project(title, CONFIG)
    ls.add_local_storage(project["id"])
    tasks = []
    for k in range(count):
        base, prompt = PHOTOS[k % len(PHOTOS)]
        if host is None:
            image = ls.local_files_url(new_image(ls.images_dir, base, side, f"{tag}-{k}"))
        else:
            image = f"{host[0]}/{new_image(host[1], base, side, f'{tag}-{k}')}"
        tasks.append({"image": image, "prompt": prompt})
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
            label: str, host: tuple[str, Path] | None = None, prefetch: bool = True) -> dict:
    """Start the workers (each warmed up on its own image), pre-label a fresh project, stop them."""
    worker_env = dict(env, HYBRIDGL_TORCH_THREADS=str(threads), HYBRIDGL_PREFETCH=str(prefetch).lower())
    services = []
    try:
        for n in range(workers):
            services.append(start_worker(worker_env, f"bench-{label}-{n}", work, redis_url))
        # Warm-up, one image per worker: idle workers wait on the queue in turn, so each takes one.
        warm, warm_ids = make_project(ls, f"warm-up {label}", workers, side, f"warm-{label}", host)
        prelabel(env, warm, work)
        one_prediction_each(ls, warm_ids)
        project, ids = make_project(ls, f"bench {label}", count, side, label, host)
        conn = redis.Redis.from_url(redis_url)
        prefetched = q.metrics(conn).get("images_prefetched", 0.0)
        wall = time.perf_counter()
        summary = prelabel(env, project, work)
        wall = time.perf_counter() - wall
        one_prediction_each(ls, ids)
        if summary["predicted"] != count:
            raise RuntimeError(f"predicted {summary['predicted']} of {count}: {summary}")
        prefetched = q.metrics(conn).get("images_prefetched", 0.0) - prefetched
        return {"workers": workers, "threads": threads, "prefetch": prefetch, "prefetched": int(prefetched),
                "seconds": summary["seconds"], "wall": wall,
                "per_minute": summary["images_per_minute"], "load": os.getloadavg()[0]}
    finally:
        for service in services:
            service.stop()


def report(result: dict, tasks: int) -> None:
    print(f"  {result['workers']} worker(s) x {result['threads']} torch thread(s), prefetch "
          f"{'on' if result['prefetch'] else 'off'}: {result['per_minute']:.1f} images/minute ({tasks} images in "
          f"{result['seconds']:.1f} s, {result['prefetched']} of them prefetched; command wall time {result['wall']:.1f} s) "
          f"[{result['load']:.1f}]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8, help="new images per measured project")
    ap.add_argument("--side", type=int, default=400, help="long side of the images, in pixels")
    ap.add_argument("--host-delay", type=float, default=1.0, help="seconds the slow image host waits per image")
    ap.add_argument("--only", choices=("workers", "prefetch"), help="run one of the two comparisons")
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
        if args.only in (None, "workers"):
            one = measure(ls, env, 1, 2, args.tasks, args.side, redis_url, work, "one")
            two = measure(ls, env, 2, 1, args.tasks, args.side, redis_url, work, "two")
            print("Workers (images from Label Studio):")
            for result in (one, two):
                report(result, args.tasks)
            print(f"  2 workers / 1 worker: {two['per_minute'] / one['per_minute']:.2f}x")
        if args.only in (None, "prefetch"):
            folder = work / "slow-host"
            folder.mkdir()
            server, url = serve_directory(folder, delay=args.host_delay)
            try:
                runs = [measure(ls, env, 1, 2, args.tasks, args.side, redis_url, work, f"prefetch-{on}", (url, folder),
                                prefetch=on) for on in (False, True)]
            finally:
                server.shutdown()
            print(f"Prefetch (one worker x 2 threads; the image host answers after {args.host_delay:g} s):")
            for result in runs:
                report(result, args.tasks)
            print(f"  with / without prefetch: {runs[1]['per_minute'] / runs[0]['per_minute']:.2f}x")
        print("  (1-minute load average at the end of each run is in brackets; above the workers' count, other "
              "processes shared the cores)")
    finally:
        ls.stop()
        redis.Redis.from_url(redis_url).flushdb()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
