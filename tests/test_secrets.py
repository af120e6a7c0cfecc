"""Secrets and access: Label Studio tokens never leak, and the web process needs its Basic auth.

The stack: a fake Label Studio (records the Authorization headers it gets), one worker with
LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, one backend with Basic auth and HYBRIDGL_SECRET_KEY and
no Label Studio settings (it keeps the token of an authenticated /setup for the workers, encrypted). Both
tokens are then looked for everywhere they could leak: the services' log files, every Redis value
(RQ's compressed job data included), job arguments and descriptions, and every API answer.

Where the /setup token goes: with HYBRIDGL_SECRET_KEY set (backend and workers) it is kept in
Redis Fernet-encrypted; without it, it is not kept at all (only the hostname) and /health says
that the workers have no token. /docs and /openapi.json need the Basic auth too when it is set.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis

from backend import queue as q
from backend.config import ServeSettings

from .services import small_png, service_env, start_backend, start_worker

ENV_TOKEN = "envtoken-5f0c1a9e7b3d4c2a8e6f"  # the workers' LABEL_STUDIO_API_KEY
SETUP_TOKEN = "setuptoken-9a8b7c6d5e4f3a2b1c0d"  # what Label Studio sends in /setup
SECRET_KEY = "test-secret-key-that-is-long-and-random-enough"
SIGNATURE = "sig-3e1d5c7b9a0f2e4d6c8b"  # a presigned URL's signature: task data, but a secret in logs
AUTH = ("ls", "p4ssw0rd-for-the-backend")
PROJECT = "12.1700000000"
WORKER_NAME = f"secrets-worker-{os.getpid()}"
TOKENS = (ENV_TOKEN, SETUP_TOKEN, AUTH[1])
INTERACTIVE = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
</View>"""


class _FakeLabelStudio(BaseHTTPRequestHandler):
    """/data/upload/ok.png needs `Token ENV_TOKEN`; forbidden.png always answers 401; echo.png
    answers 400 with the Authorization header it got in its body (a server quoting our token)."""

    seen: list[tuple[str, str]] = []
    image = b""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        auth = self.headers.get("Authorization", "")
        self.seen.append((self.path, auth))
        if self.path == "/data/upload/1/ok.png" and auth == f"Token {ENV_TOKEN}":
            self._send(200, self.image, "image/png")
        elif self.path == "/data/upload/1/echo.png":
            self._send(400, json.dumps({"detail": f"bad header {auth}"}).encode(), "application/json")
        else:
            self._send(401, b'{"detail": "Invalid token."}', "application/json")


@pytest.fixture(scope="module")
def fake_ls():
    """Label Studio, and on another port a storage host (allow-listed, never sent the token)."""
    handler = type("Handler", (_FakeLabelStudio,), {"seen": [], "image": small_png()})
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{servers[0].server_address[1]}", "seen": handler.seen,
           "storage": f"http://127.0.0.1:{servers[1].server_address[1]}"}
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stack(tiny_settings, redis_url, fake_ls, tmp_path_factory):
    logs = tmp_path_factory.mktemp("secrets-logs")
    common = dict(HYBRIDGL_TORCH_THREADS="2", HYBRIDGL_SECRET_KEY=SECRET_KEY, HYBRIDGL_JOB_RETRIES="0",
                  HYBRIDGL_INTERACTIVE_TIMEOUT="150", HYBRIDGL_WARM_ON_OPEN="false")
    worker = start_worker(service_env(tiny_settings, redis_url, LABEL_STUDIO_URL=fake_ls["url"],
                                      LABEL_STUDIO_API_KEY=ENV_TOKEN, **common),
                          WORKER_NAME, logs, redis_url)
    backend, url = start_backend(service_env(tiny_settings, redis_url, BASIC_AUTH_USER=AUTH[0],
                                             BASIC_AUTH_PASS=AUTH[1], **common), logs)
    client = httpx.Client(base_url=url, timeout=200, auth=AUTH)
    setup = client.post("/setup", json={"project": PROJECT, "schema": INTERACTIVE, "hostname": fake_ls["url"],
                                        "access_token": SETUP_TOKEN})
    assert setup.status_code == 200, setup.text
    yield {"url": url, "client": client, "conn": redis.Redis.from_url(redis_url), "worker": worker,
           "backend": backend, "answers": []}
    client.close()
    backend.stop()
    worker.stop()


def _predict(stack, image: str, task_id: int) -> httpx.Response:
    response = stack["client"].post("/predict", json={
        "tasks": [{"id": task_id, "data": {"image": image}}], "project": PROJECT, "label_config": INTERACTIVE,
        "params": {"context": {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                           "value": {"text": ["the red square"]}}]}}})
    stack["answers"].append(response.text)
    return response


def _assert_no_token(text: str, where: str) -> None:
    for token in TOKENS:
        assert token not in text, f"a secret appears in {where}"


def test_the_workers_token_works_and_failures_do_not_show_it(stack, fake_ls):
    ok = _predict(stack, "/data/upload/1/ok.png", 1)
    assert ok.status_code == 200 and ok.json()["results"][0]["result"], ok.text
    assert ("/data/upload/1/ok.png", f"Token {ENV_TOKEN}") in fake_ls["seen"]

    refused = _predict(stack, "/data/upload/1/forbidden.png", 2)
    assert refused.status_code == 422 and "the API token is wrong" in refused.json()["error"], refused.text
    echoed = _predict(stack, "/data/upload/1/echo.png", 3)  # Label Studio quoting our token back
    assert echoed.status_code == 422 and "HTTP 400" in echoed.json()["error"], echoed.text
    signed = _predict(stack, f"{fake_ls['storage']}/bucket/1.png?X-Amz-Signature={SIGNATURE}", 4)
    assert signed.status_code == 422 and "HTTP 401" in signed.json()["error"], signed.text
    assert (f"/bucket/1.png?X-Amz-Signature={SIGNATURE}", "") in fake_ls["seen"]  # no token to storage
    for text in stack["answers"]:
        _assert_no_token(text, "an API answer")
        assert SIGNATURE not in text


def test_job_records_and_answers_hold_no_token(stack):
    conn = stack["conn"]
    keys = [k.decode() for k in conn.scan_iter("rq:job:*") if k.count(b":") == 2]
    assert keys
    for key in keys:
        job_id = key.split(":", 2)[2]
        job = q.fetch_job(job_id, conn)
        _assert_no_token(repr((job.args, job.kwargs, job.description, job.meta)), f"job {job_id}'s arguments")
        answer = stack["client"].get(f"/jobs/{job_id}")
        assert answer.status_code == 200
        _assert_no_token(answer.text, f"GET /jobs/{job_id}")
    for path in ("/health", "/metrics"):
        _assert_no_token(stack["client"].get(path).text, path)


def _redis_blobs(conn: redis.Redis):
    """Every value in the database: strings, hash fields, list/set/zset members, stream entries."""
    for key in conn.scan_iter(count=500):
        kind = conn.type(key).decode()
        if kind == "string":
            values = [conn.get(key)]
        elif kind == "hash":
            values = [v for pair in conn.hgetall(key).items() for v in pair]
        elif kind == "list":
            values = conn.lrange(key, 0, -1)
        elif kind == "set":
            values = list(conn.smembers(key))
        elif kind == "zset":
            values = conn.zrange(key, 0, -1)
        elif kind == "stream":
            values = [v for _, fields in conn.xrange(key) for pair in fields.items() for v in pair]
        else:
            values = []
        for value in values:
            if value is None:
                continue
            yield key, value
            try:  # RQ compresses job data (pickled arguments) with zlib
                yield key, zlib.decompress(value)
            except zlib.error:
                pass


def test_redis_holds_no_token_in_clear_text(stack):
    conn = stack["conn"]
    record = json.loads(conn.get(q.setup_key(PROJECT)))
    assert set(record) == {"hostname", "token_encrypted"}  # the token is kept, encrypted
    encodings = [t.encode() for t in TOKENS] + [base64.b64encode(t.encode()) for t in TOKENS]
    count = 0
    for key, value in _redis_blobs(conn):
        count += 1
        for secret in encodings:
            assert secret not in value, f"a token in clear text in Redis key {key!r}"
    assert count > 10


def test_logs_hold_no_token(stack):
    for service in (stack["worker"], stack["backend"]):
        text = service.log_path.read_text(errors="replace")
        _assert_no_token(text, f"{service.name}'s log")
        assert SIGNATURE not in text, f"a presigned URL's signature in {service.name}'s log"
    assert "failed" in stack["worker"].log_path.read_text()  # the failures above were logged, without tokens


@pytest.mark.parametrize("method,path", [
    ("GET", "/health"), ("POST", "/setup"), ("POST", "/predict"), ("POST", "/webhook"), ("GET", "/jobs/x"),
    ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/nowhere"),
])
def test_every_endpoint_needs_the_basic_auth(stack, method, path):
    for auth in (None, (AUTH[0], "wrong"), ("", ""), ("someone", AUTH[1])):
        response = httpx.request(method, stack["url"] + path, auth=auth, json={}, timeout=30)
        assert response.status_code == 401, (auth, response.text)
        assert "authentication required" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Basic")
        _assert_no_token(response.text, "a 401 answer")
    assert stack["client"].get("/health").status_code == 200


# --- in-process: keeping, not keeping, and reading back /setup's token ------------------------------
def _runtime(conn, **settings):
    from worker.jobs import Runtime

    return Runtime(ServeSettings(**settings), conn, None, None)


def test_the_worker_reads_the_encrypted_setup_token(stack, fake_ls):
    conn = stack["conn"]
    payload = {"project": PROJECT, "image": "/data/upload/1/ok.png", "task_id": 1}
    client, missing = _runtime(conn, secret_key=SECRET_KEY).labelstudio_access(payload)
    assert missing is None and client.url == fake_ls["url"]
    assert client.auth_headers() == {"Authorization": f"Token {SETUP_TOKEN}"}
    assert SETUP_TOKEN not in repr(client)
    client, missing = _runtime(conn, secret_key="another key").labelstudio_access(payload)
    assert client is None and "HYBRIDGL_SECRET_KEY differs" in missing
    client, missing = _runtime(conn).labelstudio_access(payload)
    assert client is None and "no HYBRIDGL_SECRET_KEY" in missing


def test_without_a_secret_key_the_setup_token_is_not_kept(redis_url, caplog):
    from fastapi.testclient import TestClient

    from backend.app import create_app
    from worker.jobs import JobFailed, _load_task_image

    conn = redis.Redis.from_url(redis_url)
    project = "99.1700000000"
    app = create_app(ServeSettings(redis_url=redis_url, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1]))
    try:
        with TestClient(app) as web:
            web.auth = AUTH
            answer = web.post("/setup", json={"project": project, "schema": INTERACTIVE,
                                              "hostname": "http://127.0.0.1:9", "access_token": SETUP_TOKEN})
            assert answer.status_code == 200
            record = json.loads(conn.get(q.setup_key(project)))
            assert record == {"hostname": "http://127.0.0.1:9", "token_withheld": True}
            health = web.get("/health").json()
            assert health["status"] == "DEGRADED"
            assert any("workers have no Label Studio token" in p and "HYBRIDGL_SECRET_KEY" in p
                       for p in health["problems"]), health
        with caplog.at_level(logging.DEBUG), pytest.raises(JobFailed) as failure:
            _load_task_image(_runtime(conn), {"project": project, "image": "/data/upload/1/ok.png", "task_id": 4})
        assert "workers have no Label Studio token" in str(failure.value)
        assert SETUP_TOKEN not in caplog.text
    finally:
        conn.delete(q.setup_key(project))


def test_an_error_message_never_quotes_the_env_token(fake_ls, redis_url, caplog):
    from worker.jobs import JobFailed, _load_task_image

    rt = _runtime(redis.Redis.from_url(redis_url), label_studio_url=fake_ls["url"], label_studio_api_key=ENV_TOKEN)
    for image in ("/data/upload/1/echo.png", "/data/upload/1/forbidden.png", f"/data/upload/1/{ENV_TOKEN}.png"):
        with caplog.at_level(logging.DEBUG), pytest.raises(JobFailed) as failure:
            _load_task_image(rt, {"project": None, "image": image, "task_id": 5})
        _assert_no_token(str(failure.value), "a job's failure reason")
        assert ENV_TOKEN not in image or "<redacted>" in str(failure.value)
    _assert_no_token(caplog.text, "the worker's log records")


# --- the web process's own guard ------------------------------------------------------------------
def test_basic_auth_compares_both_fields_every_time(monkeypatch):
    """Both fields are compared (in constant time, on digests) whether or not the first matches, so
    the answer's timing does not tell a right user name from a wrong one."""
    from backend import access

    calls = []
    real = access.hmac.compare_digest
    monkeypatch.setattr(access.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))

    def header(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    expected = AUTH
    cases = {header(*AUTH): True, header(AUTH[0], "wrong"): False, header("someone", AUTH[1]): False,
             header("", ""): False, "Basic !!!": False, "Bearer x": False, "": False,
             header(AUTH[0], AUTH[1] + "x"): False, "basic " + header(*AUTH)[6:]: True}
    for value, ok in cases.items():
        calls.clear()
        assert access.basic_auth_matches(value, expected) is ok, value
        assert calls == [(32, 32), (32, 32)], value  # two digests, whatever the input


def test_startup_warnings_and_the_example_password():
    from backend.access import refuse_example_password, startup_warnings
    from backend.errors import ConfigError

    open_everywhere = ServeSettings(host="0.0.0.0")
    assert any("without authentication" in w for w in startup_warnings(open_everywhere))
    assert any("LABEL_STUDIO_URL is unset" in w for w in startup_warnings(open_everywhere))
    assert not any("without authentication" in w for w in startup_warnings(ServeSettings(host="127.0.0.1")))
    assert not any("without authentication" in w for w in startup_warnings(ServeSettings(host="::1")))
    closed = ServeSettings(host="0.0.0.0", basic_auth_user="u", basic_auth_pass="long-password",
                           label_studio_url="http://ls:8080", label_studio_api_key="k")
    assert startup_warnings(closed) == []
    key_without_url = ServeSettings(basic_auth_user="u", basic_auth_pass="p", label_studio_api_key="k")
    assert any("only ever sent to LABEL_STUDIO_URL" in w for w in startup_warnings(key_without_url))
    for password in ("", "change-me"):
        with pytest.raises(ConfigError, match="BASIC_AUTH_PASS"):
            refuse_example_password(ServeSettings(basic_auth_user="u", basic_auth_pass=password))
    refuse_example_password(closed)


def test_serve_warns_when_it_listens_beyond_loopback_without_auth(tiny_settings, redis_url, tmp_path):
    """The real `hybridgl serve` on every interface without Basic auth says so in its log."""
    from .services import Service, free_port, wait_for

    port = free_port()
    service = Service("open-backend", [sys.executable, "-m", "worker.cli", "serve", "--host", "0.0.0.0",
                                       "--port", str(port)], service_env(tiny_settings, redis_url), tmp_path)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code > 0, 60,
                 "the backend to answer", service)
        log = service.log_path.read_text()
        assert f"listening on 0.0.0.0:{port} without authentication" in log, log[-2000:]
    finally:
        service.stop()
