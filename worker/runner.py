"""`hybridgl worker`: one RQ worker process that loads the models once and keeps them.

RQ's default worker forks a child per job, which would reload the models every time and break
CUDA; ``SimpleWorker`` runs jobs in this process, with RQ's job timeouts (SIGALRM) still applied.

A housekeeping thread runs RQ's scheduler (due retries), keeps the worker's registration alive and
reaps the jobs of dead workers: a worker killed mid-job (SIGKILL, the OOM killer, a lost host) leaves
its job "started" in RQ, which would notice only after the job's timeout plus a minute. Any live worker sees the dead one's
registration expire within ``HEARTBEATS_TO_DEATH`` heartbeats and hands its jobs to RQ's own
abandoned-job handling at once: retried while retries are left, else failed with the reason.

Fair share (:class:`FairWorker`): batch work has one queue per project (``batch-<project>``). A worker
serves its tiers in order (interactive, then batch, then warmup) and, within the batch tier, takes the
projects' queues in turn: RQ's round-robin dequeue strategy, applied to the batch queues only (RQ's own
would rotate the interactive queue behind batch work). It finds the batch queues in RQ's ``rq:queues``
set before each dequeue and at least every ``DISCOVERY_SECONDS`` while idle, so a project that starts
its first batch after the worker started is served from its first job on. As each job starts, it
looks at the head of the queues in that order and has :mod:`worker.prefetch` fetch that job's image
meanwhile (HYBRIDGL_PREFETCH).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time

import redis
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.scripts import release_lock
from rq.utils import parse_composite_key

from backend import jobspec as js
from backend import queue as q
from backend.config import ServeSettings

log = logging.getLogger(__name__)
REAPER_LOCK_SECONDS = 5
SCHEDULER_TICK_SECONDS = 1.0  # how often due retries are enqueued
DISCOVERY_SECONDS = 2  # an idle worker looks for new projects' batch queues this often
DEAD_WORKER_REPORT_SECONDS = 15 * 60  # how long /health mentions a worker that died mid-job


def run_worker(serve: ServeSettings, method_settings, name: str | None = None, burst: bool = False) -> int:
    import torch

    from worker import jobs
    from worker.hybridgl.pipeline import HybridGL

    if serve.torch_threads > 0:
        torch.set_num_threads(serve.torch_threads)
    conn = q.connect(serve.redis_url)
    conn.ping()  # fail fast with a clear error when Redis is not there
    log.info("loading models (%s, %s)...", method_settings.sam_model, method_settings.clip_model)
    pipeline = HybridGL(method_settings)
    jobs.set_runtime(jobs.Runtime.create(serve, pipeline))
    if serve.job_memory > 0:
        limit_memory(serve.job_memory)
    # First calls of spaCy and of CLIP's text tower cost ~0.4 s more than later ones: paid here, not by
    # the first annotator's prompt (after the memory cap, so that what they hold counts in it).
    pipeline.encode_texts([pipeline.parse("the dog on the left").noun_phrase or "the dog"])
    name = name or f"hybridgl-{socket.gethostname()}-{os.getpid()}"
    info = {"name": name, "model_version": pipeline.model_version, "device": str(pipeline.models.device),
            "precision": str(pipeline.models.dtype).replace("torch.", ""), "queues": list(serve.queues),
            "sam_model": method_settings.sam_model, "clip_model": method_settings.clip_model}
    stop = threading.Event()
    # RQ's retry back-off needs a scheduler to enqueue due retries. RQ forks one from the worker that
    # holds a Redis lock and has others take over only at their 10-minute maintenance: a worker killed
    # with its scheduler would stall every retry that long (and a forked child would outlive a SIGKILL
    # with a copy of the models' memory). Every worker runs RQ's scheduler logic in its housekeeping
    # thread instead: one holds the lock, and a dead worker's lock passes on when the reaper frees it.
    # Every tick re-checks ownership (RQ 3's acquire_locks acquires or refreshes by owner, atomically), so
    # a worker whose lock was taken over stops moving due retries; release_locks frees only its own.
    scheduler = RQScheduler(list(q.QUEUES), connection=conn, name=name, serializer=q.SERIALIZER)

    def housekeeping() -> None:
        next_beat = time.monotonic() + serve.worker_heartbeat
        while not stop.wait(SCHEDULER_TICK_SECONDS):
            try:
                # Retries wait in their own queue's scheduled registry: the scheduler covers every batch queue.
                scheduler._queue_names = set(all_queue_names(conn))  # noqa: SLF001 - see tests/test_rq_contract.py
                scheduler.acquire_locks()  # acquire, or refresh the ones held
                scheduler.enqueue_scheduled_jobs()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + serve.worker_heartbeat
                    q.register_worker(conn, name, info, serve.worker_heartbeat)
                    reap_dead_workers_jobs(conn)
            except Exception as exc:  # noqa: BLE001 - Redis may come back; keep trying
                log.warning("worker housekeeping failed: %s", exc)

    q.register_worker(conn, name, info, serve.worker_heartbeat)
    reap_dead_workers_jobs(conn)  # jobs left by a worker that died while none was alive to notice
    threading.Thread(target=housekeeping, name="housekeeping", daemon=True).start()
    log.info("worker %s ready: model_version %s, queues %s", name, pipeline.model_version, ",".join(serve.queues))
    try:
        while True:
            worker = FairWorker(serve.queues, connection=conn, name=name, prefetch=jobs.runtime().prefetch)
            try:
                worker.work(with_scheduler=False, burst=burst, logging_level="INFO")
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # RQ's loop rides out a Redis outage between jobs, but not one that begins while a job
                # ends (its failure or success is recorded in Redis): wait for Redis and work on.
                log.warning("Redis became unreachable while a job ended (%s); waiting for it to come back", exc)
                wait_for_redis(conn)
                with contextlib.suppress(redis.RedisError):
                    worker.register_death()  # RQ's registration, so that the same name can register again
                q.register_worker(conn, name, info, serve.worker_heartbeat)
    finally:
        stop.set()
        scheduler.release_locks()
        q.unregister_worker(conn, name)
    return 0


def wait_for_redis(conn: redis.Redis, longest_pause: float = 5.0) -> None:
    """Block until Redis answers again, pausing longer between tries (up to ``longest_pause`` s)."""
    pause = 0.1
    while True:
        try:
            conn.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(pause)  # a back-off between reconnection attempts
            pause = min(pause * 2, longest_pause)


class FairWorker(SimpleWorker):
    """A SimpleWorker whose batch tier is every project's batch queue, taken in turn (see the module's doc).

    ``tiers`` are the names of HYBRIDGL_QUEUES, highest priority first; ``batch`` stands for the batch
    queues of all projects.
    """

    def __init__(self, tiers, connection: redis.Redis, prefetch=None, **kwargs):
        self.tiers = tuple(tiers)
        self._batch_turn: list[str] = []  # batch queues, the next to serve first
        self.prefetch = prefetch  # worker.prefetch.Prefetcher, or None
        kwargs.setdefault("job_class", q.TrustedJob)  # tests/test_dequeue_order.py runs its own job function
        super().__init__(self._tier_queues(connection, []), connection=connection, serializer=q.SERIALIZER, **kwargs)

    def _order(self, batch_names: list[str]) -> list[str]:
        """Queue names in dequeue order: the tiers, the batch tier standing for ``batch_names``."""
        names: list[str] = []
        for name in self.tiers:
            names += batch_names if name == q.BATCH else [name]
        return names

    def _tier_queues(self, conn: redis.Redis, batch_names: list[str]) -> list[Queue]:
        names = self._order(batch_names)
        # At least one queue to listen on (RQ needs one), before any project has a batch queue.
        return [q.make_queue(n, conn) for n in names or [q.INTERACTIVE]]

    def refresh_queues(self) -> None:
        """Pick up new projects' batch queues, first in the turn (not served yet); keep the known ones' order."""
        if q.BATCH not in self.tiers:
            return
        found = q.batch_queue_names(self.connection)
        known = [n for n in self._batch_turn if n in found]
        self._batch_turn = [n for n in found if n not in known] + known
        self.queues = self._tier_queues(self.connection, self._batch_turn)
        self._ordered_queues = self.queues[:]

    def reorder_queues(self, reference_queue) -> None:
        """The batch queue just served goes to the end of the turn (RQ's round robin, within the tier)."""
        if reference_queue.name in self._batch_turn:
            self._batch_turn.remove(reference_queue.name)
            self._batch_turn.append(reference_queue.name)

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        super().prepare_job_execution(job, remove_from_intermediate_queue)
        # Once RQ has marked the job STARTED: a worker that dies from here on has its job retried. Between
        # the dequeue and that mark, the job is in no queue, and that window is RQ's to keep short.
        if self.prefetch is not None:
            self.look_ahead(job.id)

    def look_ahead(self, current_id: str) -> None:
        """Start fetching the image of the job this worker will most likely take next: the head of the
        first non-empty queue in its dequeue order (another worker may take it first: one wasted fetch)."""
        try:
            for name in self._order(self._batch_turn):  # as the next dequeue will see them
                head = q.make_queue(name, self.connection).get_job_ids(0, 1)
                if head and head[0] != current_id:
                    job = q.fetch_job(head[0], self.connection)
                    if job.func_name in (js.PREDICT_JOB, js.WARM_JOB) and job.args and isinstance(job.args[0], dict):
                        self.prefetch.start(job.args[0])
                    return
        except Exception as exc:  # noqa: BLE001 - a look-ahead never harms the job at hand
            log.debug("look-ahead failed: %s", exc)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """RQ's dequeue, on freshly discovered queues; an idle worker looks again every DISCOVERY_SECONDS."""
        while True:
            self.refresh_queues()
            if timeout is None:  # burst: one non-blocking pass
                return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
            result = super().dequeue_job_and_maintain_ttl(min(timeout, DISCOVERY_SECONDS), DISCOVERY_SECONDS)
            if result is not None:
                return result


def all_queue_names(conn: redis.Redis) -> list[str]:
    """The tier queues and every project's batch queue."""
    return [q.INTERACTIVE, q.WARMUP, *q.batch_queue_names(conn)]


def limit_memory(job_mib: int) -> None:
    """Cap this process's data memory at what it holds now (models loaded) plus ``job_mib``: an allocation
    past it fails (MemoryError, or torch's 'can't allocate memory') inside the job, which then fails with
    that reason, instead of the kernel's OOM killer taking the whole worker (and its host's neighbours)."""
    import resource

    if not sys.platform.startswith("linux"):
        log.warning("HYBRIDGL_JOB_MEMORY is only enforced on Linux; ignored")
        return
    with open("/proc/self/status") as status:
        held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    limit = held + job_mib * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    log.info("memory limit: %d MiB of data (%d MiB held after loading the models + HYBRIDGL_JOB_MEMORY)",
             limit // 2**20, held // 2**20)


# A job RQ had recorded as running on a worker (its execution) but not yet marked STARTED: the worker
# died between RQ's two steps. RQ's abandoned-job handling skips such a job (only STARTED ones are
# retried), which would leave it "queued" in no queue, forever joined by every later request for it.
_REQUEUE_UNSTARTED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


def reap_dead_workers_jobs(conn: redis.Redis) -> list[str]:
    """Hand the started jobs of workers whose registration expired to RQ's abandoned-job handling
    (retry, or fail when no retry is left); a job the dead worker had taken but not yet started goes back
    to the front of its queue. Returns the job ids handed over."""
    if not conn.set(f"{q.PREFIX}:reaper", "1", nx=True, ex=REAPER_LOCK_SECONDS):
        return []  # another worker is reaping now
    alive = {w.get("name") for w in q.live_workers(conn)}
    reaped: list[str] = []
    dead_workers: dict[str, list[str]] = {}
    queue_names = all_queue_names(conn)
    for queue_name in queue_names:
        registry = q.registry(StartedJobRegistry, queue_name, conn)
        expired = {}
        for entry in conn.zrange(registry.key, 0, -1):
            job_id, execution_id = parse_composite_key(entry.decode())
            worker_name = conn.hget(Execution(execution_id, job_id, conn).key, "worker_name")
            worker_name = worker_name.decode() if worker_name else ""
            if worker_name and worker_name not in alive:
                expired[entry] = 0  # expire now: RQ's cleanup treats it as abandoned
                dead_workers.setdefault(worker_name, []).append(job_id)
                reaped.append(job_id)
        if expired:
            conn.zadd(registry.key, expired, xx=True)
            registry.cleanup()
            queue_key = q.make_queue(queue_name, conn).key
            for entry in expired:
                job_id = parse_composite_key(entry.decode())[0]
                if conn.eval(_REQUEUE_UNSTARTED, 2, q.TrustedJob.key_for(job_id), queue_key, job_id):
                    log.warning("job %s was taken by a worker that died before starting it: back in %s", job_id,
                                queue_name)
    for queue_name in queue_names:  # a dead worker's scheduler lock: free it now rather than in a minute
        key = RQScheduler.get_locking_key(queue_name)
        holder = conn.get(key)
        if holder and holder.decode() not in alive:
            release_lock(conn, key, holder.decode())  # only if still the dead one's: a live taker keeps it
    for worker_name, job_ids in dead_workers.items():
        log.warning("worker %s stopped heartbeating while running %s: retried (or failed when out of retries)",
                    worker_name, ", ".join(job_ids))
        q.report_problem(conn, f"worker:{worker_name}", (
            f"worker {worker_name} stopped without finishing {len(job_ids)} job(s) (killed, crashed or out of "
            "memory: see its log); another worker retried them, or failed them when out of retries"),
            DEAD_WORKER_REPORT_SECONDS)
    return reaped
