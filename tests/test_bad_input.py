"""Bad input, end to end: the real web backend and a real worker, one case per row of a matrix.

Every case is one HTTP request with the status it must get and a piece of the message that tells
the user what is wrong. Per-task errors are seen through interactive /predict (a TextArea prompt),
which answers 422 with the job's failure reason. Valid-but-odd inputs (grayscale, CMYK, 16-bit,
palette, RGBA, EXIF-rotated images; emoji-only and non-English prompts) must give a region.

The stack: one worker and one backend (Basic auth on) for the whole module. A local HTTP server
stands in for Label Studio (LABEL_STUDIO_URL) and serves generated images; 127.0.0.1 is
allow-listed with IMAGE_ALLOW_PRIVATE for the unreachable and slow hosts. Private, link-local,
metadata and other loopback addresses are not allow-listed: the policy refuses them by name or
address before connecting (nothing is ever sent to a non-loopback address; the address rules for
allow-listed hosts are checked in-process, with a transport that fails on any request).
"""

from __future__ import annotations

import base64
import io
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import httpx
import numpy as np
import pytest
import redis
from PIL import Image, ImageDraw

from backend.jobspec import batch_queue

from .services import free_port, service_env, start_backend, start_worker

AUTH = ("ann", "correct horse")
FETCH_TIMEOUT = 1.5  # IMAGE_FETCH_TIMEOUT of this stack
PROJECT = "3.1700000000"
WORKER_NAME = f"bad-input-worker-{os.getpid()}"
LS_TOKEN = "bad-input-ls-token-0123456789"

INTERACTIVE = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
</View>"""
BATCH = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/><Label value="Box"/></BrushLabels>
</View>"""
W, H = 160, 120  # the generated scene


# --- images --------------------------------------------------------------------------------------
def _scene() -> Image.Image:
    """Flat colours (exact in a palette): a red box, a blue disc and a white tile on a light ground.
    The white (255) makes the 16-bit copy decode to the grayscale one's pixels: one index for both."""
    image = Image.new("RGB", (W, H), (225, 225, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((15, 30, 70, 95), fill=(200, 30, 30))
    draw.ellipse((90, 20, 145, 75), fill=(30, 60, 200))
    draw.rectangle((0, 100, W, H), fill=(40, 140, 40))
    draw.rectangle((120, 85, 150, 98), fill=(255, 255, 255))
    return image


def _save(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _bomb() -> bytes:
    """A 300-byte PNG that declares 100000 x 100000 pixels (10 gigapixels)."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + _png_chunk(b"IEND", b""))


def make_images() -> dict[str, tuple[bytes, str]]:
    scene = _scene()
    gray = scene.convert("L")
    rgba = scene.convert("RGBA")
    alpha = Image.new("L", scene.size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, W // 4, H), fill=0)
    rgba.putalpha(alpha)
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # same pixels as `gray` once decoded
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    jpeg = _save(scene, "JPEG", quality=90)
    return {
        "scene.png": (_save(scene, "PNG"), "image/png"),
        "gray.png": (_save(gray, "PNG"), "image/png"),
        "sixteen.png": (_save(sixteen, "PNG"), "image/png"),
        "palette.png": (_save(scene.convert("P", palette=Image.ADAPTIVE, colors=8), "PNG"), "image/png"),
        "rgba.png": (_save(rgba, "PNG"), "image/png"),
        "cmyk.jpg": (_save(scene.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
        "exif6.jpg": (_save(scene, "JPEG", quality=90, exif=exif), "image/jpeg"),
        "one.png": (_save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "image/png"),
        "empty.png": (b"", "image/png"),
        "text.jpg": (b"this is a text file, not a picture\n" * 20, "image/jpeg"),
        "page.html": (b"<html><body>Sign in</body></html>", "text/html; charset=utf-8"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "image/jpeg"),
        "bomb.png": (_bomb(), "image/png"),
    }


class _ImageHost(BaseHTTPRequestHandler):
    """Stands in for Label Studio and any image host: /img/<name>, /slow, /drip, /auth/..."""

    files: dict[str, tuple[bytes, str]] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts): expected

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/img/") and path[5:] in self.files:
            body, kind = self.files[path[5:]]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/slow":  # answers nothing for longer than the fetch timeout
            time.sleep(FETCH_TIMEOUT * 4)
            self.send_error(500)
        elif path == "/drip":  # answers at once, then one byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.2)
        elif path.startswith("/auth/"):  # Label Studio refusing our token
            body = b'{"detail": "Invalid token."}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def image_host():
    handler = type("Handler", (_ImageHost,), {"files": make_images()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tiny_settings, redis_url, image_host, tmp_path_factory):
    logs = tmp_path_factory.mktemp("bad-input-logs")
    env = service_env(tiny_settings, redis_url, HYBRIDGL_TORCH_THREADS="2", LABEL_STUDIO_URL=image_host,
                      LABEL_STUDIO_API_KEY=LS_TOKEN, IMAGE_FETCH_TIMEOUT=str(FETCH_TIMEOUT),
                      HYBRIDGL_JOB_RETRIES="0", HYBRIDGL_INTERACTIVE_TIMEOUT="150", HYBRIDGL_BATCH_BUDGET="150",
                      HYBRIDGL_WARM_ON_OPEN="false", BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1])
    worker = start_worker(env, WORKER_NAME, logs, redis_url)
    backend, url = start_backend(env, logs)
    client = httpx.Client(base_url=url, timeout=200, auth=AUTH)
    yield {"url": url, "client": client, "ls": image_host, "conn": redis.Redis.from_url(redis_url),
           "closed_port": free_port(), "logs": logs}
    client.close()
    backend.stop()
    worker.stop()


# --- the matrix ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    request: Callable[[dict], tuple[str, str, dict]]  # stack -> (method, path, httpx kwargs)
    status: int
    says: str | None = None  # a piece of the error message (case-insensitive)
    job_fails: bool = False  # the task's job ran and must have ended failed (not stuck)
    region: tuple[int, int] | None = None  # 200 with a region of this (width, height)
    auth: Any = AUTH


_ids = iter(range(1000, 100_000))


def _textarea(*texts: str) -> dict:
    return {"result": [{"value": {"text": list(texts)}, "id": "p1", "from_name": "prompt", "to_name": "image",
                        "type": "textarea", "origin": "manual"}]}


def ask(image: Any = None, *texts: str, config: str = INTERACTIVE, task: dict | None = None,
        context: Any = "default") -> Callable[[dict], tuple[str, str, dict]]:
    """An interactive /predict for one task (its own id) with a TextArea prompt."""
    task_id = next(_ids)
    texts = texts or ("the red box",)

    def build(s: dict) -> tuple[str, str, dict]:
        ref = image(s) if callable(image) else image
        body_task = task if task is not None else {"id": task_id, "data": {"image": ref}}
        ctx = _textarea(*texts) if context == "default" else context
        return "POST", "/predict", {"json": {"tasks": [body_task], "project": PROJECT, "label_config": config,
                                             "params": {"context": ctx}}}
    return build


def img(name: str) -> Callable[[dict], str]:
    return lambda s: f"{s['ls']}/img/{name}"


def raw(path: str, content: bytes, content_type: str = "application/json") -> Callable:
    return lambda s: ("POST", path, {"content": content, "headers": {"content-type": content_type}})


def post(path: str, body: Any) -> Callable:
    return lambda s: ("POST", path, {"json": body})


def get(path: str) -> Callable:
    return lambda s: ("GET", path, {})


GOOD = img("scene.png")
NO_OUTPUT = '<View><Image name="image" value="$image"/><Text name="t" value="$text"/></View>'
UNKNOWN_TAGS = INTERACTIVE.replace("</View>", '<Sparkle name="x" toName="image"/><Header value="Hi"/></View>')
REFUSED = "refusing to fetch"

CASES = [
    # --- the request body
    Case("malformed-json", raw("/predict", b'{"tasks": [}'), 422, "not valid JSON"),
    Case("truncated-json", raw("/predict", b'{"tasks": [{"id": 1, "data": {"image": "'), 422, "not valid JSON"),
    Case("empty-body", raw("/predict", b""), 422, "body: Field required"),
    Case("body-is-a-list", post("/predict", [{"id": 1}]), 422, "valid dictionary"),
    Case("body-not-utf8", raw("/predict", b'{"tasks": ["\xff\xfe"]}'), 422, "UTF-8"),
    Case("body-nested-too-deep", raw("/predict", b'{"tasks": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), 422,
         "could not be parsed"),
    Case("tasks-missing", post("/predict", {"label_config": INTERACTIVE}), 422, "tasks: Field required"),
    Case("tasks-not-a-list", post("/predict", {"tasks": "nope", "label_config": INTERACTIVE}), 422, "tasks"),
    Case("tasks-empty", post("/predict", {"tasks": [], "label_config": INTERACTIVE}), 422, "tasks is empty"),
    Case("tasks-over-1000-are-served", post("/predict", {"tasks": [{"id": i} for i in range(1001)],
                                                         "label_config": INTERACTIVE}), 200),
    Case("task-not-an-object", post("/predict", {"tasks": ["x"], "label_config": INTERACTIVE}), 422, "tasks.0"),
    Case("label-config-not-a-string", post("/predict", {"tasks": [{"id": 1}], "label_config": 5}), 422,
         "label_config"),
    Case("context-not-an-object", ask(GOOD, context="the dog"), 422, "params.context"),
    Case("context-result-not-a-list", ask(GOOD, context={"result": "the dog"}), 422, "'result' must be a list"),
    Case("task-without-data", ask(task={"id": 5}), 422, "has no 'data' object"),
    Case("task-without-image-field", ask(task={"id": 6, "data": {"picture": "/img/scene.png"}}), 422,
         "no 'image' field"),
    Case("image-field-not-a-string", ask(task={"id": 7, "data": {"image": 42}}), 422, "must be an image URL"),
    Case("task-id-not-an-integer", ask(task={"id": "seven", "data": {"image": "/img/scene.png"}}), 422,
         "task id must be an integer"),
    Case("click-without-coordinates", ask(GOOD, context={"result": [{
        "type": "keypointlabels", "from_name": "click", "to_name": "image",
        "value": {"x": "left", "y": None, "keypointlabels": ["Object"]}}]}), 422, 'numeric "x" and "y"'),
    # --- the label config
    Case("config-not-xml", ask(GOOD, config="<View><Image name='image'"), 422, "not valid XML"),
    Case("config-empty", ask(GOOD, config=""), 422, "label config is empty"),
    Case("config-without-image", ask(GOOD, config='<View><Text name="t" value="$t"/></View>'), 422,
         "no <Image> tag"),
    Case("config-without-output-tag", ask(GOOD, config=NO_OUTPUT), 422, "BrushLabels, PolygonLabels or"),
    Case("config-image-value-not-a-variable", ask(GOOD, config=INTERACTIVE.replace('value="$image"', 'value="x"')),
         422, "not a task data variable"),
    Case("setup-config-without-output-tag", post("/setup", {"project": PROJECT, "schema": NO_OUTPUT}), 422,
         "BrushLabels"),
    Case("setup-unknown-tags-are-ignored", post("/setup", {"project": PROJECT, "schema": UNKNOWN_TAGS}), 200),
    Case("predict-unknown-tags-are-ignored", ask(GOOD, config=UNKNOWN_TAGS), 200, region=(W, H)),
    # --- the expression
    Case("expression-empty", ask(GOOD, ""), 422, "prompt is empty"),
    Case("expression-whitespace-only", ask(GOOD, "  \n\t "), 422, "prompt is empty"),
    Case("expression-10000-characters", ask(GOOD, "red " * 2500), 422, "more than the limit of 1000"),
    Case("expression-emoji-only", ask(GOOD, "🟥📦"), 200, region=(W, H)),
    Case("expression-russian", ask(GOOD, "красная коробка слева"), 200, region=(W, H)),
    Case("expression-chinese", ask(GOOD, "左边的红色盒子"), 200, region=(W, H)),
    Case("prompts-1000-items", ask(GOOD, *[f"thing {i}" for i in range(1000)]), 422, "more than the limit of 100"),
    # --- the image bytes
    Case("image-not-an-image", ask(img("text.jpg")), 422, "not an image this server can decode", job_fails=True),
    Case("image-html-page", ask(img("page.html")), 422, "HTML page, not an image", job_fails=True),
    Case("image-truncated-jpeg", ask(img("truncated.jpg")), 422, "damaged or truncated", job_fails=True),
    Case("image-decompression-bomb", ask(img("bomb.png")), 422, "too many pixels", job_fails=True),
    Case("image-0-bytes", ask(img("empty.png")), 422, "empty (0 bytes)", job_fails=True),
    # A 1x1 image has one region, itself: a clear (if useless) answer, no crash.
    Case("image-1x1", ask(img("one.png")), 200, region=(1, 1)),
    Case("image-grayscale", ask(img("gray.png")), 200, region=(W, H)),
    Case("image-16-bit", ask(img("sixteen.png")), 200, region=(W, H)),
    Case("image-palette", ask(img("palette.png")), 200, region=(W, H)),
    Case("image-rgba", ask(img("rgba.png")), 200, region=(W, H)),
    Case("image-cmyk", ask(img("cmyk.jpg")), 200, region=(W, H)),
    Case("image-exif-rotated", ask(img("exif6.jpg")), 200, region=(H, W)),  # displayed upright: 120 x 160
    Case("image-relative-to-label-studio", ask("/img/scene.png", "the blue disc"), 200, region=(W, H)),
    # --- where the image is
    Case("url-404", ask(img("missing.png")), 422, "answered HTTP 404", job_fails=True),
    Case("url-unreachable", ask(lambda s: f"http://127.0.0.1:{s['closed_port']}/x.png"), 422, "is unreachable",
         job_fails=True),
    Case("url-slow-to-answer", ask(lambda s: f"{s['ls']}/slow"), 422, "did not answer within 1.5 s",
         job_fails=True),
    Case("url-dripping-bytes", ask(lambda s: f"{s['ls']}/drip"), 422, "did not answer within 1.5 s",
         job_fails=True),
    Case("url-private-10", ask("http://10.1.2.3/x.jpg"), 422, "refusing to fetch from host '10.1.2.3'",
         job_fails=True),
    Case("url-private-192-168", ask("https://192.168.1.1:8443/cam.jpg"), 422, REFUSED, job_fails=True),
    Case("url-loopback-127-0-0-2", ask("http://127.0.0.2:9/x.jpg"), 422, "refusing to fetch from host '127.0.0.2'",
         job_fails=True),
    Case("url-loopback-localhost-not-label-studio", ask(lambda s: s["ls"].replace("127.0.0.1", "localhost")
                                                        + "/img/scene.png"), 422, "host 'localhost'", job_fails=True),
    Case("url-loopback-ipv6", ask("http://[::1]:9/x.jpg"), 422, REFUSED, job_fails=True),
    Case("url-link-local-metadata", ask("http://169.254.169.254/latest/meta-data/"), 422,
         "refusing to fetch from host '169.254.169.254'", job_fails=True),
    Case("url-metadata-hostname", ask("http://metadata.google.internal/computeMetadata/v1/"), 422, REFUSED,
         job_fails=True),
    Case("url-userinfo-trick", ask("http://127.0.0.1@169.254.169.254/x.jpg"), 422, REFUSED, job_fails=True),
    Case("url-file-scheme", ask("file:///etc/passwd"), 422, "refusing to fetch file: URLs", job_fails=True),
    Case("url-ftp-scheme", ask("ftp://127.0.0.1/x.jpg"), 422, "refusing to fetch ftp: URLs", job_fails=True),
    Case("url-gopher-scheme", ask("gopher://127.0.0.1:6379/_FLUSHALL"), 422, "refusing to fetch gopher:",
         job_fails=True),
    Case("url-data-uri", ask("data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()), 422,
         "refusing to fetch data:", job_fails=True),
    Case("url-local-files-traversal", ask("/data/local-files/?d=../../etc/passwd"), 422, "path traversal",
         job_fails=True),
    Case("url-local-files-encoded-traversal", ask("/data/local-files/?d=%252e%252e/%252e%252e/etc/passwd"), 422,
         "path traversal", job_fails=True),
    Case("url-upload-path-traversal", ask("/data/upload/../../../etc/passwd"), 422, "path traversal",
         job_fails=True),
    Case("label-studio-refuses-the-token", ask("/auth/scene.png"), 422, "the API token is wrong", job_fails=True),
    # --- auth and the rest of the API
    Case("auth-missing", get("/health"), 401, "authentication required", auth=None),
    Case("auth-wrong-password", ask(GOOD), 401, "authentication required", auth=(AUTH[0], "wrong")),
    Case("auth-wrong-user", get("/metrics"), 401, "BASIC_AUTH_USER", auth=("bob", AUTH[1])),
    Case("auth-garbage-header", lambda s: ("GET", "/health", {"headers": {"authorization": "Basic !!!not-base64"}}),
         401, "authentication required", auth=None),
    Case("auth-docs-need-it-too", get("/docs"), 401, "authentication required", auth=None),
    Case("auth-openapi-needs-it-too", get("/openapi.json"), 401, "authentication required", auth=None),
    Case("job-id-with-odd-characters", get("/jobs/a%20b%00c"), 404, "job ids hold only"),
    Case("job-id-unknown", get("/jobs/predict-0123"), 404, "no job predict-0123"),
    Case("unknown-path", get("/nowhere"), 404, "Not Found"),
    Case("wrong-method", get("/predict"), 405, "Method Not Allowed"),
    Case("webhook-task-data-not-an-object", post("/webhook", {
        "action": "TASKS_CREATED", "project": {"id": 3, "label_config": BATCH},
        "tasks": [{"id": 1, "data": ["not", "an", "object"]}, {"id": 2, "data": None}]}), 200),
]


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def _task_jobs(conn: redis.Redis, queue: str) -> dict[Any, list]:
    """Jobs of a queue by task id: (status, job) in every registry."""
    from rq import Queue

    from backend.queue import fetch_jobs
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    q = Queue(queue, connection=conn)
    ids = (list(q.job_ids) + StartedJobRegistry(queue=q).get_job_ids() + FinishedJobRegistry(queue=q).get_job_ids()
           + FailedJobRegistry(queue=q).get_job_ids())
    jobs: dict[Any, list] = {}
    for job in fetch_jobs(list(dict.fromkeys(ids)), conn):
        if job is not None:
            jobs.setdefault(job.args[0].get("task_id"), []).append(job)
    return jobs


def check_error_body(response: httpx.Response) -> str:
    """Every non-2xx answer is JSON {"error": "<what is wrong>"}."""
    assert response.status_code != 500, response.text
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:300]
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip(), body
    return body["error"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, stack):
    method, path, kwargs = case.request(stack)
    started = time.monotonic()
    with httpx.Client(base_url=stack["url"], timeout=200, auth=case.auth) as client:
        response = client.request(method, path, **kwargs)
    elapsed = time.monotonic() - started
    assert response.status_code == case.status, response.text[:1000]
    if response.status_code >= 400:
        message = check_error_body(response)
        assert case.says is not None and case.says.lower() in message.lower(), message
        assert LS_TOKEN not in message
        assert not re.search(r"task (\S+): task \1:", message), message  # the task named once
    elif case.region is not None:
        [prediction] = response.json()["results"]
        assert prediction["result"], prediction
        region = prediction["result"][0]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Object"]
        assert (region["original_width"], region["original_height"]) == case.region
    if case.job_fails:
        body = kwargs["json"]
        task_id = body["tasks"][0]["id"]
        jobs = _task_jobs(stack["conn"], "interactive").get(task_id, [])
        assert jobs and all(j.get_status(refresh=True) == "failed" for j in jobs), [
            (j.id, j.get_status()) for j in jobs]
    if case.id.startswith("url-slow") or case.id.startswith("url-drip"):
        assert elapsed < FETCH_TIMEOUT * 2 + 30, elapsed  # bounded by IMAGE_FETCH_TIMEOUT, not the job's time limit


def test_a_bad_task_in_a_batch_does_not_fail_the_others(stack):
    ls = stack["ls"]
    tasks = [
        {"id": 501, "data": {"image": f"{ls}/img/scene.png", "prompt": "the red box"}},  # good
        {"id": 502, "data": {"image": f"{ls}/img/text.jpg", "prompt": "the red box"}},  # not an image
        {"id": 503, "data": {"picture": f"{ls}/img/scene.png", "prompt": "x"}},  # no image field
        {"id": 504, "data": {"image": f"{ls}/img/scene.png", "prompts": [f"thing {i}" for i in range(1000)]}},
        {"id": 505, "data": {"image": "http://169.254.169.254/latest/meta-data/", "prompt": "x"}},  # refused
        {"id": 506, "data": {"image": f"{ls}/img/scene.png", "prompts": [{"text": "x", "label": "Cat"}]}},
        {"id": 507, "data": {"image": f"{ls}/img/missing.png", "prompt": "the red box"}},  # 404
        {"id": 508, "data": {"image": f"{ls}/img/gray.png", "prompts": ["the blue disc", {"text": "the box",
                                                                                      "label": "Box"}]}},  # good
    ]
    response = stack["client"].post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": BATCH})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(tasks)
    assert results[0]["result"] and results[7]["result"]
    assert len([r for r in results[7]["result"] if r["type"] == "brushlabels"]) == 2
    assert results[1:7] == [[]] * 6
    jobs = _task_jobs(stack["conn"], batch_queue(PROJECT))
    for task_id, reason in ((502, "not an image"), (505, "refusing"), (507, "404")):
        [job] = jobs[task_id]
        assert job.get_status(refresh=True) == "failed"
        status = stack["client"].get(f"/jobs/{job.id}").json()
        assert status["status"] == "failed" and reason in status["reason"], status
    assert not {503, 504, 506} & set(jobs)  # refused by the web process: never enqueued


def test_no_job_is_left_queued_or_running(stack):
    from rq import Queue
    from rq.registry import StartedJobRegistry

    conn = stack["conn"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = {n: Queue(n, connection=conn).count + StartedJobRegistry(n, connection=conn).count
                for n in ("interactive", batch_queue(PROJECT))}
        if not any(busy.values()):
            break
        time.sleep(0.2)
    assert not any(busy.values()), busy


def test_the_policy_refuses_private_addresses_before_connecting():
    """Allow-listed hosts that resolve to private, loopback or link-local addresses: refused with
    IMAGE_ALLOW_PRIVATE off; link-local (cloud metadata) even with it on. No request is ever made."""
    from backend.labelstudio import AccessDenied, FetchPolicy, LabelStudioClient

    sent: list[str] = []

    def transport(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        return httpx.Response(599)

    hosts = ("10.1.2.3", "192.168.0.10", "172.16.5.4", "127.0.0.2", "::1", "169.254.169.254", "100.64.0.1",
             "0.0.0.0", "fe80::1", "::ffff:169.254.169.254", "localhost")
    strict = FetchPolicy(allowed_hosts=hosts, allow_private=False)
    lenient = FetchPolicy(allowed_hosts=hosts, allow_private=True)
    for policy, refused in ((strict, hosts),
                            (lenient, ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "0.0.0.0"))):
        with LabelStudioClient("", "", policy, transport=httpx.MockTransport(transport)) as client:
            for host in refused:
                shown = f"[{host}]" if ":" in host else host
                with pytest.raises(AccessDenied, match="refusing to fetch from host"):
                    client.fetch_image(f"http://{shown}:9/x.jpg")
    assert sent == []
