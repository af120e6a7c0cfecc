"""Prefetch (worker.prefetch): the next job's image is fetched while the current job runs.

The Prefetcher's rules with real threads; then a real worker, a real Redis and an image host that
answers slowly (a local HTTP server that waits before each answer, as a distant host would).
"""

from __future__ import annotations

import threading
import time

import pytest

from backend import jobspec as js
from backend import queue as q
from backend.labeling import parse_label_config
from worker.prefetch import Prefetcher

from .services import DATA, serve_directory, service_env, start_worker


def _payload(image: str, project: str = "9.1700000000") -> dict:
    return {"image": image, "project": project, "task_id": 1}


def test_a_prefetched_image_is_taken_once_by_its_job():
    loads: list[str] = []
    prefetch = Prefetcher(lambda p: loads.append(p["image"]) or p["image"].upper())
    prefetch.start(_payload("a"))
    prefetch.start(_payload("a"))  # already on its way: not fetched twice
    assert prefetch.take(_payload("b")) is None  # another image
    assert prefetch.take(_payload("a", project="9.1800000000")) is None  # another project's access
    assert prefetch.take(_payload("a")) == "A"
    assert prefetch.take(_payload("a")) is None  # taken: the next job with it fetches it itself
    assert loads == ["a"]
    prefetch.close()


def test_at_most_two_images_are_held_and_failures_are_left_to_the_job():
    release = threading.Event()

    def load(payload):
        release.wait(30)
        if payload["image"] == "broken":
            raise OSError("the host hung up")
        return payload["image"]

    prefetch = Prefetcher(load)
    for image in ("a", "b", "c"):  # "a" is dropped for "c"
        prefetch.start(_payload(image))
    release.set()
    assert prefetch.take(_payload("a")) is None
    assert (prefetch.take(_payload("b")), prefetch.take(_payload("c"))) == ("b", "c")
    prefetch.start(_payload("broken"))
    assert prefetch.take(_payload("broken")) is None  # the job fetches it and reports its own failure
    stale = Prefetcher(lambda p: p["image"], max_age=0)
    stale.start(_payload("a"))
    assert stale.take(_payload("a")) is None  # too old: the image may have changed
    prefetch.close()
    stale.close()


@pytest.fixture
def slow_host():
    """An image host that answers each request after 1 s; ``arrivals`` records when each came."""
    arrivals: list[tuple[str, float]] = []
    server, url = serve_directory(DATA, delay=1.0, arrivals=arrivals)
    yield url, arrivals
    server.shutdown()


CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels></View>"""


def test_a_worker_fetches_the_next_image_while_it_runs_a_job(tiny_settings, redis_url, clean_redis, slow_host,
                                                             tmp_path):
    """Two queued jobs, one worker: the second job's image is requested while the first job runs (before
    it ends), once, and the second job takes it from the prefetch."""
    host, arrivals = slow_host
    conn = clean_redis
    jobs = q.JobQueue(conn)
    digest = js.store_label_config(conn, CONFIG)
    specs = [js.prediction_job(model_version="v1", project="9.1700000000", task_id=task, image=f"{host}/{name}",
                               expressions=[{"text": "the dog", "label": "Dog"}], clicks=[],
                               config=parse_label_config(CONFIG), config_digest=digest, interactive=False,
                               origin="test")
             for task, name in ((1, "dog.jpg"), (2, "groceries.jpg"))]
    for spec in specs:
        jobs.enqueue(spec)
    worker = start_worker(service_env(tiny_settings, redis_url), "prefetch-worker", tmp_path, redis_url)
    try:
        outcomes = jobs.wait([s.job_id for s in specs], time.monotonic() + 300)
    finally:
        worker.stop()
    assert [o.status for o in outcomes.values()] == ["finished", "finished"], outcomes
    first = q.fetch_job(specs[0].job_id, conn)
    requested = dict(arrivals)
    assert sorted(p for p, _ in arrivals) == ["/dog.jpg", "/groceries.jpg"]  # each image once
    assert requested["/groceries.jpg"] < first.ended_at.timestamp()  # while the first job ran
    assert q.metrics(conn).get("images_prefetched") == 1
