"""Interactive prompts and /health while a batch pre-labels: simulated annotators against real services.

    .venv/bin/python bench/bench_load.py [--annotators 10] [--requests 50] [--tasks 200] [--layout both]
                                         [--clip vitb|tiny] [--workers 2] [--threads 1] [--think 2]

Starts a real Label Studio (tests/labelstudio.py), real workers and a real backend (tests/services.py)
on a real Redis (DB 12 of --redis's server, emptied first, between layouts and at the end). Worker
layouts (--layout shared|reserved|both, --workers of them, --threads torch threads each):
- shared: every worker listens on interactive,batch,warmup (interactive first, but a worker busy with
  a batch job finishes that job first);
- reserved: one worker listens on interactive only, the others on interactive,batch,warmup.
Each layout, from an empty Redis:
1. every annotator opens its own task (the /predict Label Studio sends on task open), which warms the
   index of its image (an image of its own, not in the batch); the run waits until all are built;
2. baseline: every annotator sends --requests TextArea prompts on its image (the /predict body Label
   Studio 1.23.2 sends), each prompt a new expression (a repeated one would join a finished job), with
   --think seconds (jittered by +-50 %) between an answer and its next prompt; meanwhile a probe GETs
   /health every 100 ms;
3. `hybridgl prelabel` (python -m backend.prelabel) starts in the background on a new project of
   --tasks new images (label_config/batch_prompts.xml); once its jobs are enqueued and one runs on
   every worker that takes batch jobs, the same interactive load runs again (same think times): load.
Then the batch is stopped (with --finish-batch: waited for, and checked: one prediction per task).

Reported per layout and phase: interactive latency p50/p95/max (answered = HTTP 200 with a mask), how
long their jobs waited in the queue (RQ's job records), which workers ran them, index lookups by
source, /health p50/p95/max; for the load, the batch's progress in that window (tasks predicted,
images per minute, share of the batch workers' time) and its mean job time, the longest a prompt can
wait for a shared worker. Models: MobileSAM and the ViT-B/16 architecture with random weights
(--clip vitb), or the 6-block test ViT (--clip tiny: shorter runs). Exit code 1 when an interactive
request was not answered, or /health failed or took 50 ms or more (the failures are listed).
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import string
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend import queue as q  # noqa: E402
from bench.bench_interactive import pct  # noqa: E402
from bench.bench_prelabel import PHOTOS, make_project, new_image, one_prediction_each  # noqa: E402
from tests.labelstudio import start_label_studio  # noqa: E402
from tests.services import Service, service_env, start_backend, start_worker, wait_for  # noqa: E402
from worker.hybridgl.settings import Settings  # noqa: E402
from worker.weights_command import OPENAI_CLIP, TINY_CLIP, prepare_test_weights  # noqa: E402

INTERACTIVE_CONFIG = (REPO / "label_config" / "interactive_text_prompt.xml").read_text()
HEALTH_LIMIT = 0.050  # seconds
HEALTH_INTERVAL = 0.100
REQUEST_TIMEOUT = 180.0  # above the backend's HYBRIDGL_INTERACTIVE_TIMEOUT (60 s): its 504 is what we see
LAYOUTS = ("shared", "reserved")
ADJECTIVES = ("red", "blue", "green", "white", "black", "yellow", "small", "big", "dark", "bright", "round", "tall",
              "old", "striped", "wooden", "metal")
NOUNS = ("dog", "truck", "bag", "wheel", "window", "door", "tree", "box", "bottle", "fence", "car", "sign", "person",
         "cup", "lamp", "chair")
PLACES = ("", "on the left", "on the right", "in the middle", "at the top", "at the bottom", "behind the fence",
          "next to the door", "near the wheel", "under the tree", "in front of the car", "above the box")


def expressions(seed: int = 0) -> list[str]:
    """Distinct expressions in a fixed random order: a repeated one would join a finished job (same job id)
    or find its text features cached in the worker."""
    texts = [" ".join(w for w in ("the", a, n, p) if w) for a, n, p in itertools.product(ADJECTIVES, NOUNS, PLACES)]
    random.Random(seed).shuffle(texts)
    return texts


def project_uid(project: dict) -> str:
    """'<id>.<created timestamp>': how Label Studio names the project in /predict."""
    created = datetime.fromisoformat(project["created_at"].replace("Z", "+00:00"))
    return f"{project['id']}.{int(created.timestamp())}"


def predict_body(task: dict, uid: str, label_config: str, text: str | None) -> dict:
    """What Label Studio 1.23.2 sends: a TextArea prompt (../shared/labelstudio-1.23.2/
    predict_interactive_textarea.json), or with ``text`` None the task being opened (predict_on_task_open.json)."""
    context = None
    if text is not None:
        region = "".join(random.choices(string.ascii_letters + string.digits, k=10))
        context = {"result": [{"value": {"text": [text]}, "id": region, "from_name": "prompt", "to_name": "image",
                               "type": "textarea", "origin": "manual"}]}
    return {"tasks": [task], "project": uid, "label_config": label_config,
            "params": {"login": None, "password": None, "context": context}}


def answer_error(response: httpx.Response) -> str | None:
    """None for an answer with a mask, else what is wrong with it."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    try:
        results = response.json()["results"]
        if results[0]["result"]:
            return None
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    return f"HTTP 200 without a mask: {response.text[:300]}"


def epoch(moment: datetime) -> float:
    """RQ's timestamps (UTC, naive or aware) as time.time() seconds."""
    return (moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment).timestamp()


def jobs(conn: redis.Redis, prefix: str) -> dict[str, Job]:
    """The RQ jobs whose id starts with ``prefix`` (this DB holds only this run's)."""
    ids = [k.decode()[len("rq:job:"):] for k in conn.scan_iter(f"rq:job:{prefix}*", count=1000)]
    ids = [i for i in ids if ":" not in i]  # rq:job:<id>:dependents and the like
    return {i: j for i, j in zip(ids, q.fetch_jobs(ids, conn)) if j is not None}


def counters(url: str) -> dict[str, float]:
    """The backend's /metrics samples, e.g. 'hybridgl_index_lookups_total{source="memory"}' -> 12."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(hybridgl_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@dataclass
class Phase:
    layout: str
    name: str  # baseline | load
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # answered requests, seconds
    failures: list[str] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    health_status: Counter = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)  # seconds its interactive jobs waited in the queue
    runs: list[float] = field(default_factory=list)  # seconds they ran
    ran_on: Counter = field(default_factory=Counter)
    lookups: dict[str, float] = field(default_factory=dict)
    start: float = 0.0  # time.time()
    end: float = 0.0
    batch: dict | None = None


@dataclass
class Annotators:
    """The annotators' tasks (one image each) in their Label Studio project."""

    tasks: list[dict]
    uid: str
    label_config: str


def run_phase(phase: Phase, url: str, who: Annotators, texts: Iterator[str], conn: redis.Redis, args) -> None:
    """Every annotator sends its prompts (threads) while a probe watches /health; fills ``phase``."""
    prompts = [[next(texts) for _ in range(args.requests)] for _ in who.tasks]
    jobs_before = set(jobs(conn, "interactive-"))
    lookups_before = counters(url)
    lock = threading.Lock()
    stop = threading.Event()

    def annotator(k: int, task: dict, mine: list[str]) -> None:
        rng = random.Random(k)  # the same think times in every phase
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            stop.wait(rng.uniform(0, args.think))  # annotators do not start in step
            for i, text in enumerate(mine):
                if stop.is_set() or (i and stop.wait(rng.uniform(0.5, 1.5) * args.think)):
                    return
                start = time.perf_counter()
                try:
                    error = answer_error(client.post("/predict", json=predict_body(task, who.uid, who.label_config,
                                                                                   text)))
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                with lock:
                    phase.sent += 1
                    if error is None:
                        phase.latencies.append(elapsed)
                    else:
                        phase.failures.append(f"annotator {k}, prompt {i + 1} ({text!r}), {elapsed:.1f} s: {error}")

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            due = time.perf_counter()
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    response = client.get("/health")
                    elapsed = time.perf_counter() - start
                    status = response.json().get("status") if response.status_code in (200, 503) else None
                    phase.health_status[f"{response.status_code} {status}"] += 1
                    if response.status_code != 200:
                        phase.health_failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except (httpx.HTTPError, ValueError) as exc:
                    elapsed = time.perf_counter() - start
                    phase.health_failures.append(f"{type(exc).__name__}: {exc}")
                phase.health.append(elapsed)
                due = max(due + HEALTH_INTERVAL, time.perf_counter())
                stop.wait(due - time.perf_counter())

    watcher = threading.Thread(target=probe, name="health", daemon=True)
    threads = [threading.Thread(target=annotator, args=(k, task, mine), name=f"annotator-{k}", daemon=True)
               for k, (task, mine) in enumerate(zip(who.tasks, prompts))]
    phase.start = time.time()
    watcher.start()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        phase.end = time.time()
    finally:
        stop.set()
        watcher.join()
    after = counters(url)
    phase.lookups = {s: after.get(f'hybridgl_index_lookups_total{{source="{s}"}}', 0.0)
                     - lookups_before.get(f'hybridgl_index_lookups_total{{source="{s}"}}', 0.0)
                     for s in ("memory", "redis", "built")}
    for job_id, job in jobs(conn, "interactive-").items():
        if job_id in jobs_before:
            continue
        if job.enqueued_at and job.started_at:
            phase.waits.append(epoch(job.started_at) - epoch(job.enqueued_at))
        if job.started_at and job.ended_at:
            phase.runs.append(epoch(job.ended_at) - epoch(job.started_at))
        phase.ran_on[job.worker_name or "?"] += 1


def batch_progress(conn: redis.Redis, start: float, end: float, batch_workers: int) -> dict:
    """What the batch did between ``start`` and ``end`` (time.time()), from its RQ job records."""
    records = list(jobs(conn, "predict-").values())
    done = [j for j in records if j.get_status(refresh=False) == JobStatus.FINISHED and j.ended_at]
    predicted = sum(start <= epoch(j.ended_at) <= end for j in done)
    busy = 0.0  # batch-job seconds inside the window, over every batch worker
    for j in records:
        if j.started_at:
            busy += max(0.0, min(epoch(j.ended_at) if j.ended_at else end, end) - max(epoch(j.started_at), start))
    running = any(Queue(n, connection=conn).count + StartedJobRegistry(n, connection=conn).count
                  for n in q.batch_queue_names(conn))
    return {"predicted": predicted, "per_minute": predicted / max(end - start, 1e-9) * 60, "running": running,
            "share": busy / (max(end - start, 1e-9) * batch_workers)}


def batch_job_times(conn: redis.Redis) -> dict:
    """Mean duration of the batch jobs finished so far; how long the longest running one has run."""
    now = time.time()
    finished, running = [], []
    for j in jobs(conn, "predict-").values():
        if j.started_at and j.ended_at and j.get_status(refresh=False) == JobStatus.FINISHED:
            finished.append(epoch(j.ended_at) - epoch(j.started_at))
        elif j.started_at and not j.ended_at:
            running.append(now - epoch(j.started_at))
    return {"job_mean": sum(finished) / len(finished) if finished else None, "jobs": len(finished),
            "running_for": max(running, default=None)}


def wait_warm(conn: redis.Redis, count: int, timeout: float) -> None:
    """Until ``count`` warm-up jobs finished; a failed one stops the run with its reason."""
    deadline = time.monotonic() + timeout
    while FinishedJobRegistry(q.WARMUP, connection=conn).count < count:
        failed = FailedJobRegistry(q.WARMUP, connection=conn).get_job_ids()
        if failed:
            job = q.fetch_job(failed[0], conn)
            raise RuntimeError(f"warm-up job {failed[0]} failed: {q.job_error(job)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {count} warm-up jobs did not finish within {timeout:.0f} s")
        time.sleep(0.2)


def stop_all(services: list[Service]) -> None:
    """Stop services at once (a worker in the middle of a batch job may take seconds)."""
    threads = [threading.Thread(target=s.stop) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_layout(layout: str, ls, url: str, env: dict, who: Annotators, texts: Iterator[str], redis_url: str,
               work: Path, args) -> list[Phase]:
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()  # from the same state in every layout: nothing indexed, no jobs
    workers: list[Service] = []
    prelabel: Service | None = None
    try:
        for n in range(args.workers):
            queues = {"HYBRIDGL_QUEUES": q.INTERACTIVE} if layout == "reserved" and n == 0 else {}
            workers.append(start_worker(dict(env, **queues), f"load-{layout}-{n}", work, redis_url))
        batch_workers = args.workers - (layout == "reserved")
        print(f"[{layout}] {args.workers} workers ready" + (" (load-reserved-0 on the interactive queue only)"
                                                           if layout == "reserved" else ""), flush=True)

        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client:
            for task in who.tasks:  # the annotators open their tasks: warm-up jobs index their images
                response = client.post("/predict", json=predict_body(task, who.uid, who.label_config, None))
                if response.status_code != 200:
                    raise RuntimeError(f"task open answered HTTP {response.status_code}: {response.text[:300]}")
        start = time.perf_counter()
        wait_warm(conn, len(who.tasks), 120 + 300 * len(who.tasks) / args.workers)
        print(f"[{layout}] {len(who.tasks)} annotator images indexed in {time.perf_counter() - start:.1f} s",
              flush=True)

        baseline = Phase(layout, "baseline")
        run_phase(baseline, url, who, texts, conn, args)
        print(f"[{layout}] baseline: {len(baseline.latencies)}/{baseline.sent} answered in "
              f"{baseline.end - baseline.start:.1f} s", flush=True)

        project, task_ids = make_project(ls, f"load batch {layout}", args.tasks, args.side, f"batch-{layout}")
        summary = work / f"prelabel-{layout}.json"
        prelabel = Service(f"prelabel-{layout}", [sys.executable, "-m", "backend.prelabel", "--project", str(project),
                                                  "--no-progress", "--summary-json", str(summary)], env, work)
        wait_for(lambda: "enqueued" in prelabel.log_tail()
                 and StartedJobRegistry(q.batch_queue(project), connection=conn).count
                 >= min(batch_workers, args.tasks),
                 600, "the batch's jobs to be enqueued and running", prelabel)
        print(f"[{layout}] batch of {args.tasks} tasks enqueued, {batch_workers} worker(s) on it: load starts",
              flush=True)

        load = Phase(layout, "load")
        run_phase(load, url, who, texts, conn, args)
        load.batch = batch_progress(conn, load.start, load.end, batch_workers)
        print(f"[{layout}] load: {len(load.latencies)}/{load.sent} answered in {load.end - load.start:.1f} s; "
              f"{load.batch['predicted']} batch tasks predicted meanwhile", flush=True)

        if args.finish_batch:
            code = prelabel.process.wait(timeout=600 + 600 * args.tasks / batch_workers)
            done = json.loads(summary.read_text())
            if code != 0 or done["predicted"] != args.tasks:
                raise RuntimeError(f"prelabel exited with {code}, predicted {done['predicted']} of {args.tasks}:\n"
                                   f"{prelabel.log_tail()}")
            one_prediction_each(ls, task_ids)
            print(f"[{layout}] batch finished: {done['predicted']} tasks, {done['images_per_minute']:.1f} "
                  "images/minute over the whole run, one prediction each", flush=True)
        load.batch.update(batch_job_times(conn))
        return [baseline, load]
    finally:
        if prelabel is not None:
            prelabel.stop(signal.SIGINT, timeout=60)  # it exits 130, its queued jobs stay...
        for name in q.batch_queue_names(conn):  # ...and are dropped here, so that the workers stop soon
            conn.delete(f"rq:queue:{name}")
        stop_all(workers)


def ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def seconds(values: list[float], q_: float) -> str:
    """A quantile in seconds, '-' for none."""
    return f"{pct(values, q_):.2f}" if values else "-"


def millis(values: list[float], q_: float) -> str:
    return ms(pct(values, q_)) if values else "-"


def report(phases: list[Phase], args) -> list[str]:
    """Print the results; return the failures (empty when everything passed)."""
    rows = [("layout", "phase", "answered", "p50 s", "p95 s", "max s", "queue wait p50/p95 s",
             "job run p50/p95 ms", "/health p50/p95/max ms", "probes", "index lookups mem/redis/built")]
    for p in phases:
        rows.append((p.layout, p.name, f"{len(p.latencies)}/{p.sent}", seconds(p.latencies, 0.5),
                     seconds(p.latencies, 0.95), seconds(p.latencies, 1.0),
                     f"{seconds(p.waits, 0.5)}/{seconds(p.waits, 0.95)}",
                     f"{millis(p.runs, 0.5)}/{millis(p.runs, 0.95)}",
                     f"{millis(p.health, 0.5)}/{millis(p.health, 0.95)}/{millis(p.health, 1.0)}", str(len(p.health)),
                     "/".join(f"{p.lookups[s]:.0f}" for s in ("memory", "redis", "built"))))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
    print("(queue wait and job run: from the interactive jobs' RQ records; index lookups: every job in the phase, "
          "batch jobs included)")
    print()
    for p in phases:
        ran = ", ".join(f"{w} {n}" for w, n in sorted(p.ran_on.items()))
        print(f"{p.layout} {p.name}: interactive jobs ran on {ran or 'none'}")
        if p.batch is not None:
            b = p.batch
            mean = f"{b['job_mean']:.1f} s ({b['jobs']} jobs)" if b["job_mean"] is not None else "none finished yet"
            if b["running_for"] is not None:
                mean += f", the longest running one at {b['running_for']:.0f} s"
            print(f"  batch during the load ({p.end - p.start:.1f} s): {b['predicted']} tasks predicted "
                  f"({b['per_minute']:.1f} images/min), {100 * b['share']:.0f} % of its workers' time on batch jobs, "
                  + ("still running at the end" if b["running"] else "FINISHED BEFORE the load ended (more --tasks)"))
            baseline = next(o for o in phases if o.layout == p.layout and o.name == "baseline")
            print(f"  interactive p95 {seconds(p.latencies, 0.95)} s under load, {seconds(baseline.latencies, 0.95)} s "
                  f"without; batch job mean {mean} (with every worker on a batch job, a prompt waits for one)")

    failures: list[str] = []
    for p in phases:
        for failure in p.failures:
            failures.append(f"{p.layout} {p.name}: interactive request not answered: {failure}")
        if p.sent != args.annotators * args.requests:
            failures.append(f"{p.layout} {p.name}: {p.sent} of {args.annotators * args.requests} requests sent")
        for failure in p.health_failures[:5]:
            failures.append(f"{p.layout} {p.name}: /health failed: {failure}")
        slow = [s for s in p.health if s >= HEALTH_LIMIT]
        if slow:
            failures.append(f"{p.layout} {p.name}: /health took >= {ms(HEALTH_LIMIT)} ms {len(slow)} of "
                            f"{len(p.health)} times (max {ms(max(slow))} ms)")
    answered = sum(len(p.latencies) for p in phases)
    sent = sum(p.sent for p in phases)
    all_answered = answered == sent == len(phases) * args.annotators * args.requests
    print()
    print(f"all interactive requests answered: {'yes' if all_answered else 'NO'} ({answered}/{sent})")
    worst = max((max(p.health, default=0.0) for p in phases), default=0.0)
    health_ok = not any(p.health_failures for p in phases) and worst < HEALTH_LIMIT
    print(f"/health under {ms(HEALTH_LIMIT)} ms throughout: {'yes' if health_ok else 'NO'} (max {ms(worst)} ms over "
          f"{sum(len(p.health) for p in phases)} probes; statuses "
          f"{dict(sum((p.health_status for p in phases), Counter()))})")
    for failure in failures:
        print(f"FAILED: {failure}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=10, help="simulated annotators, one image each")
    ap.add_argument("--requests", type=int, default=50, help="prompts per annotator and phase")
    ap.add_argument("--tasks", type=int, default=200, help="tasks (new images) in each layout's batch")
    ap.add_argument("--layout", choices=(*LAYOUTS, "both"), default="both")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--clip", choices=("vitb", "tiny"), default="vitb",
                    help="vitb: the ViT-B/16 architecture (random weights); tiny: the 6-block test ViT")
    ap.add_argument("--think", type=float, default=2.0,
                    help="seconds between an answer and the annotator's next prompt (jittered +-50 %%; 0: none)")
    ap.add_argument("--side", type=int, default=400, help="long side of every image, in pixels")
    ap.add_argument("--finish-batch", action="store_true",
                    help="after the load, wait for the batch to finish and check its predictions")
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    texts = expressions()
    if len(layouts) * 2 * args.annotators * args.requests > len(texts):
        ap.error(f"at most {len(texts)} distinct expressions: fewer --annotators x --requests")
    if args.workers < 1 or ("reserved" in layouts and args.workers < 2):
        ap.error("--workers: at least 1, and at least 2 for the reserved layout")

    paths = prepare_test_weights(REPO / ".cache" / "test-weights")
    clip, blocks = (OPENAI_CLIP, {}) if args.clip == "vitb" else (TINY_CLIP, {"masking_block": 4, "gem_blocks": 3})
    settings = Settings(sam_model="vit_t", sam_checkpoint=str(paths["vit_t"]), clip_model=clip,
                        clip_checkpoint=str(paths[clip]), weights_dir=str(paths["dir"]), device="cpu", **blocks)
    redis_url = args.redis.rsplit("/", 1)[0] + "/12"  # 13, 14, 15: bench_prelabel, bench_interactive, the tests
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    work = Path(tempfile.mkdtemp(prefix="hybridgl-bench-load-"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up like Ctrl-C
    ls = backend = None
    phases: list[Phase] = []
    try:
        ls = start_label_studio(work / "label-studio")
        env = service_env(settings, redis_url, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                          HYBRIDGL_TORCH_THREADS=str(args.threads))
        if args.clip == "vitb":  # the ViT-B/16 runs the paper's blocks
            env.pop("HYBRIDGL_MASKING_BLOCK")
            env.pop("HYBRIDGL_GEM_BLOCKS")
        backend, url = start_backend(env, work)

        project = ls.create_project("load annotators", INTERACTIVE_CONFIG)
        ls.add_local_storage(project["id"])
        images = [new_image(ls.images_dir, PHOTOS[k % len(PHOTOS)][0], args.side, f"annotator-{k}")
                  for k in range(args.annotators)]
        ids = ls.import_tasks(project["id"], [{"image": ls.local_files_url(name)} for name in images])
        who = Annotators([ls.task(i) for i in ids], project_uid(project), project["label_config"])

        print(f"{args.annotators} annotators x {args.requests} prompts per phase (think {args.think:g} s +-50 %), "
              f"batch of {args.tasks} tasks, images {args.side} px long side; {args.workers} workers x {args.threads} "
              f"torch thread(s); MobileSAM + {'ViT-B/16' if args.clip == 'vitb' else '6-block test ViT'} (random "
              f"weights), fp32, CPU ({os.cpu_count()} cores); Label Studio {ls.url}, backend {url}", flush=True)
        stream = iter(texts)
        for layout in layouts:
            phases += run_layout(layout, ls, url, env, who, stream, redis_url, work, args)
        failures = report(phases, args)
        print(f"(1-minute load average at the end: {os.getloadavg()[0]:.1f})")
        return 1 if failures else 0
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        if backend is not None:
            backend.stop()
        if ls is not None:
            ls.stop()
        conn.flushdb()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
