"""Attack matrix: what someone who reaches the backend's port (or Redis) can make it do, all on loopback.

The stack, all real processes: a Redis that requires a password and speaks only TLS (the REDIS_URL
every process uses is ``rediss://:<password>@...?ssl_ca_certs=...``); one worker with
LABEL_STUDIO_API_KEY and no LABEL_STUDIO_URL (the setup the issue measured), IMAGE_ALLOW_PRIVATE=true
and a few allow-listed test names; two backends on that Redis, one without auth and one with Basic
auth, both with a small HYBRIDGL_MAX_BODY_BYTES. Around them: a Label Studio stand-in that serves
an image to the token /setup brought, an "evil" host and an "internal" host that record every
request they get.

DNS is faked inside the worker process only (no real part can play a rebinding name here): a
``sitecustomize`` module on the worker's PYTHONPATH (tests/attack_dns/) answers names under
``.attack.test`` from ATTACK_DNS, one answer per lookup, and refuses (and records) connections to
the one "public" address it hands out, so that nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis

from backend import queue as q

from .services import small_png, RedisServer, service_env, start_backend, start_worker, wait_for

ENV_TOKEN = "workers-env-token-71c3e0a5d2b4"  # the workers' LABEL_STUDIO_API_KEY
SETUP_TOKEN = "setup-token-4b9d2e7f1a6c"  # what the real Label Studio sends in /setup
ATTACKER_TOKEN = "attacker-token-0000"
REDIS_PASSWORD = "redis-password-8e2f6a1c9b3d"
AUTH = ("labelstudio", "backend-password-5d1e9c7a")
MAX_BODY = 100_000
PUBLIC = "8.8.8.8"  # what the rebinding name answers first: a global address, never really connected
WORKER_NAME = f"attacks-worker-{os.getpid()}"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
</View>"""
# Cloud metadata services in the spellings an image URL can reach them by.
METADATA_FORMS = {
    "aws": "169.254.169.254", "aws-v6": "fd00:ec2::254", "alibaba": "100.100.100.200",
    "mapped": "::ffff:169.254.169.254", "mapped-alibaba": "::ffff:100.100.100.200",
    "6to4": "2002:a9fe:a9fe::", "nat64": "64:ff9b::a9fe:a9fe", "nat64-alibaba": "64:ff9b::6464:64c8",
}
LITERALS = ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:169.254.169.254")


class _Recorder(BaseHTTPRequestHandler):
    """Records (path, Authorization) of every request; answers the image to ``token`` (any caller
    when ``token`` is None), 401 otherwise."""

    seen: list
    image: bytes
    token: str | None

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        auth = self.headers.get("Authorization", "")
        self.seen.append((self.path, auth))
        ok = self.token is None or auth == f"Token {self.token}"
        body = self.image if ok else b'{"detail": "Invalid token."}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "image/png" if ok else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _server(token: str | None):
    handler = type("Handler", (_Recorder,), {"seen": [], "image": small_png(), "token": token})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", handler.seen


@pytest.fixture(scope="module")
def hosts():
    made = {"labelstudio": _server(SETUP_TOKEN), "evil": _server(None), "internal": _server(None)}
    yield {name: {"url": url, "seen": seen, "port": server.server_address[1]}
           for name, (server, url, seen) in made.items()}
    for server, _, _ in made.values():
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stack(tiny_settings, hosts, tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    redis_server = RedisServer(root, password=REDIS_PASSWORD, tls=True)
    dns = {f"{name}.attack.test": [address] for name, address in METADATA_FORMS.items()}
    dns["rebind.attack.test"] = [PUBLIC, "127.0.0.1"]
    connect_log = root / "connects.log"
    common = dict(LABEL_STUDIO_API_KEY=ENV_TOKEN, HYBRIDGL_SECRET_KEY="attack-matrix-secret-key",
                  HYBRIDGL_JOB_RETRIES="0", HYBRIDGL_INTERACTIVE_TIMEOUT="150", HYBRIDGL_WARM_ON_OPEN="false",
                  HYBRIDGL_MAX_BODY_BYTES=str(MAX_BODY))
    worker = start_worker(service_env(
        tiny_settings, redis_server.url, HYBRIDGL_TORCH_THREADS="2", IMAGE_ALLOW_PRIVATE="true",
        IMAGE_ALLOWED_HOSTS=",".join(["*.attack.test", *LITERALS]), IMAGE_FETCH_TIMEOUT="5",
        PYTHONPATH=str(Path(__file__).parent / "attack_dns"), ATTACK_DNS=json.dumps(dns), ATTACK_UNREACHABLE=PUBLIC,
        ATTACK_CONNECT_LOG=str(connect_log), **common), WORKER_NAME, root, redis_server.url)
    (root / "open").mkdir()
    (root / "auth").mkdir()
    open_backend, open_url = start_backend(service_env(tiny_settings, redis_server.url, **common), root / "open")
    auth_backend, auth_url = start_backend(service_env(tiny_settings, redis_server.url, BASIC_AUTH_USER=AUTH[0],
                                                       BASIC_AUTH_PASS=AUTH[1], **common), root / "auth")
    conn = redis.Redis.from_url(redis_server.url)
    clients = {"open": httpx.Client(base_url=open_url, timeout=200),
               "auth": httpx.Client(base_url=auth_url, timeout=200, auth=AUTH)}
    yield {**clients, "url": auth_url, "conn": conn, "redis": redis_server, "connect_log": connect_log,
           "services": (worker, open_backend, auth_backend)}
    for client in clients.values():
        client.close()
    conn.close()
    for service in (auth_backend, open_backend, worker):
        service.stop()
    redis_server.kill()


def _context(text: str = "the red square") -> dict:
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}}]}


def _predict(client: httpx.Client, project: str, image: str, task_id: int, **kwargs) -> httpx.Response:
    return client.post("/predict", json={"tasks": [{"id": task_id, "data": {"image": image}}], "project": project,
                                         "label_config": CONFIG, "params": {"context": _context()}}, **kwargs)


def _job_keys(conn: redis.Redis) -> set[bytes]:
    return {k for k in conn.scan_iter("rq:job:*") if k.count(b":") == 2}


def _nothing_enqueued(conn: redis.Redis, jobs_before: set[bytes]) -> None:
    assert _job_keys(conn) == jobs_before, "a job was created"
    assert all(conn.llen(f"rq:queue:{name}") == 0 for name in (*q.QUEUES, *q.batch_queue_names(conn)))


# --- /setup cannot redirect tokens --------------------------------------------------------------------
def test_open_setup_naming_another_host_sends_it_nothing(stack, hosts):
    """The measured attack: an unauthenticated /setup names the attacker's host for a project, then
    one /predict. The attacker's host gets no token, and no request at all."""
    project = "31.1700000000"
    setup = stack["open"].post("/setup", json={"project": project, "schema": CONFIG, "hostname": hosts["evil"]["url"],
                                               "access_token": ATTACKER_TOKEN})
    assert setup.status_code == 200, setup.text
    assert stack["conn"].get(q.setup_key(project)) is None, "an unauthenticated /setup was kept"
    answer = _predict(stack["open"], project, "/data/upload/1/ok.png", 1)
    assert answer.status_code == 422, answer.text
    assert "LABEL_STUDIO_URL" in answer.json()["error"]
    assert hosts["evil"]["seen"] == []


def test_authenticated_setup_pins_the_label_studio_it_named(stack, hosts):
    project = "32.1700000000"
    first = stack["auth"].post("/setup", json={"project": project, "schema": CONFIG,
                                               "hostname": hosts["labelstudio"]["url"], "access_token": SETUP_TOKEN})
    assert first.status_code == 200, first.text
    answer = _predict(stack["auth"], project, "/data/upload/1/ok.png", 1)
    assert answer.status_code == 200 and answer.json()["results"][0]["result"], answer.text
    assert ("/data/upload/1/ok.png", f"Token {SETUP_TOKEN}") in hosts["labelstudio"]["seen"]

    moved = stack["auth"].post("/setup", json={"project": project, "schema": CONFIG, "hostname": hosts["evil"]["url"],
                                               "access_token": ATTACKER_TOKEN})
    assert moved.status_code == 409 and "pinned" in moved.json()["error"], moved.text
    again = _predict(stack["auth"], project, "/data/upload/1/ok.png", 2)
    assert again.status_code == 200 and again.json()["results"][0]["result"], again.text
    assert hosts["evil"]["seen"] == []
    assert all(auth in ("", f"Token {SETUP_TOKEN}") for _, auth in hosts["labelstudio"]["seen"]), \
        "the workers' own token went to an address /setup named"


def test_concurrent_setups_pin_exactly_one_origin(stack):
    project = "33.1700000000"
    hostnames = [f"http://10.0.0.{i}:8080" for i in range(1, 9)]

    def setup(hostname: str) -> int:
        return stack["auth"].post("/setup", json={"project": project, "hostname": hostname,
                                                  "access_token": SETUP_TOKEN}).status_code

    with ThreadPoolExecutor(len(hostnames)) as pool:
        statuses = dict(zip(hostnames, pool.map(setup, hostnames)))
    winners = [h for h, status in statuses.items() if status == 200]
    assert len(winners) == 1 and sorted(statuses.values()) == [200] + [409] * (len(hostnames) - 1), statuses
    assert json.loads(stack["conn"].get(q.setup_key(project)))["hostname"] == winners[0]


# --- no credentials, no work ---------------------------------------------------------------------------
@pytest.mark.parametrize("auth", [None, (AUTH[0], "wrong"), ("someone", AUTH[1]), ("", "")],
                         ids=["none", "wrong-password", "wrong-user", "empty"])
def test_without_credentials_nothing_is_enqueued_or_kept(stack, hosts, auth):
    conn, project = stack["conn"], "34.1700000000"
    before = _job_keys(conn)
    task = {"id": 7, "data": {"image": "/data/upload/1/ok.png"}}
    requests = [
        ("/setup", {"project": project, "hostname": hosts["evil"]["url"], "access_token": ATTACKER_TOKEN}),
        ("/predict", {"tasks": [task], "project": project, "label_config": CONFIG, "params": {"context": _context()}}),
        ("/predict", {"tasks": [task], "project": project, "label_config": CONFIG}),  # a task opened: warm-up
        ("/webhook", {"action": "TASKS_CREATED", "project": {"id": 34, "label_config": CONFIG},
                      "tasks": [{"id": 9, "data": {"image": "/data/upload/1/ok.png"}}]}),
    ]
    for path, body in requests:
        answer = httpx.post(stack["url"] + path, json=body, auth=auth, timeout=30)
        assert answer.status_code == 401, (path, answer.text)
        assert "authentication required" in answer.json()["error"]
    _nothing_enqueued(conn, before)
    assert conn.get(q.setup_key(project)) is None
    assert hosts["evil"]["seen"] == []


# --- what one request may cost -------------------------------------------------------------------------
def _big_body() -> bytes:
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png", "prompt": "x" * 1000}} for i in range(120)]
    return json.dumps({"tasks": tasks, "label_config": CONFIG}).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
@pytest.mark.parametrize("backend", ["open", "auth"])
def test_oversized_bodies_are_refused(stack, backend, chunked):
    conn, body = stack["conn"], _big_body()
    assert len(body) > MAX_BODY
    before = _job_keys(conn)
    content = iter([body[i:i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
    answer = stack[backend].post("/predict", content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert "HYBRIDGL_MAX_BODY_BYTES" in answer.json()["error"]
    _nothing_enqueued(conn, before)
    if backend == "auth":  # credentials are checked first: a stranger's big body is never read
        stranger = httpx.post(stack["url"] + "/predict", content=body, headers={"Content-Type": "application/json"})
        assert stranger.status_code == 401


# --- the SSRF guard ------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", [f"http://{name}.attack.test/latest/meta-data/" for name in METADATA_FORMS]
                         + [f"http://[{a}]/latest/meta-data/" if ":" in a else f"http://{a}/latest/meta-data/"
                            for a in LITERALS])
def test_metadata_addresses_are_refused_in_every_form(stack, image):
    """Allow-listed names (and literals) of metadata services, with IMAGE_ALLOW_PRIVATE=true."""
    answer = _predict(stack["auth"], "35.1700000000", image, 1)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert "refusing to fetch" in error and ("metadata" in error or "link-local" in error), error


def test_a_rebinding_name_is_connected_only_at_the_checked_address(stack, hosts):
    """rebind.attack.test answers a public address to the first lookup and loopback to any later
    one: the worker connects to the public one it checked (refused here) and never to the internal
    host a second lookup would give."""
    image = f"http://rebind.attack.test:{hosts['internal']['port']}/img.png"
    answer = _predict(stack["auth"], "36.1700000000", image, 1)
    assert answer.status_code == 422, answer.text
    assert "unreachable" in answer.json()["error"], answer.text
    assert hosts["internal"]["seen"] == []
    assert stack["connect_log"].read_text().split() == [PUBLIC, str(hosts["internal"]["port"])]


# --- anyone with Redis access ---------------------------------------------------------------------------
def test_redis_needs_the_password_and_tls(stack):
    server = stack["redis"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(server.url.replace(REDIS_PASSWORD, "guess")).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=server.port, password=REDIS_PASSWORD, socket_timeout=5).ping()
    for service in stack["services"]:
        assert REDIS_PASSWORD not in service.log_path.read_text(errors="replace"), f"{service.name}'s log"


def test_job_payloads_are_json(stack):
    conn = stack["conn"]
    assert _predict(stack["auth"], "38.1700000000", "http://aws.attack.test/x.png", 1).status_code == 422
    keys = _job_keys(conn)
    assert keys
    for key in keys:
        data = conn.hget(key, "data")
        if data is not None:
            func_name, instance, args, kwargs = json.loads(zlib.decompress(data))
            assert func_name in q.JOB_FUNCTIONS and instance is None


class _Pwn:
    """Unpickling this runs code: what a pickled job payload written to Redis could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_job_written_to_redis_runs_no_code(stack, tmp_path):
    """Someone with Redis access writes jobs: a pickled payload, and JSON ones naming a function
    that is no hybridgl job. Workers run none of them (each fails with its reason), and go on."""
    from rq import Callback, Queue
    from rq.serializers import JSONSerializer

    conn = stack["conn"]
    markers = [tmp_path / f"pwned-{i}" for i in range(2)]
    pickled = Queue(q.WARMUP, connection=conn).enqueue("worker.jobs.warm", _Pwn(markers[0]))
    as_json = Queue(q.WARMUP, connection=conn, serializer=JSONSerializer)
    named = as_json.enqueue("builtins.exec", f"open({str(markers[1])!r}, 'w').write('pwned')")
    callback = as_json.enqueue("worker.jobs.warm", {"image": "http://aws.attack.test/x.png"},
                               on_failure=Callback("builtins.exec"))
    for job in (pickled, named, callback):
        wait_for(lambda: q.fetch_job(job.id, conn).get_status(refresh=True) in ("failed", "finished"), 60,
                 f"job {job.id} to end")
        assert q.fetch_job(job.id, conn).get_status(refresh=True) == "failed"
    assert not any(m.exists() for m in markers), "a job written to Redis ran code on the worker"

    def reason(job) -> str:
        job = q.fetch_job(job.id, conn)
        return q.job_error(job, job.latest_result())

    assert "refusing to run 'builtins.exec'" in reason(named)
    assert "callbacks" in reason(callback)  # refused before running: no callback name is ever imported
    assert stack["services"][0].process.poll() is None, "the worker died"
    answer = _predict(stack["auth"], "37.1700000000", "http://aws.attack.test/x.png", 1)
    assert answer.status_code == 422 and "metadata" in answer.json()["error"]  # the worker still runs jobs
