"""Batches and cancel on a real Redis, with no worker running (every job stays queued until canceled).

Cancel removes only the batch's own queued jobs: those another live batch of the project holds stay,
other projects are untouched, and callers canceling at once remove each job once.
"""

from __future__ import annotations

import threading

import pytest
import redis
from rq import Queue

from backend import batches
from backend import jobspec as js
from backend import queue as q
from backend.labeling import parse_label_config

CONFIG = """<View><Image name="image" value="$image"/><Text name="prompt" value="$prompt"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels></View>"""


@pytest.fixture
def conn(redis_url):
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


def _batch(conn: redis.Redis, project: str, tasks, kind: str = batches.PRELABEL) -> tuple[str, list[str]]:
    config = parse_label_config(CONFIG)
    digest = js.store_label_config(conn, CONFIG)
    jobs = q.JobQueue(conn, retries=0)
    ids = [jobs.enqueue(js.prediction_job(
        model_version="v1", project=project, task_id=t, image=f"http://images/{t}.png",
        expressions=[{"text": "the dog", "label": "Dog"}], clicks=[], config=config, config_digest=digest,
        interactive=False, origin="prelabel")).id for t in tasks]
    batch = batches.create(conn, project, kind)
    batches.add_jobs(conn, batch, ids)
    return batch, ids


def test_cancel_leaves_what_another_live_batch_holds_and_other_projects(conn):
    run, run_jobs = _batch(conn, "5.1700000000", range(1, 6))  # prelabel keys it as /predict does
    retrieve, _ = _batch(conn, "5.1700000000", range(3, 8), batches.PREDICT)  # joins tasks 3-5, adds 6-7
    other, other_jobs = _batch(conn, "6.1700000000", range(1, 4))
    assert batches.cancel(conn, run, result_ttl=60) == 2  # tasks 1-2: 3-5 are the Retrieve's too
    state = batches.state(conn, run)
    assert (state.queued, state.canceled, state.state) == (3, 2, "active")
    assert batches.cancel(conn, retrieve, result_ttl=60) == 5  # the canceled run holds nothing back
    assert Queue(js.batch_queue("5"), connection=conn).count == 0
    assert batches.state(conn, run).state == "canceled" and batches.state(conn, retrieve).canceled == 5
    assert Queue(js.batch_queue("6"), connection=conn).get_job_ids() == other_jobs
    assert batches.state(conn, other).queued == 3
    # A canceled job is enqueued again by the next run.
    _, again = _batch(conn, "5.1700000000", [1])
    assert again == run_jobs[:1] and Queue(js.batch_queue("5"), connection=conn).get_job_ids() == again


def test_concurrent_cancels_remove_each_job_once(conn):
    run, _ = _batch(conn, "5", range(1, 41))
    removed: list[int] = []
    barrier = threading.Barrier(8)

    def cancel() -> None:
        own = redis.Redis(connection_pool=conn.connection_pool)
        barrier.wait()
        removed.append(batches.cancel(own, run, result_ttl=60))

    threads = [threading.Thread(target=cancel) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(removed) == 40 and Queue(js.batch_queue("5"), connection=conn).count == 0
    assert batches.state(conn, run).canceled == 40


def test_listing_and_table(conn):
    first, _ = _batch(conn, "5", range(1, 3))
    second, _ = _batch(conn, "6", range(1, 2), batches.PREDICT)
    assert [b.id for b in batches.listing(conn)] == [first, second]
    assert [b.id for b in batches.listing(conn, "6.1700000000")] == [second]
    text = batches.table(batches.listing(conn))
    assert first in text and second in text and "QUEUED" in text.splitlines()[0]
    with pytest.raises(batches.BatchNotFound):
        batches.state(conn, "0123456789ab")
    assert q.project_depths(conn) == {"5": 2, "6": 1}
