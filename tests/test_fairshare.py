"""Projects share the workers: a big batch of one project does not hold another project's request
behind it, and a batch can be seen and canceled without touching anything else.

Real Redis, a real `hybridgl worker` process (started before either project has a queue: it finds
them itself), the web app in-process over HTTP, `hybridgl batches` and `hybridgl prelabel --cancel`
as real commands. Label Studio plays no part in the order jobs run in, so it is not here: images come
from a local HTTP server and no task is handed off (test_e2e_labelstudio.py goes through Label Studio).
Every job uses one image, so after the first (which builds the index) jobs are short: the test counts
jobs, never times them.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job
from rq.suspension import resume, suspend

from backend import batches
from backend import jobspec as js
from backend import queue as q
from backend.app import create_app
from backend.config import ServeSettings
from backend.labeling import parse_label_config

from .services import REPO, service_env, start_worker, wait_for

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Text name="prompt" value="$prompt"/>
  <BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels>
</View>"""
BIG, SMALL = 200, 5
HELD = 3  # jobs of the big batch that a re-run also holds when it is canceled
BIG_PROJECT, SMALL_PROJECT = "1", "2.1700000000"


@pytest.fixture(scope="module")
def shared(tiny_settings, redis_url, image_server, tmp_path_factory):
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    env = service_env(tiny_settings, redis_url, HYBRIDGL_TORCH_THREADS="2")
    worker = start_worker(env, "fairshare-worker", tmp_path_factory.mktemp("logs"), redis_url)
    app = create_app(ServeSettings(redis_url=redis_url, batch_budget=300.0))
    with TestClient(app) as web:
        yield {"conn": conn, "web": web, "image": f"{image_server}/dog.jpg", "env": env, "worker": worker}
    resume(conn)
    worker.stop()
    conn.flushdb()


def _big_batch(conn: redis.Redis, image: str, tasks: range) -> tuple[str, list[str]]:
    """What `hybridgl prelabel` does for each task: the job that /predict would build, in a batch."""
    config = parse_label_config(CONFIG)
    digest = js.store_label_config(conn, CONFIG)
    jobs = q.JobQueue(conn, retries=0)
    batch = batches.create(conn, BIG_PROJECT, batches.PRELABEL)
    ids = []
    for task_id in tasks:
        spec = js.prediction_job(model_version=q.current_model_version(conn), project=BIG_PROJECT, task_id=task_id,
                                 image=image, expressions=[{"text": "the dog", "label": "Dog"}], clicks=[],
                                 config=config, config_digest=digest, interactive=False, origin="prelabel")
        ids.append(jobs.enqueue(spec).id)
    batches.add_jobs(conn, batch, ids)
    return batch, ids


def _status(conn: redis.Redis, job_ids: list[str]) -> list[str]:
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        return [s.decode() if s else "gone" for s in pipe.execute()]


def test_a_small_request_overtakes_a_big_batch_and_the_big_batch_is_canceled(shared):
    conn, web = shared["conn"], shared["web"]
    big, big_ids = _big_batch(conn, shared["image"], range(1000, 1000 + BIG))
    wait_for(lambda: _status(conn, big_ids).count("finished") >= 2, 300, "the worker to run the big batch")

    # Retrieve Predictions on 5 tasks of another project, pressed twice at once (two concurrent callers).
    tasks = [{"id": 1 + k, "data": {"image": shared["image"], "prompt": "the dog"}, "predictions": []}
             for k in range(SMALL)]
    arrived = q.redis_now(conn)
    answers: list = [None, None]

    def retrieve(slot: int) -> None:
        answers[slot] = web.post("/predict", json={"tasks": tasks, "project": SMALL_PROJECT, "label_config": CONFIG})

    callers = [threading.Thread(target=retrieve, args=(slot,)) for slot in range(2)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    results = [a.json()["results"] for a in answers]
    # Each task's prediction is in exactly one of the two responses (the ledger), and all 5 are there.
    assert all(sum(bool(r[i]) for r in results) == 1 for i in range(SMALL)), results

    small = batches.listing(conn, SMALL_PROJECT)
    assert len(small) == 2 and all(b.done == SMALL and b.state == "finished" for b in small)
    small_ids = sorted({m.decode() for b in small for m in conn.smembers(batches.jobs_key(b.id))})
    assert len(small_ids) == SMALL  # the two requests joined the same jobs
    last_small_end = max(Job.fetch(j, connection=conn).ended_at for j in small_ids)
    # The big batch's jobs that held the small request up: running when it arrived, or started before its
    # last job ended. First in, first out would be every one still queued (~195); in turn, at most one per
    # worker plus one between each two of the small request's jobs.
    delayed = 0
    for job in Job.fetch_many(big_ids, connection=conn):
        if job.started_at and job.started_at < last_small_end and (job.ended_at is None or
                                                                   job.ended_at.timestamp() > arrived):
            delayed += 1
    print(f"big-batch jobs run while the {SMALL}-task request was served: {delayed}")
    assert delayed <= SMALL, delayed

    # Cancel the big batch while another run of the same project holds its last HELD jobs: those stay.
    suspend(conn)  # the worker stops taking jobs (after the one it runs): what is queued stays queued
    wait_for(lambda: "started" not in _status(conn, big_ids), 300, "the running job to finish")
    rerun, _ = _big_batch(conn, shared["image"], range(1000 + BIG - HELD, 1000 + BIG))
    queued_before = _status(conn, big_ids).count("queued")
    assert queued_before > HELD
    canceled: list = [None, None]

    def delete() -> None:
        canceled[0] = web.delete(f"/batches/{big}")

    def command() -> None:
        canceled[1] = subprocess.run([sys.executable, "-m", "worker.cli", "prelabel", "--project", BIG_PROJECT,
                                      "--cancel", big], env=shared["env"], cwd=REPO, capture_output=True, text=True,
                                     timeout=120)

    callers = [threading.Thread(target=delete), threading.Thread(target=command)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert canceled[0].status_code == 200, canceled[0].text
    assert canceled[1].returncode == 0, canceled[1].stdout + canceled[1].stderr
    by_command = int(canceled[1].stdout.split("canceled ")[1].split(" ")[0])
    assert canceled[0].json()["canceled"] + by_command == queued_before - HELD
    statuses = _status(conn, big_ids)
    assert statuses.count("canceled") == queued_before - HELD and statuses[-HELD:] == ["queued"] * HELD
    assert Queue(js.batch_queue(BIG_PROJECT), connection=conn).get_job_ids() == big_ids[-HELD:]
    state = web.get(f"/batches/{big}").json()
    assert state["canceled"] == queued_before - HELD and state["queued"] == HELD and state["failed"] == 0
    assert state["done"] == BIG - queued_before
    assert f'hybridgl_project_queue_depth{{project="1"}} {HELD}' in web.get("/metrics").text
    assert all(b.done == SMALL for b in batches.listing(conn, SMALL_PROJECT))  # untouched

    table = subprocess.run([sys.executable, "-m", "worker.cli", "batches", "--project", BIG_PROJECT],
                           env=shared["env"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and big in table.stdout and rerun in table.stdout, table.stdout + table.stderr

    # The re-run's jobs run once the workers go on; a canceled job can be enqueued again (a later re-run).
    resume(conn)
    wait_for(lambda: web.get(f"/batches/{rerun}").json()["state"] == "finished", 300, "the re-run to finish")
    again = _big_batch(conn, shared["image"], range(1000, 1001))[1]
    assert _status(conn, again) in (["queued"], ["started"], ["finished"])


def test_unknown_batches_are_clear_404s(shared):
    web = shared["web"]
    for batch_id in ("0123456789ab", "not-a-batch", "x" * 300):
        for response in (web.get(f"/batches/{batch_id}"), web.delete(f"/batches/{batch_id}")):
            assert response.status_code == 404 and "GET /batches" in response.json()["error"], response.text
