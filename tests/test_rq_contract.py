"""What worker/runner.py relies on in RQ (pinned in pyproject.toml), checked on the real RQ and Redis.

A real RQ SimpleWorker process runs a job that holds until the test releases it (both wait on
Redis lists, no sleeps): while it runs, the dead-worker reaper must read the worker's name where
it looks for it. RQ's scheduler locks are owned: one holder at a time, refreshed by it, released
only by it. And a Redis error while a job counts itself for /metrics never replaces its outcome.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import redis
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.utils import parse_composite_key

from backend import jobspec as js
from backend import queue as q
from worker.runner import reap_dead_workers_jobs

WORKER = "contract-worker"
BATCH_QUEUE = js.batch_queue("7")  # a project's batch queue, as the reaper finds it


def hold(started: str, release: str) -> str:
    """The job: say it runs, then wait for the test's word."""
    conn = redis.Redis.from_url(_URL[0])
    conn.rpush(started, "1")
    conn.blpop([release], timeout=60)
    return "released"


_URL: list[str] = []


def _work(url: str) -> None:
    _URL.append(url)
    conn = redis.Redis.from_url(url)
    SimpleWorker([Queue(BATCH_QUEUE, connection=conn)], connection=conn, name=WORKER).work(burst=True)


@pytest.fixture
def conn(clean_redis):
    return clean_redis


def test_the_reaper_reads_the_running_workers_name(conn, redis_url):
    job = Queue(BATCH_QUEUE, connection=conn).enqueue(hold, "contract:started", "contract:release", job_timeout=120)
    worker = multiprocessing.get_context("spawn").Process(target=_work, args=(redis_url,))
    worker.start()
    try:
        assert conn.blpop(["contract:started"], timeout=120), "the worker never started the job"
        entries = conn.zrange(StartedJobRegistry(BATCH_QUEUE, connection=conn).key, 0, -1)
        job_id, execution_id = parse_composite_key(entries[0].decode())
        assert job_id == job.id
        assert conn.hget(Execution(execution_id, job_id, conn).key, "worker_name") == WORKER.encode()
        q.register_worker(conn, WORKER, {"name": WORKER, "model_version": "v1"}, heartbeat=60)
        assert reap_dead_workers_jobs(conn) == []  # alive: its job is left alone
        q.unregister_worker(conn, WORKER)
        conn.delete(f"{js.PREFIX}:reaper")  # the reaper's own 5 s lock, so that it runs again now
        assert reap_dead_workers_jobs(conn) == [job.id]  # its registration gone: the job is reaped
    finally:
        conn.rpush("contract:release", "1")
        worker.join(120)
    assert worker.exitcode == 0


class _DiesBeforeStarting(SimpleWorker):
    """A real RQ worker that stops between RQ's two steps of taking a job: the execution is recorded (the
    job is in the started registry under this worker's name) but the job is not yet marked STARTED.
    The test SIGKILLs it there, as the OOM killer or a lost host may."""

    def perform_job(self, job, queue, execution):
        self.connection.rpush("contract:taken", "1")
        self.connection.blpop(["contract:never"], timeout=120)
        return super().perform_job(job, queue, execution)


def _work_and_die(url: str) -> None:
    conn = redis.Redis.from_url(url)
    _DiesBeforeStarting([Queue(BATCH_QUEUE, connection=conn)], connection=conn, name=WORKER).work(burst=True)


def test_a_job_whose_worker_died_before_starting_it_goes_back_to_its_queue(conn, redis_url):
    """RQ retries only STARTED jobs of a dead worker: this one would stay 'queued' in no queue, and every
    request for it would join it and wait forever (seen in tests/test_e2e_race.py)."""
    queue = Queue(BATCH_QUEUE, connection=conn)
    job = queue.enqueue(hold, "contract:started", "contract:release", job_timeout=120)
    later = queue.enqueue(hold, "contract:started", "contract:release", job_timeout=120)
    worker = multiprocessing.get_context("spawn").Process(target=_work_and_die, args=(redis_url,))
    worker.start()
    try:
        assert conn.blpop(["contract:taken"], timeout=120), "the worker never took the job"
        assert job.get_status(refresh=True) == "queued" and queue.get_job_ids() == [later.id]
        assert conn.zcard(StartedJobRegistry(BATCH_QUEUE, connection=conn).key) == 1
    finally:
        worker.kill()
        worker.join(60)
    assert reap_dead_workers_jobs(conn) == [job.id]
    assert queue.get_job_ids() == [job.id, later.id]  # at the front: it was next
    assert job.get_status(refresh=True) == "queued"
    conn.delete(f"{js.PREFIX}:reaper")
    assert reap_dead_workers_jobs(conn) == [] and queue.get_job_ids() == [job.id, later.id]  # once only


def test_scheduler_locks_have_one_owner_who_alone_releases_them(conn):
    first = RQScheduler([BATCH_QUEUE], connection=conn, name="first")
    second = RQScheduler([BATCH_QUEUE], connection=conn, name="second")
    key = RQScheduler.get_locking_key(BATCH_QUEUE)
    first.acquire_locks()
    second.acquire_locks()
    assert first.acquired_locks == {BATCH_QUEUE} and second.acquired_locks == set()
    conn.expire(key, 5)
    first.acquire_locks()  # every tick: the holder refreshes its lock
    assert conn.ttl(key) > 5
    conn.delete(key)  # the lock expired (the holder stalled) and the second worker took it over
    second.acquire_locks()
    first.acquire_locks()  # the next tick re-checks ownership: the first no longer moves due retries
    assert first.acquired_locks == set() and second.acquired_locks == {BATCH_QUEUE}
    first.release_locks()
    assert conn.get(key) == b"second"  # shutting down releases only one's own locks


def test_the_reaper_frees_only_a_dead_workers_scheduler_lock(conn):
    key = RQScheduler.get_locking_key(BATCH_QUEUE)
    conn.sadd(Queue.redis_queues_keys, Queue(BATCH_QUEUE, connection=conn).key)  # as RQ's first enqueue records it
    q.register_worker(conn, "alive", {"name": "alive", "model_version": "v1"}, heartbeat=60)
    conn.set(key, "alive")
    reap_dead_workers_jobs(conn)
    assert conn.get(key) == b"alive"
    conn.delete(f"{js.PREFIX}:reaper")
    conn.set(key, "dead")
    reap_dead_workers_jobs(conn)
    assert conn.get(key) is None


def test_a_scheduler_takes_queues_named_after_it_started(conn):
    """worker.runner sets RQScheduler._queue_names each tick to cover project queues that appeared since."""
    scheduler = RQScheduler([js.INTERACTIVE], connection=conn, name="grows")
    scheduler.acquire_locks()
    assert scheduler.acquired_locks == {js.INTERACTIVE}
    scheduler._queue_names = {js.INTERACTIVE, BATCH_QUEUE}
    scheduler.acquire_locks()
    assert scheduler.acquired_locks == {js.INTERACTIVE, BATCH_QUEUE}
    scheduler.release_locks()


@pytest.fixture
def no_counting(redis_url):
    """A connection to the real Redis as a user that may do anything but HINCRBYFLOAT (what counting
    uses): a real Redis error at the moment a job counts itself."""
    admin = redis.Redis.from_url(redis_url)
    user = f"ledger-test-{os.getpid()}"
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-hincrbyfloat"])
    try:
        yield redis.Redis.from_url(redis_url, username=user, password="pw")
    finally:
        admin.acl_deluser(user)


def test_a_redis_error_while_counting_never_hides_the_jobs_failure(no_counting):
    from backend.config import ServeSettings
    from worker import jobs

    with pytest.raises(redis.exceptions.NoPermissionError):
        q.count(no_counting, "job_count:batch")  # the error is real
    previous = jobs._runtime
    jobs.set_runtime(jobs.Runtime(ServeSettings.from_env({}), no_counting, pipeline=None, cache=None))
    try:
        with pytest.raises(jobs.JobFailed, match="label config is no longer in Redis"):
            jobs.predict({"task_id": 9, "project": "7", "image": "/data/upload/1/a.png",
                          "label_config_digest": "0" * 64, "expressions": [], "clicks": [], "deliver": "ledger"})
    finally:
        jobs._runtime = previous
