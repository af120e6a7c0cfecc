"""Faults with real processes: a worker killed mid-batch, Redis restarted mid-batch, Label Studio
unreachable for 30 s while predictions are written back, an image too big for a worker's memory.

Each test runs a real `hybridgl prelabel` batch on a real Label Studio (1.23.2) through real workers
and a real backend, on a Redis of this module's own (so that it can be restarted), with the workers
reaching Label Studio through a TCP relay (so that it can be made unreachable while the test still
reads it directly). Each checks that the affected jobs end retried or failed with a reason, that
/health reports the degraded part while it is, and that after the recovery the README documents
(automatic, or a `prelabel` re-run) every task has exactly one prediction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from rq import Worker

from backend.queue import fetch_job

from .services import REPO, RedisServer, TcpProxy, service_env, start_backend, start_worker, wait_for
from .test_e2e_labelstudio import ls  # noqa: F401 - module fixture: a real Label Studio
from .test_prelabel import CONFIG, RUN_TIMEOUT, Background, _image, _predicted, _tasks

HEARTBEAT = "1"  # seconds: a killed worker is taken as dead after 3 s


@pytest.fixture(scope="module")
def faults(ls, tiny_settings, tmp_path_factory):  # noqa: F811
    logs = tmp_path_factory.mktemp("fault-logs")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    proxy = TcpProxy(urlsplit(ls.url).port)
    # Workers and backend reach Label Studio through the relay; `prelabel` (the operator's side) directly.
    workers_env = service_env(tiny_settings, server.url, LABEL_STUDIO_URL=proxy.url, LABEL_STUDIO_API_KEY=ls.token,
                              HYBRIDGL_WORKER_HEARTBEAT=HEARTBEAT)
    backend, url = start_backend(workers_env, logs)
    state = {"redis": server, "proxy": proxy, "url": url, "logs": logs, "workers_env": workers_env,
             "env": {**workers_env, "LABEL_STUDIO_URL": ls.url}, "workers": []}
    yield state
    for worker in state["workers"]:
        worker.stop()
    backend.stop()
    proxy.cut()
    server.kill()


def _worker(faults, name: str, **env: str):
    worker = start_worker({**faults["workers_env"], **env}, f"{name}-{os.getpid()}", faults["logs"],
                          faults["redis"].url)
    faults["workers"].append(worker)
    return worker


def _project(ls, name: str, count: int) -> tuple[int, list[int]]:  # noqa: F811
    images = [_image(ls, ("dog.jpg", "groceries.jpg")[k % 2], f"fault-{name}-{k}") for k in range(count)]
    project = ls.create_project(f"faults {name}", CONFIG)
    ls.add_local_storage(project["id"])
    return project["id"], ls.import_tasks(project["id"], _tasks(ls, images))


def _health(faults) -> tuple[int, dict]:
    response = httpx.get(faults["url"] + "/health", timeout=10)
    return response.status_code, response.json()


def _health_mentions(faults, text: str) -> bool:
    status, body = _health(faults)
    return status == 200 and body["status"] == "DEGRADED" and any(text in p for p in body["problems"])


def _worker_name(worker) -> str:
    return worker.log_path.stem


def _job_running_on(faults, worker) -> str:
    """Wait until the worker runs a batch job; its id."""
    found: list[str] = []

    def running() -> bool:
        conn = redis.Redis.from_url(faults["redis"].url)
        rq_worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + _worker_name(worker), connection=conn)
        job_id = rq_worker.get_current_job_id() if rq_worker else None
        if job_id and job_id.startswith("predict-"):
            found.append(job_id)
        return bool(found)

    wait_for(running, 120, f"{_worker_name(worker)} to run a batch job")
    return found[0]


def _one_prediction_each(ls, faults, task_ids: list[int]) -> None:  # noqa: F811
    version = redis.Redis.from_url(faults["redis"].url).get("hybridgl:model_version").decode()
    assert {t: [p["model_version"] for p in ls.predictions(t)] for t in task_ids} == {t: [version] for t in task_ids}


def _retries_left(faults, job_id: str) -> int:
    return fetch_job(job_id, redis.Redis.from_url(faults["redis"].url)).retries_left


def _summary(run: Background) -> dict:
    return json.loads(run.summary.read_text())


# --- a worker killed -----------------------------------------------------------------------------
def test_worker_killed_mid_batch_another_worker_retries_its_job(ls, faults, tmp_path):  # noqa: F811
    doomed, survivor = _worker(faults, "doomed"), _worker(faults, "survivor")
    project, ids = _project(ls, "killed", 4)
    run = Background(faults, tmp_path, project)
    try:
        job_id = _job_running_on(faults, doomed)
        doomed.stop(signal.SIGKILL)
        wait_for(lambda: _health_mentions(faults, f"worker {_worker_name(doomed)} stopped without finishing 1 job(s)"),
                 60, "/health to report the killed worker")
        _, body = _health(faults)
        assert [w["name"] for w in body["workers"]] == [_worker_name(survivor)]
        assert run.wait() == 0, run.output()
    finally:
        run.kill()
    assert _retries_left(faults, job_id) == 2  # one retry spent (HYBRIDGL_JOB_RETRIES=3), then done
    assert _summary(run)["predicted"] == len(ids)
    _one_prediction_each(ls, faults, ids)
    survivor.stop()


def test_killed_worker_job_without_retries_fails_with_reason_then_rerun(ls, faults, tmp_path):  # noqa: F811
    """The only worker dies and the batch allows no retry: once a worker runs again, the job is failed
    with the reason (not left 'started' until its timeout); a prelabel re-run predicts it."""
    doomed = _worker(faults, "alone")
    project, ids = _project(ls, "no retry", 2)
    run = Background({"env": {**faults["env"], "HYBRIDGL_JOB_RETRIES": "0"}}, tmp_path, project)
    try:
        job_id = _job_running_on(faults, doomed)
        doomed.stop(signal.SIGKILL)
        wait_for(lambda: _health_mentions(faults, "no worker is running"), 60, "/health to report no worker")
        replacement = _worker(faults, "replacement")
        assert run.wait() == 1, run.output()
    finally:
        run.kill()
    reasons = _summary(run)["failed_tasks"]
    [(reason, tasks)] = reasons.items()
    assert "the worker running it stopped without finishing (killed, crashed or out of memory)" in reason
    assert len(tasks) == 1
    body = httpx.get(f"{faults['url']}/jobs/{job_id}", timeout=10).json()
    assert body["status"] == "failed" and body["reason"].startswith("the worker running it stopped")

    code, out = _rerun(faults, project)
    assert code == 0, out
    _one_prediction_each(ls, faults, ids)
    replacement.stop()


def _rerun(faults, project: int) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "backend.prelabel", "--project", str(project), "--no-progress"],
                          env=faults["env"], cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    return done.returncode, done.stdout + done.stderr


# --- Redis restarted -----------------------------------------------------------------------------
def test_redis_restarted_mid_batch(ls, faults, tmp_path):  # noqa: F811
    worker = _worker(faults, "through-restart")
    project, ids = _project(ls, "redis restart", 4)
    run = Background(faults, tmp_path, project)
    conn = redis.Redis.from_url(faults["redis"].url)
    try:
        wait_for(lambda: any(_predicted(ls, project).values()), 300, "a first prediction")
        faults["redis"].kill()
        wait_for(lambda: _health(faults)[0] == 503, 30, "/health to answer 503")
        status, body = _health(faults)
        assert body["status"] == "DOWN" and "Redis is unreachable" in body["problems"][0]
        faults["redis"].start()  # empty: queue, jobs and registrations are gone
        wait_for(lambda: conn.exists(f"hybridgl:worker:{_worker_name(worker)}"), 60,
                 "the worker to register again (it survived the restart)")
        assert run.wait() == 0, run.output()  # it re-enqueued the jobs that vanished
    finally:
        run.kill()
    assert "jobs vanished from Redis" in run.output()
    assert worker.process.poll() is None
    _one_prediction_each(ls, faults, ids)
    code, out = _rerun(faults, project)
    assert code == 0 and "enqueued 0 task(s)" in out, out
    worker.stop()


# --- Label Studio unreachable --------------------------------------------------------------------
OUTAGE_SECONDS = 30


def test_label_studio_unreachable_for_30s_while_predictions_are_written(ls, faults, tmp_path):  # noqa: F811
    worker = _worker(faults, "through-outage")
    project, ids = _project(ls, "outage", 4)
    run = Background(faults, tmp_path, project)
    try:
        wait_for(lambda: any(_predicted(ls, project).values()), 300, "a first prediction")
        faults["proxy"].cut()
        cut_at = time.monotonic()
        try:
            wait_for(lambda: _health_mentions(faults, "workers cannot reach Label Studio"), OUTAGE_SECONDS,
                     "/health to report Label Studio unreachable")
            # The outage lasts its full length; /health keeps reporting it throughout.
            while time.monotonic() - cut_at < OUTAGE_SECONDS:
                assert _health_mentions(faults, "workers cannot reach Label Studio")
                time.sleep(1)  # the outage's duration, not synchronisation
        finally:
            faults["proxy"].restore()
        assert run.wait() == 0, run.output()
    finally:
        run.kill()
    conn = redis.Redis.from_url(faults["redis"].url)
    retried = [k for k in conn.scan_iter("rq:job:predict-*") if int(conn.hget(k, "retries_left") or 3) < 3]
    assert retried, "no job was retried: the outage hit no job"
    _one_prediction_each(ls, faults, ids)
    wait_for(lambda: not _health_mentions(faults, "Label Studio"), 30, "/health to drop the Label Studio problem")
    worker.stop()


# --- an image too big for a worker's memory budget -----------------------------------------------
def test_image_too_big_for_the_memory_budget_fails_alone_then_rerun_with_more_memory(ls, faults, tmp_path):  # noqa: F811
    """HYBRIDGL_JOB_MEMORY=3000 MiB is enough for the half-size photos (measured: they fail at 1500) and
    not for a 17-megapixel one (a 12-megapixel one needs 3000-6000). The big task fails with the reason,
    the worker goes on with the others; with more memory, a prelabel re-run predicts the big one too."""
    from PIL import Image

    from .services import DATA

    big = f"big-{os.getpid()}.jpg"
    Image.open(DATA / "dog.jpg").convert("RGB").resize((4800, 3600)).save(ls.images_dir / big, quality=90)
    small = [_image(ls, base, f"fault-memory-{k}") for k, base in enumerate(["dog.jpg", "groceries.jpg"])]
    project = ls.create_project("faults memory", CONFIG)["id"]
    ls.add_local_storage(project)
    ids = ls.import_tasks(project, _tasks(ls, [big, *small]))  # the big one first: the others run after it
    for earlier in faults["workers"]:  # the tight worker alone takes the jobs (no other worker has the cap)
        earlier.stop()
    tight = _worker(faults, "tight", HYBRIDGL_JOB_MEMORY="3000")
    run = Background(faults, tmp_path, project)
    try:
        assert run.wait() == 1, run.output()
    finally:
        run.kill()
    [(reason, tasks)] = _summary(run)["failed_tasks"].items()
    assert tasks == [ids[0]]
    assert reason.startswith("out of memory while processing its 4800x3600 image (HYBRIDGL_JOB_MEMORY=3000 MiB; "
                             "allocating "), reason
    assert "more failed; also with the worker's index cache emptied): lower IMAGE_MAX_PIXELS" in reason
    assert _predicted(ls, project) == {ids[0]: 0, ids[1]: 1, ids[2]: 1}
    assert tight.process.poll() is None  # the worker survived and ran the other tasks
    assert _health_mentions(faults, f"ran out of memory on task {ids[0]} (4800x3600 image")

    tight.stop()
    _worker(faults, "roomy", HYBRIDGL_JOB_MEMORY="9000")
    code, out = _rerun(faults, project)
    assert code == 0, out
    _one_prediction_each(ls, faults, ids)
