"""Dataset scale for the image-index cache: bytes per entry, and a budget that holds while jobs flow.

    .venv/bin/python bench/bench_cache_scale.py                       # both parts
    .venv/bin/python bench/bench_cache_scale.py --skip-sizes --images 100000
    .venv/bin/python bench/bench_cache_scale.py --skip-scale --sizes 800x534,3264x2448

1. **Bytes per entry**: real indexes built with MobileSAM + the ViT-B/16 architecture (random weights,
   from the test weights; ``--clips`` adds the small test ViT) of the SAM demo truck resized to each
   photo size. "Before" is this project's earlier format (whole-frame masks bit-packed and
   compressed, SAM embedding included, in one entry), re-implemented here to compare; "after" is
   what the shared cache now keeps: the index entry (masks cropped to their boxes), and the SAM
   embedding as its own entry for interactive configs only. "Redis" is what the store accounts for
   the index entry (MEMORY USAGE + bookkeeping); "memory" what a worker holds for it (full masks).

2. **Scale**: ``--images`` synthetic indexes of realistic size (ImageIndex objects with ViT-B/16's
   feature sizes and a photo's worth of masks, serialized by the real code) go through the real
   store (``backend.cache_store.RedisLRU``, as the workers use it) on a Redis of the bench's own that
   also carries an RQ queue: a producer enqueues jobs and a real RQ worker runs them throughout. That
   Redis runs as the queue's must (``noeviction``), with ``maxmemory`` just above the cache budget:
   if the cache ever overran its budget, the queue's writes would fail and count as queue errors.
   Access pattern: images arrive in imports of ``--import-size``; each import is warmed (at most what
   the cache holds, as /webhook does), then pre-labeled in order (one lookup per image); annotators
   revisit recently pre-labeled images (``--revisit`` of lookups, reaching back an exponential
   number of images, mean ``--reach``). Printed over time: Redis ``used_memory`` and the cache's bytes
   against the budget; at the end: queue errors, hit rates, evictions.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from backend import queue as q  # noqa: E402
from backend.cache_store import INDEX, STRUCTURE_BYTES, RedisLRU  # noqa: E402
from tests.services import RedisServer  # noqa: E402

QUEUE_HEADROOM = 64 * 2**20  # what the bench's queue may use above the cache budget before Redis refuses writes


# --- 1. bytes per entry --------------------------------------------------------------------------------
def bytes_before(index) -> int:
    """Size of the earlier single-entry format: whole-frame masks bit-packed + zlib, fp16 features and
    SAM embedding, float64 boxes, in one .npz."""
    import torch

    td = getattr(torch, index.feature_dtype)
    packed = np.packbits(index.masks.numpy().reshape(len(index.masks), -1), axis=1)
    arrays = {"header": np.zeros(200, np.uint8), "masks": np.frombuffer(zlib.compress(packed.tobytes(), 6), np.uint8),
              "boxes": index.boxes.astype(np.float64), "features": index.features.to(td).numpy(),
              "gem_features": index.gem_features.to(td).numpy()}
    if index.sam_embedding is not None:
        arrays["sam_embedding"] = index.sam_embedding.to(td).numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return len(buf.getvalue())


def size_table(sizes: list[tuple[int, int]], clips: list[str], threads: int) -> None:
    import torch
    from PIL import Image

    from bench.bench_index import photo
    from worker.hybridgl.pipeline import HybridGL
    from worker.hybridgl.settings import Settings
    from worker.weights_command import OPENAI_CLIP, TINY_CLIP, prepare_test_weights

    torch.set_num_threads(threads)
    paths = prepare_test_weights(REPO / ".cache" / "test-weights")
    server = RedisServer(Path(tempfile.mkdtemp()))
    try:
        conn = redis.Redis.from_url(server.url)
        print("| Photo | CLIP | Masks | Before (one entry) | Index entry | Its Redis bytes | SAM embedding entry "
              "| Worker memory | Build s |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        for clip in clips:
            name = {"vitb": OPENAI_CLIP, "tiny": TINY_CLIP}[clip]
            extra = {} if clip == "vitb" else {"masking_block": 4, "gem_blocks": 3}
            pipeline = HybridGL(Settings(sam_model="vit_t", sam_checkpoint=str(paths["vit_t"]), clip_model=name,
                                         clip_checkpoint=str(paths[name]), weights_dir=str(paths["dir"]),
                                         device="cpu", **extra))
            for w, h in sizes:
                rgb = np.asarray(Image.fromarray(photo()).resize((w, h), Image.BICUBIC))
                started = time.perf_counter()
                index = pipeline.index(rgb)
                seconds = time.perf_counter() - started
                entry, embedding = index.to_bytes(), index.embedding_to_bytes()
                store = RedisLRU(conn, INDEX, 2**34)
                store.put(index.key, entry)
                accounted = int(conn.hget(store.sizes_key, index.key))
                print(f"| {w}x{h} ({w * h / 1e6:.1f} MP) | {clip} | {len(index)} | {bytes_before(index):,} | "
                      f"{len(entry):,} | {accounted:,} | {len(embedding):,} | "
                      f"{index.without_embedding().nbytes / 2**20:.1f} MiB | {seconds:.1f} |", flush=True)
    finally:
        server.kill()


# --- 2. scale --------------------------------------------------------------------------------------------
def synthetic_entries(count: int, seed: int) -> list[bytes]:
    """Serialized indexes of realistic size: ViT-B/16 features (512-d, 28x28 GEM patches), 10-40 masks
    (ellipses) on photos of 0.4-8 megapixels."""
    import torch

    from worker.hybridgl.image_index import ImageIndex

    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        w, h = [(800, 534), (1080, 810), (1920, 1080), (3264, 2448)][k % 4]
        n = int(rng.integers(10, 41))
        yy, xx = np.ogrid[0:h, 0:w]
        masks = np.zeros((n, h, w), dtype=bool)
        for i in range(n):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(0.03, 0.4) * h, rng.uniform(0.03, 0.4) * w
            masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        features = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, 512))).float(), dim=-1)
        gem = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((784, 512))).float(), dim=-1)
        index = ImageIndex(key=f"synthetic-{k}", image_size=(h, w), masks=torch.from_numpy(masks),
                           boxes=np.zeros((n, 4)), features=features, gem_features=gem).rounded("float16")
        out.append(index.to_bytes())
    return out


WORKER = """
import sys
from redis import Redis
from rq import Queue, SimpleWorker
conn = Redis.from_url(sys.argv[1])
SimpleWorker([Queue("batch", connection=conn)], connection=conn).work(burst=False, logging_level="WARNING")
"""


class QueueTraffic:
    """Jobs flowing through an RQ queue on the same Redis: a producer thread, a real worker process."""

    def __init__(self, url: str, rate: float):
        self.conn = redis.Redis.from_url(url)
        self.jobs = q.JobQueue(self.conn, job_timeout=60, result_ttl=600, retries=0)
        self.rate = rate
        self.enqueued = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.worker = subprocess.Popen([sys.executable, "-c", WORKER, url], cwd=REPO)
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        while not self._stop.wait(1 / self.rate):
            try:
                # A real function of the project: returns a string, as light as a job can be.
                self.jobs.enqueue(q.BATCH, "backend.queue.job_id_for", {"n": self.enqueued},
                                  f"bench-{self.enqueued}", "bench job")
                self.enqueued += 1
            except redis.RedisError as exc:
                self.errors.append(str(exc)[:120])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + 60
        while self.jobs.depths()[q.BATCH] and time.monotonic() < deadline:
            time.sleep(0.2)  # a benchmark, not a test: let the worker drain the queue
        self.worker.terminate()
        self.worker.wait(30)
        from rq.registry import FailedJobRegistry, FinishedJobRegistry

        return {"enqueued": self.enqueued, "enqueue_errors": len(self.errors),
                "failed_jobs": FailedJobRegistry(q.BATCH, connection=self.conn).count,
                "finished_jobs": FinishedJobRegistry(q.BATCH, connection=self.conn).count,
                "left_in_queue": self.jobs.depths()[q.BATCH], "first_error": self.errors[:1]}


def scale(images: int, budget: int, import_size: int, revisit: float, reach: float, templates: int,
          rate: float, seed: int) -> None:
    server = RedisServer(Path(tempfile.mkdtemp()))
    try:
        conn = redis.Redis.from_url(server.url)
        conn.config_set("maxmemory", budget + QUEUE_HEADROOM + int(conn.info("memory")["used_memory"]))
        conn.config_set("maxmemory-policy", "noeviction")  # as the queue's Redis must run
        print(f"making {templates} synthetic index entries ...", flush=True)
        entries = synthetic_entries(templates, seed)
        sizes = [len(e) for e in entries]
        print(f"entry bytes: min {min(sizes):,}, mean {int(np.mean(sizes)):,}, max {max(sizes):,}")
        store = RedisLRU(conn, INDEX, budget)
        traffic = QueueTraffic(server.url, rate)
        rng = random.Random(seed)
        hits = misses = revisit_hits = revisits = warmups = cache_errors = 0
        peak_used = 0
        started = time.perf_counter()
        print(f"\n{images:,} images, budget {budget / 2**20:.0f} MiB, Redis maxmemory budget + "
              f"{QUEUE_HEADROOM / 2**20:.0f} MiB (noeviction), queue: {rate:g} jobs/s")
        print("| Images done | Redis used_memory | Cache bytes | Budget | Entries | Evictions | Hit rate so far |")
        print("|---|---|---|---|---|---|---|", flush=True)

        def lookup(i: int) -> bool:
            nonlocal cache_errors
            try:
                if store.get(f"image-{i}") is not None:
                    return True
                store.put(f"image-{i}", entries[i % templates])
            except redis.RedisError:
                cache_errors += 1
            return False

        room = (budget - STRUCTURE_BYTES) // int(np.mean(sizes) + 300)
        for first in range(0, images, import_size):
            batch = range(first, min(first + import_size, images))
            for i in list(batch)[:room]:  # warm-up on import, bounded by what the cache holds
                store.put(f"image-{i}", entries[i % templates])
                warmups += 1
            for i in batch:
                if lookup(i):
                    hits += 1
                else:
                    misses += 1
                if rng.random() < revisit:
                    j = max(0, i - int(rng.expovariate(1 / reach)))
                    revisits += 1
                    found = lookup(j)
                    hits += found
                    misses += not found
                    revisit_hits += found
                if (i + 1) % max(1, images // 10) == 0 or i + 1 == images:
                    used = int(conn.info("memory")["used_memory"])
                    peak_used = max(peak_used, used)
                    s = store.stats()
                    print(f"| {i + 1:,} | {used / 2**20:.0f} MiB | {s.bytes / 2**20:.0f} MiB | "
                          f"{budget / 2**20:.0f} MiB | {s.entries:,} | {s.evictions:,} | "
                          f"{hits / max(1, hits + misses):.1%} |", flush=True)
        seconds = time.perf_counter() - started
        queue = traffic.stop()
        s = store.stats()
        print(f"\n{seconds:.0f} s; peak used_memory sampled {peak_used / 2**20:.0f} MiB "
              f"(budget {budget / 2**20:.0f} MiB + queue and Redis' own); cache bytes {s.bytes / 2**20:.0f} MiB "
              f"<= budget: {s.bytes <= budget}")
        print(f"queue: {queue['enqueued']:,} jobs enqueued, {queue['finished_jobs']:,} finished, "
              f"{queue['failed_jobs']} failed, {queue['enqueue_errors']} enqueue errors {queue['first_error']}, "
              f"{queue['left_in_queue']} left; queue errors: {queue['failed_jobs'] + queue['enqueue_errors']}")
        print(f"lookups: {hits + misses:,}, hit rate {hits / max(1, hits + misses):.1%} (pre-labeling after warm-up "
              f"and revisits); revisits {revisits:,}, their hit rate {revisit_hits / max(1, revisits):.1%}; "
              f"warm-ups {warmups:,}; evictions {s.evictions:,}; cache errors {cache_errors}")
        print(json.dumps({"images": images, "budget": budget, "peak_used_memory": peak_used,
                          "cache_bytes": s.bytes, "queue_errors": queue["failed_jobs"] + queue["enqueue_errors"],
                          "hit_rate": hits / max(1, hits + misses), "evictions": s.evictions}))
    finally:
        server.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="800x534,1080x810,3264x2448", help="comma-separated WxH for the size table")
    ap.add_argument("--clips", default="vitb", help="comma-separated: vitb, tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sizes", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--import-size", type=int, default=1000)
    ap.add_argument("--revisit", type=float, default=0.3, help="share of images followed by a revisit")
    ap.add_argument("--reach", type=float, default=100.0, help="mean images back a revisit reaches")
    ap.add_argument("--templates", type=int, default=20, help="distinct synthetic entries (sizes) cycled")
    ap.add_argument("--rate", type=float, default=20.0, help="jobs enqueued per second meanwhile")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: still stop the bench's own Redis
    if not args.skip_sizes:
        sizes = [tuple(map(int, s.lower().split("x"))) for s in args.sizes.split(",")]
        size_table(sizes, args.clips.split(","), args.threads)
    if not args.skip_scale:
        scale(args.images, args.budget_mib * 2**20, args.import_size, args.revisit, args.reach, args.templates,
              args.rate, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
