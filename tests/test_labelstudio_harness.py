"""Smoke test of the real-Label-Studio harness (tests/labelstudio.py) against Label Studio 1.23.2.

Needs scripts/install-test-deps (Label Studio's own virtualenv). The first run on a machine also
builds the migrated template (~25 s); later runs start in ~3 s. LS_TEST_COLD=1 measures a cold
start into a throwaway template instead of the cached one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from tests import labelstudio
from tests.labelstudio import LabelStudio, start_label_studio

DATA = Path(__file__).resolve().parent / "data"
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          '<Label value="Dog"/></BrushLabels></View>')
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def ls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    with pytest.MonkeyPatch.context() as patch:
        if os.environ.get("LS_TEST_COLD") == "1":
            patch.setenv("LS_TEMPLATE", str(tmp_path_factory.mktemp("ls-template") / "template"))
        started = time.monotonic()
        cached = labelstudio._template_ok(labelstudio.ls_template_dir())
        labelstudio.ensure_template()
        TIMINGS["template"] = time.monotonic() - started
        started = time.monotonic()
        instance = start_label_studio(tmp_path_factory.mktemp("ls"))
        TIMINGS["warm_start"] = time.monotonic() - started
    print(f"\n[label studio] template {'cached' if cached else 'built (cold start)'} in "
          f"{TIMINGS['template']:.1f} s; warm start {TIMINGS['warm_start']:.1f} s; {instance}")
    yield instance
    instance.stop()


def brush_result(width: int, height: int) -> dict[str, Any]:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: height // 2, width // 3: width // 2] = 255
    return {"type": "brushlabels", "from_name": "mask", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Dog"]}}


@pytest.fixture(scope="session")
def dog_task(ls: LabelStudio) -> dict[str, Any]:
    project = ls.create_project("harness smoke", CONFIG)
    storage = ls.add_local_storage(project["id"])
    assert storage["path"] == str(ls.images_dir)
    shutil.copy(DATA / "dog.jpg", ls.images_dir / "dog.jpg")
    url = ls.local_files_url("dog.jpg")
    assert url == "/data/local-files/?d=images/dog.jpg"
    [task_id] = ls.import_tasks(project["id"], [{"image": url}])
    return {"project": project, "task_id": task_id, "url": url}


def test_image_is_served_with_the_token(ls: LabelStudio, dog_task: dict[str, Any]) -> None:
    task = ls.task(dog_task["task_id"])
    assert task["data"]["image"] == dog_task["url"]
    assert ls.download(task["data"]["image"]) == (DATA / "dog.jpg").read_bytes()
    # without the token Label Studio refuses (the backend must send it)
    anonymous = httpx.get(ls.url + dog_task["url"], follow_redirects=False)
    assert anonymous.status_code in (302, 401, 403), anonymous.status_code


def test_prediction_round_trip(ls: LabelStudio, dog_task: dict[str, Any]) -> None:
    width, height = Image.open(DATA / "dog.jpg").size
    result = brush_result(width, height)
    created = ls.create_prediction(dog_task["task_id"], [result], score=0.5, model_version="smoke-1")
    [stored] = ls.predictions(dog_task["task_id"])
    assert stored["id"] == created["id"]
    assert stored["model_version"] == "smoke-1" and stored["score"] == pytest.approx(0.5)
    [region] = stored["result"]
    assert region["value"]["brushlabels"] == ["Dog"]
    assert region["value"]["rle"] == result["value"]["rle"]
    decoded = decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3]
    assert int((decoded > 0).sum()) == (height // 2 - height // 4) * (width // 2 - width // 3)


def test_api_errors_carry_status_and_body(ls: LabelStudio) -> None:
    with pytest.raises(labelstudio.LabelStudioError, match=r"HTTP 404"):
        ls.task(987654)
    with pytest.raises(labelstudio.LabelStudioError, match=r"HTTP 400.*label_config"):
        ls.create_project("bad config", "<View><Image")  # (titles need 3+ characters)


# ---- a stand-in ML backend: the protocol's four endpoints, recording what Label Studio sends ---

class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # /health
                outer.calls.append((self.path, None))
                self._answer({"status": "UP", "model_class": "Fake"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                outer.calls.append((self.path, body))
                if self.path.startswith("/setup"):
                    self._answer({"model_version": "fake-1"})
                elif self.path.startswith("/predict"):
                    results = [{"result": [brush_result(32, 16)], "score": 0.9, "model_version": "fake-1"}
                               for _ in body["tasks"]]
                    self._answer({"results": results})
                else:
                    self._answer({})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self, prefix: str) -> list[Any]:
        return [body for path, body in self.calls if path.startswith(prefix)]


def test_ml_backend_retrieve_and_interactive(ls: LabelStudio) -> None:
    backend = FakeBackend()
    try:
        project = ls.create_project("harness ml", CONFIG)
        task_ids = ls.import_tasks(project["id"], [{"image": "/data/local-files/?d=images/a.jpg"},
                                                   {"image": "/data/local-files/?d=images/b.jpg"}])
        ml = ls.connect_ml_backend(project["id"], backend.url)
        assert ml["is_interactive"] is True and ml["project"] == project["id"]
        assert backend.paths("/setup"), backend.calls  # Label Studio validated it on creation

        answer = ls.retrieve_predictions(project["id"], task_ids)
        assert answer.get("processed_items") == 2, answer
        [batch] = backend.paths("/predict")
        assert [t["id"] for t in batch["tasks"]] == task_ids
        for task_id in task_ids:
            [prediction] = ls.predictions(task_id)
            assert prediction["model_version"] == "fake-1"
        # already predicted with the current model version: skipped, /predict not called again
        ls.retrieve_predictions(project["id"], task_ids)
        assert len(backend.paths("/predict")) == 1

        context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                               "value": {"text": ["the dog"]}}]}
        reply = ls.interactive_annotating(ml["id"], task_ids[0], context)
        assert "errors" not in reply, reply
        assert backend.paths("/predict")[-1]["params"]["context"] == context
        ls.delete_project(project["id"])
    finally:
        backend.server.shutdown()


def test_stop_ends_the_process(tmp_path_factory: pytest.TempPathFactory) -> None:
    started = time.monotonic()
    instance = start_label_studio(tmp_path_factory.mktemp("ls-stop"))
    elapsed = time.monotonic() - started
    port = int(instance.url.rsplit(":", 1)[1])
    assert instance.is_running()
    instance.stop()
    assert instance.process is not None and instance.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(instance.process.pid, 0)  # no process of its group is left
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    instance.stop()  # idempotent
    print(f"\n[label studio] second warm start {elapsed:.1f} s, stopped cleanly")


def test_label_studio_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """A SIGKILLed test process (no fixture teardown, no atexit) must not leave Label Studio up."""
    script = ("import sys; from pathlib import Path; from tests.labelstudio import start_label_studio; "
              "ls = start_label_studio(Path(sys.argv[1])); print(ls.process.pid, flush=True); "
              "sys.stdin.read()")
    repo = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=repo,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line.strip().isdigit(), f"no pid from the parent (exit {parent.poll()})"
        pid = int(line)
        os.kill(pid, 0)  # running
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state == "Z":  # dead, waiting for a reaper that may not exist in a container
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    pytest.fail(f"Label Studio (pid {pid}) outlived its killed parent")


def test_personal_access_token_goes_through_the_sdk(ls: LabelStudio, dog_task: dict[str, Any]) -> None:
    """backend.labelstudio with a real personal access token: label-studio-sdk exchanges it at
    /api/token/refresh/ and makes the API calls with the access token; the image fetch uses the
    same access token."""
    from backend.labelstudio import FetchPolicy, LabelStudioClient

    pat = ls.api("POST", "/api/token/")["token"]  # a fresh data dir: the user has none yet
    sent: list[tuple[str, str, str, str]] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append((request.method, request.url.path, request.headers.get("authorization", ""),
                         request.headers.get("user-agent", "")))
            return super().handle_request(request)

    project_id, task_id = dog_task["project"]["id"], dog_task["task_id"]
    with LabelStudioClient(ls.url, pat, FetchPolicy(timeout=60), transport=Recording()) as client:
        project = client.project(project_id)
        assert project["label_config"] == ls.project(project_id)["label_config"]
        assert isinstance(project["created_at"], str)  # Label Studio's JSON, as prelabel keys projects by it
        [task] = client.tasks(project_id)
        assert task["id"] == task_id and task["data"]["image"] == dog_task["url"]
        assert client.fetch_image(task["data"]["image"], task_id) == (DATA / "dog.jpg").read_bytes()
        width, height = Image.open(DATA / "dog.jpg").size
        client.create_prediction(task_id, [brush_result(width, height)], 0.25, "pat-1")
        assert client.has_prediction(task_id, "pat-1")
    assert [s[0] for s in sent if s[1] == "/api/token/refresh/"] == ["POST"]  # exchanged once, cached
    assert [s[2] for s in sent if s[1] == "/api/token/refresh/"] == [""]  # the PAT goes in the body
    api = [s for s in sent if s[1].startswith("/api/") and s[1] != "/api/token/refresh/"]
    assert len(api) == 4
    access = api[0][2]
    assert access.startswith("Bearer ") and pat not in access
    assert all(auth == access and agent.startswith("label_studio_sdk/") for _, _, auth, agent in api)
    [image] = [s for s in sent if s[1].startswith("/data/")]
    assert image[2] == access and image[3] == "hybridgl-labelstudio"
