"""The delivery ledger and the job spec, raced by many threads and by real processes on the real Redis.

Each race counts deliveries: a task must end with exactly one, never two, and never none once its
job has finished. The parties are the ledger's own calls, as /predict, the worker and prelabel make
them (no Label Studio here: the end-to-end race with it is in test_e2e_race.py).
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter

import pytest
import redis
from rq import Queue
from rq.job import JobStatus

from backend import delivery
from backend import jobspec as js
from backend import queue as q
from backend.labeling import parse_label_config

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels></View>"""
ANSWER = {"result": [{"type": "brushlabels"}], "score": 0.5, "model_version": "v1"}


@pytest.fixture
def conn(clean_redis):
    return clean_redis


def _party(redis_url: str, key: str, job_id: str, role: str) -> str:
    """One party of a race on one task, as a flow makes the calls. Returns what it did."""
    conn = redis.Redis.from_url(redis_url)
    ledger = delivery.Ledger(conn, answer_ttl=600)
    view = ledger.view(job_lifetime=600)
    if role == "worker":  # the job finished: store the answer, write when handed off
        return "wrote" if ledger.finish(key, job_id, ANSWER) else "stored"
    if conn.exists(delivery.answer_key(job_id)):  # /predict saw the job finished: return it if ours
        return "returned" if ledger.take(key, job_id, view) else "lost"
    handed = ledger.hand_off(key, job_id, view)  # budget ran out (or prelabel): hand off
    if handed == delivery.ANSWER:  # it finished meanwhile: deliver it ourselves
        return "returned" if ledger.take(key, job_id, view) else "lost"
    return handed


def _deliveries(outcomes: list[str]) -> int:
    return sum(o in ("wrote", "returned") for o in outcomes)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_threads_one_delivery_per_task(conn, redis_url, seed):
    """20 tasks, each raced by 8 requests and its worker in threads (the order shuffled by the seed):
    exactly one delivery each."""
    rng = random.Random(seed)
    tasks = [(delivery.entry_key("7.1700000000", task, "v1"), f"predict-{seed}-{task}") for task in range(20)]
    outcomes: dict[str, list[str]] = {key: [] for key, _ in tasks}
    lock = threading.Lock()
    calls = [(key, job, role) for key, job in tasks for role in ["worker"] + ["web"] * 8]
    rng.shuffle(calls)
    barrier = threading.Barrier(len(calls))

    def run(key, job, role):
        barrier.wait()
        result = _party(redis_url, key, job, role)
        with lock:
            outcomes[key].append(result)

    threads = [threading.Thread(target=run, args=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = {key: _deliveries(found) for key, found in outcomes.items()}
    print(f"seed {seed}: {sorted(Counter(o for found in outcomes.values() for o in found).items())}")
    assert all(n == 1 for n in counts.values()), {k: outcomes[k] for k, n in counts.items() if n != 1}


def _process_party(args) -> str:
    return _party(*args)


@pytest.mark.parametrize("seed", [4, 5])
def test_real_processes_one_delivery_per_task(conn, redis_url, seed):
    """The same race with real processes (own connections, own interpreters)."""
    rng = random.Random(seed)
    tasks = [(delivery.entry_key("7", task, "v1"), f"predict-p{seed}-{task}") for task in range(10)]
    calls = [(redis_url, key, job, role) for key, job in tasks for role in ["worker"] + ["web"] * 5]
    rng.shuffle(calls)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_process_party, calls, chunksize=1)
    by_key: dict[str, list[str]] = {}
    for call, result in zip(calls, results):
        by_key.setdefault(call[1], []).append(result)
    assert {key: _deliveries(found) for key, found in by_key.items()} == {key: 1 for key, _ in tasks}, by_key


def test_a_handed_off_task_is_written_by_its_worker_once(conn):
    ledger = delivery.Ledger(conn, answer_ttl=600)
    key = delivery.entry_key("7", 1, "v1")
    view = ledger.view(600)
    assert ledger.hand_off(key, "job-a", view) == delivery.HANDED
    assert ledger.hand_off(key, "job-a", view) == delivery.HANDED  # a second request, same job
    assert ledger.finish(key, "job-a", ANSWER)  # the worker writes...
    assert not ledger.take(key, "job-a", view)  # ...so a late /predict with the answer does not return it
    # the worker died after deciding, before Label Studio answered: its retry writes (and checks first)
    assert ledger.finish(key, "job-a", ANSWER)
    assert not ledger.finish(key, "job-b", ANSWER)  # another job of the task does not
    ledger.written(key, "job-a")
    assert ledger.state(key)["state"] == delivery.WRITTEN
    assert not ledger.finish(key, "job-a", ANSWER)  # written: no second write


def test_a_job_that_finished_before_the_hand_off_is_delivered_by_the_caller(conn):
    """The budget ended between the job's decision and its stored result: the answer is stored first."""
    ledger = delivery.Ledger(conn, answer_ttl=600)
    key = delivery.entry_key("7", 2, "v1")
    view = ledger.view(600)
    assert not ledger.finish(key, "job-a", ANSWER)  # nobody handed off: it leaves delivery to the waiter
    assert ledger.hand_off(key, "job-a", view) == delivery.ANSWER
    assert ledger.answer("job-a") == ANSWER
    assert ledger.take(key, "job-a", view)


def test_a_deleted_prediction_is_delivered_again_but_not_a_concurrent_one(conn):
    """A view of Label Studio taken after a delivery, without its prediction: it was deleted."""
    ledger = delivery.Ledger(conn, answer_ttl=600, settle=0)
    key = delivery.entry_key("7", 3, "v1")
    before = ledger.view(600)  # a request whose tasks were read before the first delivery
    assert ledger.take(key, "job-a", before)
    assert not ledger.take(key, "job-a", before)  # concurrent with it: its view cannot show it yet
    assert ledger.hand_off(key, "job-a", before) == delivery.DELIVERED
    after = ledger.view(600)  # read after the delivery, and the task has no prediction: deleted
    assert ledger.hand_off(key, "job-a", after) == delivery.HANDED
    assert ledger.take(key, "job-a", after)


def test_a_write_in_progress_counts_for_the_jobs_whole_lifetime(conn):
    ledger = delivery.Ledger(conn, answer_ttl=600, settle=0)
    key = delivery.entry_key("7", 4, "v1")
    ledger.hand_off(key, "job-a", ledger.view(600))
    assert ledger.finish(key, "job-a", ANSWER)  # writing: Label Studio may not show it yet
    assert not ledger.take(key, "job-b", ledger.view(job_lifetime=600))
    assert ledger.take(key, "job-b", ledger.view(job_lifetime=0))  # its job cannot be alive any more


def test_the_unit_is_project_task_and_model_version():
    assert delivery.entry_key("7.1700000000", 5, "v1") != delivery.entry_key("7.1700000000", 5, "v2")
    assert delivery.entry_key("7.1700000000", 5, "v1") != delivery.entry_key("8.1700000000", 5, "v1")
    # Project 7 of another Label Studio (or of this one reinstalled) sharing the workers: another project.
    assert delivery.entry_key("7.1700000000", 5, "v1") != delivery.entry_key("7.1800000000", 5, "v1")


def test_prelabel_keys_a_project_as_predict_does():
    """prelabel reads the project from Label Studio's API; /predict gets '<id>.<created timestamp>' in its body."""
    assert js.project_uid({"id": 7, "created_at": "2023-11-14T22:13:20.123456Z"}) == "7.1700000000"
    assert js.project_uid({"id": 7, "created_at": "2023-11-14T23:13:20.999+01:00"}) == "7.1700000000"
    assert js.project_uid({"id": 7}) is None and js.project_uid({"id": 7, "created_at": "yesterday"}) is None


def _spec(**changes) -> js.JobSpec:
    parts = dict(model_version="v1", project="7.1700000000", task_id=5, image="/data/upload/1/a.png",
                 expressions=[{"text": "the dog", "label": "Dog"}], clicks=[], config=parse_label_config(CONFIG),
                 config_digest=js.config_text_digest(CONFIG), interactive=False, origin="web")
    parts.update(changes)
    return js.prediction_job(**parts)


def test_job_ids_change_with_what_changes_the_answer_only():
    base = _spec()
    assert _spec(origin="prelabel").job_id == base.job_id  # prelabel joins /predict's job
    assert _spec(project="7.1800000000").job_id != base.job_id  # another Label Studio's project 7
    cosmetic = CONFIG.replace("<View>", '<View><Header value="Segment"/>')
    assert _spec(config=parse_label_config(cosmetic)).job_id == base.job_id
    for changed in (_spec(image="/data/upload/1/b.png"), _spec(model_version="v2"), _spec(task_id=6),
                    _spec(expressions=[{"text": "the cat", "label": "Dog"}]),
                    _spec(config=parse_label_config(CONFIG.replace("Dog", "Cat"))),
                    _spec(config=parse_label_config(CONFIG.replace('name="mask"', 'name="brush"')))):
        assert changed.job_id != base.job_id
    assert base.payload["deliver"] == js.Delivery.LEDGER and "label_config" not in base.payload


def test_the_label_config_is_stored_once_by_digest(conn):
    digest = js.store_label_config(conn, CONFIG)
    assert digest == js.store_label_config(conn, CONFIG) and conn.dbsize() == 1
    conn.expire(js.label_config_key(digest), 5)
    assert js.load_label_config(conn, digest) == CONFIG
    assert conn.ttl(js.label_config_key(digest)) > js.LABEL_CONFIG_TTL - 60  # refreshed on use
    assert js.load_label_config(conn, "0" * 64) is None


def test_racing_enqueues_push_one_job(conn):
    """Many first requests for one task at once: one job is queued, every caller gets its id."""
    jobs = q.JobQueue(conn, retries=0)
    spec = _spec()
    barrier = threading.Barrier(24)
    ids: list[str] = []

    def enqueue():
        barrier.wait()
        ids.append(q.JobQueue(redis.Redis(connection_pool=conn.connection_pool), retries=0).enqueue(spec).id)

    threads = [threading.Thread(target=enqueue) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ids == [spec.job_id] * 24
    assert Queue(spec.queue, connection=conn).get_job_ids() == [spec.job_id]
    assert jobs.enqueue(spec).id == spec.job_id and Queue(spec.queue, connection=conn).count == 1


def test_an_ended_job_is_replaced_by_the_next_enqueue(conn):
    jobs = q.JobQueue(conn, retries=0)
    spec = _spec()
    job = jobs.enqueue(spec)
    Queue(spec.queue, connection=conn).remove(job)
    job.set_status(JobStatus.FAILED)
    again = jobs.enqueue(spec)
    assert again.get_status() == JobStatus.QUEUED
    assert Queue(spec.queue, connection=conn).get_job_ids() == [spec.job_id]
    assert q.fetch_job(spec.job_id, conn).args[0] == spec.payload


def test_a_selection_over_1000_tasks_is_served_and_handed_off(tiny_settings, redis_url, conn, tmp_path):
    """Retrieve Predictions on 1,200 tasks: Label Studio sends them in one request; every task gets an
    entry, and with no worker running (none is started here) every one is handed off to its job."""
    import httpx

    from .services import service_env, start_backend

    backend, url = start_backend(service_env(tiny_settings, redis_url, HYBRIDGL_BATCH_BUDGET="1"), tmp_path)
    try:
        tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png", "prompt": "the dog"}, "predictions": []}
                 for i in range(1, 1201)]
        config = CONFIG.replace("<View>", '<View><Text name="prompt" value="$prompt"/>')
        response = httpx.post(url + "/predict", json={"tasks": tasks, "project": "7.1700000000",
                                                      "label_config": config}, timeout=100)
    finally:
        backend.stop()
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [[]] * 1200
    assert Queue(js.batch_queue("7"), connection=conn).count == 1200
    from backend.app import PROVISIONAL_VERSION  # no worker has published a model version

    states = {delivery.Ledger(conn, 600).state(delivery.entry_key("7.1700000000", i, PROVISIONAL_VERSION)).get("state")
              for i in range(1, 1201)}
    assert states == {delivery.HANDOFF}
