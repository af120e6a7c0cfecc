"""End to end with a real Label Studio 1.23.2, a real Redis, a real worker and real photos.

The worker runs the pipeline with MobileSAM's real weights and a random-weight CLIP (so which mask
is chosen is arbitrary; that masks are produced, delivered once and decode correctly is not).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from .labelstudio import start_label_studio
from .services import DATA, REPO, service_env, start_backend, start_worker, wait_for

CONFIGS = {p.stem: p.read_text() for p in sorted((REPO / "label_config").glob("*.xml"))}
PHOTOS = ("dog.jpg", "groceries.jpg")
# Singular referring expressions, one per photo: HybridGL's single choice (a plural such as "the groceries"
# asks for every instance instead, see worker/hybridgl/instances.py).
PROMPTS = {"dog.jpg": "the dog", "groceries.jpg": "the bag of groceries"}
SIZES = {"dog.jpg": (534, 800), "groceries.jpg": (534, 800)}  # (H, W); variants made by tests are added


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    instance = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    for name in PHOTOS:
        shutil.copy(DATA / name, instance.images_dir / name)
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def stack(ls, tiny_settings, redis_url, tmp_path_factory):
    logs = tmp_path_factory.mktemp("e2e-logs")
    env = service_env(tiny_settings, redis_url, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                      HYBRIDGL_TORCH_THREADS="2")
    worker = start_worker(env, f"e2e-worker-{os.getpid()}", logs, redis_url)
    backend, url = start_backend(env, logs)
    yield {"env": env, "url": url, "logs": logs, "worker": worker}
    backend.stop()
    worker.stop()


def _project(ls, name: str, config: str, tasks: list[dict], backend_url: str, interactive: bool = True):
    project = ls.create_project(f"e2e {name}", config)
    ls.add_local_storage(project["id"])
    ml = ls.connect_ml_backend(project["id"], backend_url, is_interactive=interactive)
    ids = ls.import_tasks(project["id"], tasks)
    return project, ml, ids


LIVE_STATUSES = (b"queued", b"started", b"scheduled", b"deferred")


def _drain(redis_url: str, timeout: float = 300) -> None:
    """Wait until no job is queued or running (every project's batch queue included)."""
    from rq import Queue
    from rq.registry import ScheduledJobRegistry, StartedJobRegistry

    from backend import queue as jq

    conn = redis.Redis.from_url(redis_url)

    def idle() -> bool:
        queues = ("interactive", "warmup", *jq.batch_queue_names(conn))
        if not all(Queue(q, connection=conn).count == 0 and StartedJobRegistry(q, connection=conn).count == 0
                   and ScheduledJobRegistry(q, connection=conn).count == 0 for q in queues):
            return False
        # A job a worker has just popped is in no queue and not yet in the started registry: its own
        # record still says queued. A retry waiting in the scheduled registry is counted above.
        for key in conn.scan_iter("rq:job:*", count=1000):
            if conn.type(key) == b"hash" and conn.hget(key, "status") in LIVE_STATUSES:
                return False
        return True

    wait_for(idle, timeout, "the queues to drain")


def _mask(region: dict) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3]


def _check_brush(region: dict, image: str, labels: list[str]) -> None:
    mask = _mask(region)
    assert mask.shape == SIZES[image]
    assert mask.any() and set(np.unique(mask)) <= {0, 255}
    assert region["value"]["brushlabels"] == labels


def _model_version(url: str) -> str:
    return httpx.get(url + "/health", timeout=5).json()["model_version"]


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_retrieve_predictions_gives_one_prediction_per_task(ls, stack, redis_url, config_name):
    images = list(PHOTOS)
    tasks = [{"image": ls.local_files_url(name), "prompt": PROMPTS[name]} for name in images]
    if config_name == "label_names":
        tasks = [{"image": ls.local_files_url(name)} for name in images]
    project, _, ids = _project(ls, config_name, CONFIGS[config_name], tasks, stack["url"])
    ls.retrieve_predictions(project["id"], ids)
    _drain(redis_url)  # jobs past the budget write their predictions themselves
    version = _model_version(stack["url"])
    for task_id, image in zip(ids, images):
        predictions = ls.predictions(task_id)
        assert len(predictions) == 1, predictions
        [prediction] = predictions
        assert prediction["model_version"] == version
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        if config_name == "label_names":
            # Label names ask for every instance and none of an absent label: how many regions each gets
            # depends on CLIP's (random, here) weights; each region has one label of the config.
            for region in brushes:
                assert region["value"]["brushlabels"][0] in ("dog", "fence", "grass")
                _check_brush(region, image, region["value"]["brushlabels"])
            if brushes:  # the prediction's score is its least confident region
                assert prediction["score"] == pytest.approx(min(r["score"] for r in brushes))
        else:
            [region] = brushes
            _check_brush(region, image, ["Object"])
        if config_name == "batch_prompts":
            assert sorted(r["type"] for r in prediction["result"]) == ["brushlabels", "polygonlabels",
                                                                       "rectanglelabels"]
    # Retrieving again changes nothing: Label Studio skips tasks predicted with this model version.
    ls.retrieve_predictions(project["id"], ids)
    _drain(redis_url)
    assert [len(ls.predictions(t)) for t in ids] == [1] * len(ids)


def test_interactive_text_prompt(ls, stack):
    _, ml, [task_id] = _project(ls, "interactive", CONFIGS["interactive_text_prompt"],
                                [{"image": ls.local_files_url("dog.jpg")}], stack["url"])
    context = {"result": [{"value": {"text": ["the dog\n"]}, "id": "p1", "from_name": "prompt",
                           "to_name": "image", "type": "textarea", "origin": "manual"}]}
    answer = ls.interactive_annotating(ml["id"], task_id, context)
    assert "errors" not in answer, answer
    [region] = answer["data"]["result"]
    assert region["type"] == "brushlabels"
    _check_brush(region, "dog.jpg", ["Object"])
    assert ls.predictions(task_id) == []  # a suggestion, not a stored prediction


def _variant(ls, name: str, k: int) -> str:
    """A new image (new content hash, so no cache hit) derived from a test photo."""
    image = Image.open(DATA / name).convert("RGB")
    image = image.transpose(Image.FLIP_LEFT_RIGHT) if k % 2 else image
    image = image.rotate(0 if k < 2 else 180)
    target = f"{Path(name).stem}-variant-{k}.png"
    image.save(ls.images_dir / target)
    SIZES[target] = SIZES[name]
    return target


def test_hand_off_when_the_budget_is_shorter_than_the_job(ls, stack, tiny_settings, redis_url, tmp_path):
    """/predict answers before the jobs finish; each job writes its own prediction, once."""
    env = dict(stack["env"], HYBRIDGL_BATCH_BUDGET="0.01")
    backend, url = start_backend(env, tmp_path)
    try:
        images = [_variant(ls, "dog.jpg", k) for k in (1, 2)]
        tasks = [{"image": ls.local_files_url(name), "prompt": "the dog"} for name in images]
        project, _, ids = _project(ls, "hand-off", CONFIGS["batch_prompts"], tasks, url)
        handed_before = _counter(url, "hybridgl_tasks_handed_off_total")
        ls.retrieve_predictions(project["id"], ids)
        assert _counter(url, "hybridgl_tasks_handed_off_total") == handed_before + len(ids)
        _drain(redis_url)
        for task_id, image in zip(ids, images):
            [prediction] = ls.predictions(task_id)
            [brush] = [r for r in prediction["result"] if r["type"] == "brushlabels"]
            _check_brush(brush, image, ["Object"])
    finally:
        backend.stop()


def _counter(url: str, name: str, auth=None) -> float:
    for line in httpx.get(url + "/metrics", timeout=5, auth=auth).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} missing from /metrics")


def test_warm_up_on_import_makes_the_next_query_hit_the_cache(ls, stack, redis_url):
    project = ls.create_project("e2e warm-up", CONFIGS["interactive_text_prompt"])
    ls.add_local_storage(project["id"])
    ml = ls.connect_ml_backend(project["id"], stack["url"], is_interactive=True)
    built_before = _counter(stack["url"], 'hybridgl_index_lookups_total{source="built"}')
    image = _variant(ls, "groceries.jpg", 3)
    # Importing sends TASKS_CREATED to the backend's /webhook, which enqueues a warm-up job.
    [task_id] = ls.import_tasks(project["id"], [{"image": ls.local_files_url(image)}])
    wait_for(lambda: _counter(stack["url"], 'hybridgl_index_lookups_total{source="built"}') == built_before + 1,
             180, "the warm-up job to build the new image's index")
    context = {"result": [{"value": {"text": ["the bag"]}, "id": "p1", "from_name": "prompt",
                           "to_name": "image", "type": "textarea", "origin": "manual"}]}
    answer = ls.interactive_annotating(ml["id"], task_id, context)
    assert "errors" not in answer, answer
    _check_brush(answer["data"]["result"][0], image, ["Object"])
    assert _counter(stack["url"], 'hybridgl_index_lookups_total{source="built"}') == built_before + 1


def test_warm_up_on_import_with_basic_auth(ls, stack, redis_url, tmp_path):
    """The README's recipe: a backend with Basic auth, connected with the same credentials; Label Studio's
    auto-created webhook (created with its SSRF protection on, only loopback lifted) gets the Authorization
    header, and an import warms the new image's index."""
    import base64

    auth = ("labelstudio", "e2e-backend-password")
    backend, url = start_backend(dict(stack["env"], BASIC_AUTH_USER=auth[0], BASIC_AUTH_PASS=auth[1]), tmp_path)
    try:
        project = ls.create_project("e2e warm-up with auth", CONFIGS["interactive_text_prompt"])
        ls.add_local_storage(project["id"])
        ls.connect_ml_backend(project["id"], url, is_interactive=True, auth_method="BASIC_AUTH",
                              basic_auth_user=auth[0], basic_auth_pass=auth[1])
        [webhook] = [w for w in ls.api("GET", "/api/webhooks/", params={"project": project["id"]})
                     if w["url"] == url + "/webhook"]
        header = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        ls.api("PATCH", f"/api/webhooks/{webhook['id']}/", json={"headers": {"Authorization": header}})
        built = 'hybridgl_index_lookups_total{source="built"}'
        built_before = _counter(url, built, auth)
        image = _variant(ls, "groceries.jpg", 4)
        ls.import_tasks(project["id"], [{"image": ls.local_files_url(image)}])
        wait_for(lambda: _counter(url, built, auth) == built_before + 1, 180,
                 "the warm-up job (from the authenticated webhook) to build the new image's index")
    finally:
        backend.stop()
