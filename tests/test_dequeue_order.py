"""The order a worker takes jobs in (worker.runner.FairWorker), on the real RQ and Redis.

Interactive first, then every project's batch queue in turn, then warm-ups; a project whose queue
appears while the worker runs is served at once, and an interactive job that arrives during a batch
goes next. The worker is RQ's SimpleWorker subclass used by `hybridgl worker`, run in burst mode in
this process; the jobs record the order they ran in and enqueue the late arrivals themselves. The job
function is this test's own, so the worker gets RQ's plain Job class instead of TrustedJob (which runs
only hybridgl's job functions); payloads are JSON as in production.
"""

from __future__ import annotations

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from backend import jobspec as js
from worker.runner import FairWorker

ORDER = "fairshare-test:order"
_URL: list[str] = []


def record(name: str, then: list[str] | None = None) -> None:
    """The job: note that it ran; optionally enqueue another job (queue, name), as a new caller would."""
    conn = redis.Redis.from_url(_URL[0])
    conn.rpush(ORDER, name)
    if then is not None:
        _queue(then[0], conn).enqueue(record, then[1])


def _queue(name: str, conn: redis.Redis) -> Queue:
    return Queue(name, connection=conn, serializer=JSONSerializer)


@pytest.fixture
def conn(redis_url):
    _URL[:] = [redis_url]
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


def test_interactive_first_projects_in_turn_new_ones_at_once_warmups_last(conn):
    a, b, c = js.batch_queue("11"), js.batch_queue("12"), js.batch_queue("13")
    _queue(js.WARMUP, conn).enqueue(record, "w1")
    _queue(a, conn).enqueue(record, "a1", [c, "c1"])  # project 13's first job arrives during a1
    _queue(a, conn).enqueue(record, "a2")
    _queue(a, conn).enqueue(record, "a3")
    _queue(b, conn).enqueue(record, "b1", [js.INTERACTIVE, "i2"])  # a prompt arrives during b1
    _queue(b, conn).enqueue(record, "b2")
    _queue(js.INTERACTIVE, conn).enqueue(record, "i1")
    FairWorker(js.QUEUES, connection=conn, name="order-worker", job_class=Job).work(burst=True)
    order = [x.decode() for x in conn.lrange(ORDER, 0, -1)]
    # First in, first out over one batch queue would be a1 a2 a3 b1 b2 (c1 last).
    assert order == ["i1", "a1", "c1", "b1", "i2", "a2", "b2", "a3", "w1"]


def test_a_worker_without_the_batch_tier_never_takes_batch_jobs(conn):
    _queue(js.batch_queue("11"), conn).enqueue(record, "a1")
    _queue(js.INTERACTIVE, conn).enqueue(record, "i1")
    FairWorker((js.INTERACTIVE,), connection=conn, name="interactive-only", job_class=Job).work(burst=True)
    assert [x.decode() for x in conn.lrange(ORDER, 0, -1)] == ["i1"]
    assert Queue(js.batch_queue("11"), connection=conn).count == 1
