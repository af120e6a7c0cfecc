"""The web backend and a real RQ worker over a real Redis, through HTTP.

The worker runs the pipeline with real MobileSAM weights and a random-weight CLIP; images come
from a local HTTP server (allow-listed). Label Studio itself is in test_e2e_labelstudio.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from label_studio_sdk.converter.brush import decode_rle

from .services import free_port, service_env, start_backend, start_worker, wait_for

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Dog"/><Label value="Grass"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="Dog"/><Label value="Grass"/></RectangleLabels>
  <PolygonLabels name="outline" toName="image"><Label value="Dog"/><Label value="Grass"/></PolygonLabels>
</View>"""
INTERACTIVE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Dog" smart="true"/></KeyPointLabels>
</View>"""
DOG_HW = (534, 800)
WORKER_NAME = f"test-worker-{os.getpid()}"


@pytest.fixture(scope="module")
def stack(tiny_settings, redis_url, tmp_path_factory):
    """One worker and one backend for this module."""
    logs = tmp_path_factory.mktemp("logs")
    # Budgets far above any job here: these tests check answers, not the hand-off (test_e2e does).
    env = service_env(tiny_settings, redis_url, HYBRIDGL_TORCH_THREADS="2", HYBRIDGL_BATCH_BUDGET="300")
    worker = start_worker(env, WORKER_NAME, logs, redis_url)
    backend, url = start_backend(env, logs)
    client = httpx.Client(base_url=url, timeout=120)
    yield {"url": url, "client": client, "backend": backend, "worker": worker, "env": env, "logs": logs}
    client.close()
    backend.stop()
    worker.stop()


def _predict(client, tasks, config, context=None, project="7.1700000000"):
    return client.post("/predict", json={"tasks": tasks, "project": project, "label_config": config,
                                         "params": {"context": context}})


def _textarea(text: str) -> dict:
    return {"result": [{"value": {"text": [text]}, "id": "p1", "from_name": "prompt", "to_name": "image",
                        "type": "textarea", "origin": "manual"}]}


def test_web_process_never_imports_torch(stack):
    maps = Path(f"/proc/{stack['backend'].process.pid}/maps").read_text()
    assert "libtorch" not in maps
    code = ("import sys; from backend.app import create_app; from worker.cli import build_parser; "
            "build_parser(); create_app(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=stack["env"], check=True)
    assert out.stdout.strip() == "False"


def test_health_and_setup_report_the_workers_model_version(stack, redis_url):
    client = stack["client"]
    health = client.get("/health").json()
    assert health["status"] == "UP", health
    assert [w["name"] for w in health["workers"]] == [WORKER_NAME]
    version = health["workers"][0]["model_version"]
    assert version.startswith("hybridgl-vit_t-ViT-T-16-test-")
    setup = client.post("/setup", json={"project": "7.1700000000", "schema": BRUSH_CONFIG,
                                        "hostname": "http://127.0.0.1:1", "access_token": "x"})
    assert setup.status_code == 200 and setup.json() == {"model_version": version}
    bad = client.post("/setup", json={"project": "7.1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert bad.status_code == 422 and "Image" in bad.json()["error"]


def test_batch_predict_fills_every_output_tag(stack, image_server):
    tasks = [{"id": 1, "data": {"image": f"{image_server}/dog.jpg", "prompt": "the dog on the left"}},
             {"id": 2, "data": {"image": f"{image_server}/dog.jpg",
                                "prompts": [{"text": "the grass", "label": "Grass"}, "the dog"]}}]
    response = _predict(stack["client"], tasks, BRUSH_CONFIG)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    version = stack["client"].get("/health").json()["model_version"]
    for entry, regions in zip(results, (1, 2)):
        assert entry["model_version"] == version
        assert len(entry["result"]) == 3 * regions  # brush + rectangle + polygon per expression
        types = sorted(r["type"] for r in entry["result"])
        assert types == sorted(["brushlabels", "rectanglelabels", "polygonlabels"] * regions)
        for r in entry["result"]:
            assert (r["original_height"], r["original_width"]) == DOG_HW
            if r["type"] == "brushlabels":
                mask = decode_rle(r["value"]["rle"]).reshape(*DOG_HW, 4)[:, :, 3]
                assert mask.any() and set(np.unique(mask)) <= {0, 255}
    # The label given with the prompt; "the dog" names no label of two, so its region has none.
    labels = [r["value"]["brushlabels"] for r in results[1]["result"] if r["type"] == "brushlabels"]
    assert labels == [["Grass"], []]


def test_a_project_of_another_label_studio_gets_its_own_prediction(stack, image_server):
    """Two Label Studio instances sharing the workers (staging and production, one reinstalled) both
    have a project 7 with a task 1: Label Studio's '<id>.<created timestamp>' keeps them apart."""
    task = {"id": 1, "data": {"image": f"{image_server}/dog.jpg", "prompt": "the dog on the left"}}
    first = _predict(stack["client"], [task], BRUSH_CONFIG, project="7.1700000001").json()["results"]
    # Same ids, image and config, just delivered: neither its finished job nor its ledger entry counts here.
    other = _predict(stack["client"], [task], BRUSH_CONFIG, project="7.1800000001").json()["results"]
    assert len(first[0]["result"]) == 3 and len(other[0]["result"]) == 3
    # The same project asking again within the settle window is the one that already has it.
    again = _predict(stack["client"], [task], BRUSH_CONFIG, project="7.1700000001").json()["results"]
    assert again == [[]]


def test_a_bad_task_does_not_fail_the_others(stack, image_server, redis_url):
    tasks = [{"id": 11, "data": {"image": f"{image_server}/dog.jpg", "prompt": "the dog"}},
             {"id": 12, "data": {"picture": "x.jpg", "prompt": "the dog"}},  # no image field
             {"id": 13, "data": {"image": f"{image_server}/missing.jpg", "prompt": "the dog"}},  # 404
             {"id": 14, "data": {"image": "file:///etc/passwd", "prompt": "the dog"}}]  # refused scheme
    response = _predict(stack["client"], tasks, BRUSH_CONFIG)
    assert response.status_code == 200
    results = response.json()["results"]
    assert results[0]["result"] and results[1:] == [[], [], []]
    from rq import Queue
    from rq.registry import FailedJobRegistry

    from backend.jobspec import batch_queue
    from backend.queue import fetch_jobs, job_error, make_queue

    conn = redis.Redis.from_url(redis_url)
    registry = FailedJobRegistry(queue=make_queue(batch_queue("7"), conn))
    reasons = {}
    for job in fetch_jobs(registry.get_job_ids(), conn):
        reasons[job.args[0]["task_id"]] = job_error(job, job.latest_result())
    assert "404" in reasons[13] or "not found" in reasons[13].lower()
    assert "file" in reasons[14].lower()
    job_id = registry.get_job_ids()[0]
    status = stack["client"].get(f"/jobs/{job_id}").json()
    assert status["status"] == "failed" and status["reason"]


def test_interactive_prompt_then_clicks(stack, image_server, redis_url):
    client = stack["client"]
    task = {"id": 21, "data": {"image": f"{image_server}/dog.jpg"}}
    # Task open: nothing to predict, answered at once; the image's index is warmed.
    opened = _predict(client, [task], INTERACTIVE_CONFIG, None)
    assert opened.json() == {"results": [[]]}

    answer = _predict(client, [task], INTERACTIVE_CONFIG, _textarea("the dog\n"))
    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["results"]
    [region] = prediction["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Dog"]
    prompt_mask = decode_rle(region["value"]["rle"]).reshape(*DOG_HW, 4)[:, :, 3] > 0
    # Label Studio sends only the click after a prompt: the backend refines that prompt's mask.
    y, x = np.argwhere(~prompt_mask)[0] if (~prompt_mask).any() else (0, 0)
    refined = _predict(client, [task], INTERACTIVE_CONFIG, _click(x, y, True, "c1"))
    assert refined.status_code == 200, refined.text
    [region] = refined.json()["results"][0]["result"]
    refined_mask = decode_rle(region["value"]["rle"]).reshape(*DOG_HW, 4)[:, :, 3] > 0
    assert refined_mask.any() and not np.array_equal(refined_mask, prompt_mask)
    assert region["score"] != 1.0  # SAM's own quality estimate, not a flat 1.0
    # A second (negative) click adds to the first: the job is asked for both, on the prompt's mask.
    second = _predict(client, [task], INTERACTIVE_CONFIG, _click(x + 1, y, False, "c2"))
    assert second.status_code == 200, second.text
    payload = _interactive_payload(redis_url, 2)
    assert payload["refine"]["text"] == "the dog" and [c["positive"] for c in payload["clicks"]] == [True, False]
    # Another prompt, then the first one typed again: the next click corrects the first prompt's mask.
    assert _predict(client, [task], INTERACTIVE_CONFIG, _textarea("the grass")).status_code == 200
    assert _predict(client, [task], INTERACTIVE_CONFIG, _textarea("the dog")).status_code == 200  # joins its job
    again = _predict(client, [task], INTERACTIVE_CONFIG, _click(x, y, True, "c3"))
    [region] = again.json()["results"][0]["result"]
    assert np.array_equal(decode_rle(region["value"]["rle"]).reshape(*DOG_HW, 4)[:, :, 3] > 0, refined_mask)


def _click(x, y, positive: bool, region_id: str) -> dict:
    return {"result": [{"original_width": 800, "original_height": 534, "image_rotation": 0,
                        "value": {"x": float(x) * 100 / 800, "y": float(y) * 100 / 534, "width": 0.3,
                                  "keypointlabels": ["Dog"]},
                        "is_positive": positive, "id": region_id, "from_name": "click", "to_name": "image",
                        "type": "keypointlabels", "origin": "manual"}]}


def _interactive_payload(redis_url: str, clicks: int) -> dict:
    """The payload of the task's interactive job with this many clicks."""
    from backend.queue import fetch_jobs

    conn = redis.Redis.from_url(redis_url)
    jobs = fetch_jobs(_all_job_ids(conn, "interactive"), conn)
    [payload] = [j.args[0] for j in jobs if j and j.args[0]["task_id"] == 21 and len(j.args[0]["clicks"]) == clicks]
    return payload


def test_warm_up_makes_the_first_prompt_a_cache_hit(stack, image_server, redis_url):
    client = stack["client"]
    task = {"id": 31, "data": {"image": f"{image_server}/groceries.jpg"}}
    assert _predict(client, [task], INTERACTIVE_CONFIG, None).json() == {"results": [[]]}
    conn = redis.Redis.from_url(redis_url)
    from backend.jobspec import warm_job
    from backend.queue import fetch_jobs

    # The warm-up's id is the job spec's (looked up by id: a job a worker has just popped is in no list).
    spec = warm_job(project="7.1700000000", task_id=31, image=task["data"]["image"], interactive=True)
    [job] = fetch_jobs([spec.job_id], conn)
    assert job is not None and job.args[0]["image"] == task["data"]["image"]
    wait_for(lambda: job.get_status(refresh=True) == "finished", 120, "the warm-up job")
    built = _metric(client.get("/metrics").text, 'hybridgl_index_lookups_total{source="built"}')
    answer = _predict(client, [task], INTERACTIVE_CONFIG, _textarea("the bag"))
    assert answer.status_code == 200
    metrics = client.get("/metrics").text
    assert _metric(metrics, 'hybridgl_index_lookups_total{source="built"}') == built  # nothing rebuilt


def _all_job_ids(conn, queue):
    from rq import Queue
    from rq.registry import FinishedJobRegistry, StartedJobRegistry

    q = Queue(queue, connection=conn)
    return list(q.job_ids) + StartedJobRegistry(queue=q).get_job_ids() + FinishedJobRegistry(queue=q).get_job_ids()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_errors_are_json_and_say_what_is_wrong(stack):
    client = stack["client"]
    r = client.post("/predict", content=b'{"tasks": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    r = client.post("/predict", json={"tasks": "nope", "label_config": BRUSH_CONFIG})
    assert r.status_code == 422 and "tasks" in r.json()["error"]
    r = _predict(client, [{"id": 1, "data": {"image": "x"}}], "<View><Image name='i' value='$image'/></View>")
    assert r.status_code == 422 and "BrushLabels" in r.json()["error"]
    r = _predict(client, [{"id": 1, "data": {"image": "x"}}], INTERACTIVE_CONFIG, _textarea("x" * 5000))
    assert r.status_code == 422 and "1000" in r.json()["error"]
    r = client.get("/jobs/does-not-exist")
    assert r.status_code == 404 and "no job" in r.json()["error"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and 'hybridgl_queue_depth{queue="interactive"}' in metrics.text


def test_basic_auth(tiny_settings, redis_url, tmp_path):
    env = service_env(tiny_settings, redis_url, BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret")
    backend, url = start_backend(env, tmp_path)
    try:
        assert httpx.get(url + "/health").status_code == 401
        assert httpx.get(url + "/health", auth=("ann", "wrong")).status_code == 401
        assert "error" in httpx.post(url + "/setup", json={}).json()
        assert httpx.get(url + "/health", auth=("ann", "s3cret")).status_code in (200, 503)
    finally:
        backend.stop()


def test_redis_down_gives_503_json(tiny_settings, tmp_path):
    env = service_env(tiny_settings, f"redis://127.0.0.1:{free_port()}/0")
    backend, url = start_backend(env, tmp_path)
    try:
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "DOWN"
        r = httpx.post(url + "/predict", json={"tasks": [{"id": 1, "data": {"image": "/x.jpg", "prompt": "a"}}],
                                               "label_config": BRUSH_CONFIG})
        assert r.status_code == 503 and "Redis" in r.json()["error"]
    finally:
        backend.stop()


def test_interactive_timeout_is_a_clear_json_error(stack, tiny_settings, redis_url, image_server, tmp_path):
    """A budget shorter than any job: the answer is a 504 that says what to look at, never a hang."""
    env = dict(stack["env"], HYBRIDGL_INTERACTIVE_TIMEOUT="0.001")
    backend, url = start_backend(env, tmp_path)
    try:
        task = {"id": 41, "data": {"image": f"{image_server}/truck.jpg"}}
        r = httpx.post(url + "/predict", timeout=30, json={
            "tasks": [task], "project": "7.1", "label_config": INTERACTIVE_CONFIG,
            "params": {"context": _textarea("the truck")}})
        assert r.status_code == 504
        assert "no answer within" in r.json()["error"] and "/jobs/" in r.json()["error"]
        # Nobody waits for it any more: not left queued for the next module's worker (a truck to index).
        from rq import Queue

        Queue("interactive", connection=redis.Redis.from_url(redis_url)).remove(r.json()["error"].rsplit("/", 1)[1])
    finally:
        backend.stop()
