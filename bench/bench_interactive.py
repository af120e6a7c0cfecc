"""Interactive and batch latency through HTTP + queue + worker, against the same work in-process.

    .venv/bin/python bench/bench_interactive.py [--requests 30] [--batch 4]

Starts a real worker and backend (subprocesses) on a real Redis (DB 14 of REDIS_URL's server,
emptied first), serves photos over HTTP on 127.0.0.1, and measures in one run:
- interactive: a TextArea prompt on an already indexed image, p50/p95 over new expressions,
  through POST /predict, against HybridGL.query on the same index in this process;
- batch: /predict without context on images nobody has indexed, against HybridGL.index + query
  of the same images in this process.
Models: MobileSAM and the ViT-B/16 architecture with random weights (from the test weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_index import EXPRESSIONS, photo  # noqa: E402
from tests.services import serve_directory, service_env, start_backend, start_worker  # noqa: E402
from worker.hybridgl.pipeline import HybridGL  # noqa: E402
from worker.hybridgl.settings import Settings  # noqa: E402
from worker.weights_command import OPENAI_CLIP, prepare_test_weights  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
<TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels></View>"""
BATCH_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels></View>"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, p95 {pct(values, 0.95) * 1000:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20, help="interactive requests (distinct expressions)")
    ap.add_argument("--batch", type=int, default=3, help="new images in the batch comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    paths = prepare_test_weights(REPO / ".cache" / "test-weights")
    settings = Settings(sam_model="vit_t", sam_checkpoint=str(paths["vit_t"]), clip_model=OPENAI_CLIP,
                        clip_checkpoint=str(paths[OPENAI_CLIP]), weights_dir=str(paths["dir"]), device="cpu")
    redis_url = args.redis.rsplit("/", 1)[0] + "/14"
    redis.Redis.from_url(redis_url).flushdb()

    work = Path(tempfile.mkdtemp(prefix="hybridgl-bench-"))
    base = photo()
    Image.fromarray(base).save(work / "photo.png")
    for k in range(args.batch):  # new content: nothing cached anywhere
        Image.fromarray(base[:, ::-1] if k % 2 else base).rotate(90 * k, expand=False).save(work / f"new{k}.png")
    server, images_url = serve_directory(work)

    env = service_env(settings, redis_url, HYBRIDGL_TORCH_THREADS=str(args.threads), HYBRIDGL_BATCH_BUDGET="600")
    env.pop("HYBRIDGL_MASKING_BLOCK")  # the ViT-B/16 runs the paper's blocks
    env.pop("HYBRIDGL_GEM_BLOCKS")
    worker = start_worker(env, "bench-worker", work, redis_url)
    backend, url = start_backend(env, work)
    client = httpx.Client(base_url=url, timeout=600)
    try:
        local = HybridGL(settings)
        print(f"threads {args.threads}; worker and this process each run MobileSAM + ViT-B/16 (random weights), fp32")

        def prompt(text: str, image: str = "photo.png") -> float:
            body = {"tasks": [{"id": 1, "data": {"image": f"{images_url}/{image}"}}], "label_config": CONFIG,
                    "project": "1.1", "params": {"context": {"result": [
                        {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}}]}}}
            start = time.perf_counter()
            response = client.post("/predict", json=body)
            elapsed = time.perf_counter() - start
            assert response.status_code == 200 and response.json()["results"][0]["result"], response.text
            return elapsed

        prompt("the photo")  # builds the index in the worker
        expressions = EXPRESSIONS[: args.requests]
        http_times = [prompt(e) for e in expressions]
        index = local.index(work / "photo.png")
        local_times = []
        for e in expressions:
            local._text_cache.clear()
            start = time.perf_counter()
            local.query(index, e)
            local_times.append(time.perf_counter() - start)
        print(f"interactive, indexed image, {len(expressions)} new expressions:")
        print(f"  HTTP + queue + worker: {fmt(http_times)}   (target p50 <= 250 ms)")
        print(f"  in-process query:      {fmt(local_times)}")
        print(f"  overhead p50: {(statistics.median(http_times) - statistics.median(local_times)) * 1000:.0f} ms")

        names = [f"new{k}.png" for k in range(args.batch)]

        def in_process_run() -> float:
            start = time.perf_counter()
            for name in names:
                local.query(local.index(work / name), "the truck")
            return time.perf_counter() - start

        before = in_process_run()
        tasks = [{"id": 100 + k, "data": {"image": f"{images_url}/{n}", "prompt": "the truck"}}
                 for k, n in enumerate(names)]
        start = time.perf_counter()
        response = client.post("/predict", json={"tasks": tasks, "label_config": BATCH_CONFIG, "project": "1.1",
                                                 "params": {"context": None}})
        through = time.perf_counter() - start
        assert all(r["result"] for r in response.json()["results"]), response.text
        after = in_process_run()  # before and after the HTTP run: machine noise shows as their spread
        in_process = (before + after) / 2
        print(f"batch, {len(names)} new images (index + query each):")
        print(f"  HTTP + queue + worker: {through:.2f} s; in-process: {before:.2f} s before, {after:.2f} s after; "
              f"overhead {100 * (through - in_process) / in_process:+.1f} % of their mean   (target <= 5 %)")
    finally:
        client.close()
        backend.stop()
        worker.stop()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
