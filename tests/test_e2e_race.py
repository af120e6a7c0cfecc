"""Many people and commands on one project at once, with a real Label Studio 1.23.2, a real Redis,
a real backend and two real workers: exactly one prediction per task afterwards.

Each round, on a new project of 20 tasks: three *Retrieve Predictions* on all the tasks pressed at
once, every task opened (Label Studio's task API asks the backend for a task without predictions),
`hybridgl prelabel` on the project, and one worker SIGKILLed while it runs one of the jobs (the drawn
one, or the other when the drawn one is idle). The
moments at which each party starts are drawn from a seeded generator; each round prints its seed,
those moments and what the ledger decided, so that a failing timing can be replayed. The short
sleeps only place those moments; every wait for an outcome polls Label Studio or Redis.

Lean on purpose (the suite's time limit): the tiny CLIP, two half-size photos shared by the tasks (one
the same every round, its index built once; one new each round, whose index is built while the kill
comes), one module-scoped Label Studio, backend and Redis.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis
from rq import Worker

from backend import delivery
from backend import jobspec as js

from .services import REPO, service_env, start_backend, start_worker, wait_for
from .test_e2e_labelstudio import _drain, ls  # noqa: F401 - module fixture: a real Label Studio
from .test_prelabel import CONFIG, RUN_TIMEOUT, _image, _tasks

SEEDS = (1401, 1402)
TASKS = 20


@pytest.fixture(scope="module")
def race(ls, tiny_settings, redis_url, tmp_path_factory):  # noqa: F811
    logs = tmp_path_factory.mktemp("race-logs")
    # Heartbeat 1 s: a killed worker's job is retried by the other within seconds. A budget of 2 s: some
    # tasks are answered in /predict responses, others handed off to their workers.
    env = service_env(tiny_settings, redis_url, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                      HYBRIDGL_WORKER_HEARTBEAT="1", HYBRIDGL_BATCH_BUDGET="2")
    backend, url = start_backend(env, logs)
    state = {"env": env, "url": url, "logs": logs, "workers": {}}
    yield state
    for worker in state["workers"].values():
        worker.stop()
    backend.stop()


def _two_workers(race, redis_url: str) -> None:
    for n in range(2):
        worker = race["workers"].get(n)
        if worker is None or worker.process.poll() is not None:
            race["workers"][n] = start_worker(race["env"], f"race-{n}-{os.getpid()}-{time.monotonic_ns()}",
                                              race["logs"], redis_url)


def _running_job(conn: redis.Redis, name: str) -> str | None:
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=conn)
    job_id = worker.get_current_job_id() if worker else None
    return job_id if job_id and job_id.startswith("predict-") else None


@pytest.mark.parametrize("seed", SEEDS)
def test_everyone_at_once_leaves_one_prediction_per_task(ls, race, redis_url, seed):  # noqa: F811
    rng = random.Random(seed)
    conn = redis.Redis.from_url(redis_url)
    _two_workers(race, redis_url)
    project = ls.create_project(f"race {seed}", CONFIG)
    ls.add_local_storage(project["id"])
    ls.connect_ml_backend(project["id"], race["url"], is_interactive=True)
    # One photo shared by the rounds and one new each round: the new one's index is built during the
    # round, so a worker is busy for seconds (a round on cached indexes only could end before the kill,
    # with no job left to kill a worker in).
    images = [_image(ls, "dog.jpg", "race"), _image(ls, "groceries.jpg", f"race-{seed}")]
    ids = ls.import_tasks(project["id"], _tasks(ls, [images[k % 2] for k in range(TASKS)]))
    plan = {"retrieve": [round(rng.uniform(0, 0.3), 3) for _ in range(3)],
            "open": [round(rng.uniform(0, 0.15), 3) for _ in ids], "open_order": rng.sample(ids, len(ids)),
            "prelabel": round(rng.uniform(0, 1.0), 3), "kill": round(rng.uniform(0.5, 3.0), 3),
            "victim": rng.randrange(2)}
    errors: list[BaseException] = []
    killed: list[str] = []
    start = threading.Barrier(6)

    def party(action):
        def run():
            try:
                start.wait()
                action()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        return threading.Thread(target=run)

    def retrieve(delay):
        time.sleep(delay)
        ls.retrieve_predictions(project["id"], ids)

    def open_tasks(order):
        for task_id in order:
            time.sleep(plan["open"][ids.index(task_id)])
            ls.task(task_id)

    prelabel: list[subprocess.Popen] = []

    def run_prelabel():
        time.sleep(plan["prelabel"])
        prelabel.append(subprocess.Popen([sys.executable, "-m", "backend.prelabel", "--project", str(project["id"]),
                                          "--no-progress"], env=race["env"], cwd=REPO, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))

    def kill_one():
        time.sleep(plan["kill"])
        # The drawn victim if it runs a prediction job, else the other worker if it does (one may be idle).
        order = [plan["victim"], 1 - plan["victim"]]
        busy: list[tuple[int, str]] = []

        def running() -> bool:
            for n in order:
                job = _running_job(conn, race["workers"][n].log_path.stem)
                if job is not None:
                    busy.append((n, job))
                    return True
            return False

        wait_for(running, 300, "a worker to run a prediction job")
        n, job = busy[-1]
        killed.append(f"{job} on worker {n}")
        os.kill(race["workers"][n].process.pid, signal.SIGKILL)

    half = len(ids) // 2
    threads = [party(lambda d=d: retrieve(d)) for d in plan["retrieve"]]
    threads += [party(lambda: open_tasks(plan["open_order"][:half])), party(lambda: open_tasks(plan["open_order"][half:]))]
    threads.append(party(kill_one))
    prelabel_thread = threading.Thread(target=run_prelabel)
    for t in threads:
        t.start()
    prelabel_thread.start()
    for t in threads + [prelabel_thread]:
        t.join(RUN_TIMEOUT)
    assert not errors, errors
    output, _ = prelabel[0].communicate(timeout=RUN_TIMEOUT)
    assert prelabel[0].returncode == 0, output
    _drain(redis_url)
    version = httpx.get(race["url"] + "/health", timeout=5).json()["model_version"]
    found = {t: [p["model_version"] for p in ls.predictions(t)] for t in ids}
    key = js.project_uid(project)  # the ledger's key of the project, as /predict's body names it
    states = [conn.hget(delivery.entry_key(key, t, version), "state") for t in ids]
    print(f"seed {seed}: plan {plan}; killed while running {killed}; ledger "
          f"{sorted((s or b'-').decode() for s in states)}")
    assert found == {t: [version] for t in ids}
