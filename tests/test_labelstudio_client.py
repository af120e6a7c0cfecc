"""backend.labelstudio against real HTTP servers on 127.0.0.1.

A small threaded http.server stands in for Label Studio (auth, local files, uploads, token refresh,
presign, predictions, slow/huge/failing endpoints) and a second one for an image host / presigned
storage that must never see the Label Studio token. Every client here goes through a transport that
records each request and refuses anything that is not loopback, so the "refused before connecting"
cases fail loudly if a connection would have been attempted. End-to-end tests with a real Label
Studio live elsewhere.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from backend.labelstudio import (
    AccessDenied,
    FetchPolicy,
    ImageFetchError,
    LabelStudioClient,
    LabelStudioError,
    client_from,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
LEGACY = "legacy0123456789abcdefSECRETlegacy0123456"
SIGNED = b"signed-object-bytes" * 10


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fake_jwt(payload: dict) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(payload).encode())}.{b64url(b'not-a-real-signature')}"


PAT = fake_jwt({"token_type": "refresh", "exp": int(time.time()) + 10**7, "jti": "pat-SECRET-jti", "user_id": 1})


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path?query, Authorization
        self.valid_access: set[str] = set()
        self.issued: list[str] = []
        self.refreshes = 0
        self.access_exp_offset = 3600
        self.predictions: list[dict] = []
        self.prediction_failure: int | None = None
        self.release_slow = threading.Event()
        self.other_url = ""
        self.big = 0


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the client hung up (timeout, size limit)
        pass


def serve(handler_factory, state: State):
    handler = type("Handler", (handler_factory,), {"state": state})
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class Base(BaseHTTPRequestHandler):
    state: State

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj) -> None:
        self.send(status, json.dumps(obj).encode())

    def record(self) -> None:
        with self.state.lock:
            self.state.requests.append((self.command, self.path, self.headers.get("Authorization")))


class LabelStudio(Base):
    """Label Studio's endpoints as the client uses them."""

    def authorized(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        if auth == f"Token {LEGACY}":
            return True
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in self.state.valid_access

    def do_POST(self):
        self.record()
        path = urlsplit(self.path).path
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
        if path == "/api/token/refresh/":
            if body != {"refresh": PAT}:
                return self.send_json(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})
            access = fake_jwt({"token_type": "access", "exp": int(time.time()) + self.state.access_exp_offset,
                               "jti": f"access-SECRET-{len(self.state.issued)}"})
            with self.state.lock:
                self.state.refreshes += 1
                self.state.issued.append(access)
                self.state.valid_access.add(access)
            return self.send_json(200, {"access": access})
        if not self.authorized():
            return self.send_json(401, {"detail": "Authentication credentials were not provided."})
        if path == "/api/predictions/":
            if self.state.prediction_failure:
                return self.send_json(self.state.prediction_failure, {"detail": "boom"})
            if body.get("task") != 1 and body.get("task") != 2:
                return self.send_json(400, {"task": [f'Invalid pk "{body.get("task")}" - object does not exist.']})
            with self.state.lock:
                created = dict(body, id=len(self.state.predictions) + 1)
                self.state.predictions.append(created)
            return self.send_json(201, created)
        self.send_json(404, {"detail": "Not found."})

    def do_GET(self):
        self.record()
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if not self.authorized():
            return self.send_json(401, {"detail": "Authentication credentials were not provided."})
        if path == "/data/local-files/":
            if query.get("d") == ["missing.png"]:
                return self.send_json(404, {"detail": "Not found."})
            return self.send(200, PNG, "image/png")
        if path.startswith("/data/upload/"):
            if "boom" in path:
                return self.send(500, b"Server Error (500)", "text/html")
            return self.send(200, PNG, "image/png")
        if path.startswith("/storage-data/"):
            return self.send(200, PNG, "image/png")
        if path == "/tasks/1/presign/":
            fileuri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
            if fileuri != "s3://bucket/dir/key.png":
                return self.send_json(404, {"detail": "no storage for " + fileuri})
            return self.send(302, headers={"Location": f"{self.state.other_url}/signed/key.png?X-Amz-Signature=s"})
        if path == "/api/predictions/":
            if self.state.prediction_failure:
                return self.send_json(self.state.prediction_failure, {"detail": "boom"})
            task = int(query["task"][0])
            return self.send_json(200, [p for p in self.state.predictions if p["task"] == task])
        redirects = {
            "/redirect/away": "http://evil.example.com/x.jpg",
            "/redirect/private": "http://10.0.0.1/x.jpg",
            "/redirect/metadata": "http://169.254.169.254/latest/meta-data/",
            "/redirect/file": "file:///etc/passwd",
            "/redirect/local": "/data/upload/1/img.png",
            "/redirect/traversal": "/data/local-files/?d=../../etc/passwd",
            "/redirect/loop": "/redirect/loop",
            "/redirect/login": "/user/login/?next=/data/upload/1/img.png",
            "/redirect/other": f"{self.state.other_url}/img.png",
        }
        if path in redirects:
            return self.send(302, headers={"Location": redirects[path]})
        if path == "/slow":
            self.state.release_slow.wait(20)
            return self.send(200, PNG, "image/png")
        if path == "/huge":  # no Content-Length: streamed until the connection closes (HTTP/1.0)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(self.state.big // 65536 + 1):
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if path == "/huge-declared":  # announces more than the limit
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            return self.wfile.write(b"\0" * 10)
        if path == "/forbidden":
            return self.send_json(403, {"detail": "You do not have permission to perform this action."})
        if path == "/error/503":
            return self.send(503, b"busy", "text/plain")
        if path == "/error/429":
            return self.send(429, b"slow down", "text/plain")
        if path == "/login-page":
            return self.send(200, b"<html>login</html>", "text/html; charset=utf-8")
        self.send_json(404, {"detail": "Not found."})


class ImageHost(Base):
    """An allow-listed image host or the storage a presigned URL points to."""

    def do_GET(self):
        self.record()
        path = urlsplit(self.path).path
        if path == "/img.png":
            return self.send(200, PNG, "image/png")
        if path == "/signed/key.png":
            return self.send(200, SIGNED, "application/octet-stream")
        self.send_json(404, {"detail": "Not found."})


class LoopbackOnly(httpx.BaseTransport):
    """Records every request the client makes; anything not loopback fails the test instead of
    leaving this machine."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"the client tried to connect to {request.url.host}")
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()

    @property
    def hosts(self) -> list[str]:
        return [f"{r.url.host}:{r.url.port}" for r in self.requests]


@pytest.fixture
def servers():
    ls_state, host_state = State(), State()
    ls, ls_url = serve(LabelStudio, ls_state)
    other, other_url = serve(ImageHost, host_state)
    ls_state.other_url = other_url
    yield {"ls": ls_state, "ls_url": ls_url, "host": host_state, "host_url": other_url}
    ls_state.release_slow.set()
    for server in (ls, other):
        server.shutdown()
        server.server_close()


@pytest.fixture
def secrets(servers):
    """Every token in play (the access tokens are read when the assertion runs)."""

    class Secrets:
        def all(self) -> list[str]:
            return [LEGACY, PAT, "SECRET", *servers["ls"].issued]

    return Secrets()


@pytest.fixture
def make(servers):
    made = []

    def make_client(key: str = LEGACY, url: str | None = None, **policy):
        policy.setdefault("timeout", 5.0)
        transport = LoopbackOnly()
        client = LabelStudioClient(servers["ls_url"] if url is None else url, key, FetchPolicy(**policy),
                                   transport=transport)
        made.append(client)
        return client, transport

    yield make_client
    for client in made:
        client.close()


def assert_clean(exc: BaseException, secrets) -> None:
    """No token in the exception's message, repr or chained causes."""
    texts = []
    while exc is not None:
        texts += [str(exc), repr(exc), repr(exc.args)]
        exc = exc.__cause__ or exc.__context__
    for text in texts:
        for secret in secrets.all():
            assert secret not in text, f"a token leaked into {text!r}"


def raises(cls, fn, secrets, *args, **kwargs):
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    assert_clean(info.value, secrets)
    return info.value


# ---------------------------------------------------------------------------------------------
# tokens


def test_legacy_token_header(make, servers):
    client, _ = make(LEGACY)
    assert client.auth_headers() == {"Authorization": f"Token {LEGACY}"}
    assert client.fetch_image("/data/upload/3/abc-img.png") == PNG
    assert servers["ls"].requests[-1] == ("GET", "/data/upload/3/abc-img.png", f"Token {LEGACY}")


def test_pasted_scheme_is_stripped(make, servers):
    client, _ = make(f"Token {LEGACY}\n")
    assert client.auth_headers() == {"Authorization": f"Token {LEGACY}"}


def test_personal_access_token_is_exchanged_cached_and_refreshed_on_401(make, servers):
    ls = servers["ls"]
    client, _ = make(PAT)
    assert client.fetch_image("/data/local-files/?d=images/a.png") == PNG
    assert ls.refreshes == 1
    refresh = [r for r in ls.requests if r[1] == "/api/token/refresh/"]
    assert refresh == [("POST", "/api/token/refresh/", None)]  # the PAT goes in the body, not a header
    assert ls.requests[-1][2] == f"Bearer {ls.issued[0]}"

    assert client.fetch_image("/data/upload/1/b.png") == PNG
    assert ls.refreshes == 1  # cached until shortly before exp

    ls.valid_access.clear()  # Label Studio forgets it (revoked / restarted): one 401, one refresh
    assert client.fetch_image("/data/upload/1/c.png") == PNG
    assert ls.refreshes == 2
    assert [r[2] for r in ls.requests[-3:]] == [f"Bearer {ls.issued[0]}", None, f"Bearer {ls.issued[1]}"]

    ls.valid_access.clear()  # the API calls refresh the same way
    assert client.has_prediction(1, "v1") is False
    assert ls.refreshes == 3


def test_expired_access_token_is_refreshed_before_use(make, servers):
    ls = servers["ls"]
    ls.access_exp_offset = -10  # Label Studio issues access tokens that are already past exp
    client, _ = make(PAT)
    client.fetch_image("/data/upload/1/a.png")
    client.fetch_image("/data/upload/1/a.png")
    assert ls.refreshes == 2
    assert ls.requests[-1][2] == f"Bearer {ls.issued[1]}"


def test_rejected_personal_access_token(make, servers, secrets):
    revoked = fake_jwt({"token_type": "refresh", "exp": 1, "jti": "revoked-SECRET"})
    client, _ = make(revoked)
    exc = raises(ImageFetchError, client.fetch_image, secrets, "/data/upload/1/a.png")
    assert "LABEL_STUDIO_API_KEY" in str(exc) and not exc.transient
    assert revoked not in str(exc) and revoked not in repr(exc)
    exc = raises(LabelStudioError, client.create_prediction, secrets, 1, [], None, "v1")
    assert "personal access token" in str(exc) and revoked not in str(exc)


def test_client_repr_hides_tokens(make):
    for key in (LEGACY, PAT):
        client, _ = make(key)
        text = repr(client) + repr(vars(client))
        assert key not in text
    client, _ = make(PAT)
    client.fetch_image("/data/upload/1/a.png")
    assert "SECRET" not in repr(vars(client))


# ---------------------------------------------------------------------------------------------
# which URLs carry the token


@pytest.mark.parametrize("ref", [
    "/data/upload/10/3c31a012-img3.png",
    "/data/local-files/?d=images/img0.png",
    "/data/local-files/?d=images%2Fsub%20dir%2Fimg0.png",
    "/storage-data/uploaded/?filepath=upload/1/a.png",
    "{ls}/data/upload/10/3c31a012-img3.png",
    "{ls}/data/local-files/?d=images/img0.png",
])
def test_label_studio_urls_carry_the_token(make, servers, ref):
    client, transport = make()
    assert client.fetch_image(ref.format(ls=servers["ls_url"]), task_id=26) == PNG
    assert servers["ls"].requests == [("GET", ref.format(ls=""), f"Token {LEGACY}")]


def test_label_studio_url_with_path_prefix(make, servers):
    client, _ = make(url=servers["ls_url"] + "/")
    assert client.url == servers["ls_url"]
    assert client.fetch_image("/data/upload/1/x.png") == PNG


def test_allow_listed_host_gets_no_token(make, servers):
    host = servers["host"]
    port = int(servers["host_url"].rsplit(":", 1)[1])
    # another port of Label Studio's own host is another origin: no token there either
    client, _ = make(allowed_hosts=(f"127.0.0.1:{port}", "localhost"), allow_private=True)
    assert client.fetch_image(f"{servers['host_url']}/img.png") == PNG
    assert client.fetch_image(f"http://localhost:{port}/img.png") == PNG
    assert [r[2] for r in host.requests] == [None, None]
    assert servers["ls"].requests == []


def test_redirect_from_label_studio_to_allow_listed_host_drops_token(make, servers):
    client, _ = make(allowed_hosts=("127.0.0.1",), allow_private=True)
    assert client.fetch_image("/redirect/other") == PNG
    assert servers["ls"].requests[-1][2] == f"Token {LEGACY}"
    assert servers["host"].requests == [("GET", "/img.png", None)]


def test_redirect_within_label_studio_keeps_token(make, servers):
    client, _ = make()
    assert client.fetch_image("/redirect/local") == PNG
    assert [r[1:] for r in servers["ls"].requests] == [("/redirect/local", f"Token {LEGACY}"),
                                                      ("/data/upload/1/img.png", f"Token {LEGACY}")]


def test_cloud_uri_goes_through_presign_and_storage_gets_no_token(make, servers):
    client, _ = make()  # the storage host is not allow-listed and is loopback: Label Studio chose it
    assert client.fetch_image("s3://bucket/dir/key.png", task_id=1) == SIGNED
    method, path, auth = servers["ls"].requests[-1]
    assert auth == f"Token {LEGACY}" and path.startswith("/tasks/1/presign/?fileuri=")
    fileuri = parse_qs(urlsplit(path).query)["fileuri"][0]
    assert base64.urlsafe_b64decode(fileuri).decode() == "s3://bucket/dir/key.png"
    assert servers["host"].requests == [("GET", "/signed/key.png?X-Amz-Signature=s", None)]
    # the presign URL as Label Studio may put it in task data works the same way
    assert client.fetch_image(path) == SIGNED
    assert [r[2] for r in servers["host"].requests] == [None, None]


def test_cloud_uri_needs_task_id(make, servers, secrets):
    client, transport = make()
    for uri in ("s3://bucket/a.png", "gs://bucket/a.png", "azure-blob://c/a.png", "gcs://b/a.png"):
        exc = raises(ImageFetchError, client.fetch_image, secrets, uri)
        assert "task id" in str(exc)
    assert transport.requests == []


# ---------------------------------------------------------------------------------------------
# refused before connecting


@pytest.mark.parametrize("ref, words", [
    ("http://images.example.com/x.jpg", ["images.example.com", "IMAGE_ALLOWED_HOSTS"]),
    ("https://evil.example.com/x.jpg?token=1", ["evil.example.com", "IMAGE_ALLOWED_HOSTS"]),
    ("//evil.example.com/x.jpg", ["evil.example.com", "IMAGE_ALLOWED_HOSTS"]),
    ("http://10.0.0.1/x.jpg", ["10.0.0.1", "IMAGE_ALLOWED_HOSTS"]),
    ("http://169.254.169.254/latest/meta-data/", ["169.254.169.254"]),
    ("http://localhost:1/", ["localhost", "IMAGE_ALLOWED_HOSTS"]),
    ("http://[::1]:1/", ["::1"]),
    ("http://2130706433/x.jpg", ["2130706433"]),
    ("file:///etc/passwd", ["file:"]),
    ("ftp://127.0.0.1/x.jpg", ["ftp:"]),
    ("gopher://127.0.0.1:70/_x", ["gopher:"]),
    ("data:image/png;base64,iVBORw0KGgo=", ["data:"]),
    ("javascript:alert(1)", ["javascript:"]),
    ("/data/local-files/?d=../../etc/passwd", ["..", "traversal"]),
    ("/data/local-files/?d=images/%2e%2e/%2e%2e/etc/passwd", [".."]),
    ("/data/local-files/?d=%2E%2E%2Fetc%2Fpasswd", [".."]),
    ("/data/local-files/?d=%252e%252e/etc/passwd", [".."]),
    ("/data/local-files/?d=images\\..\\..\\secret.png", [".."]),
    ("/data/upload/../../api/users/", [".."]),
    ("{ls}/data/local-files/?d=../x.png", [".."]),
])
def test_refused_before_any_connection(make, secrets, servers, ref, words):
    client, transport = make(timeout=0.5)
    started = time.monotonic()
    exc = raises(AccessDenied, client.fetch_image, secrets, ref.format(ls=servers["ls_url"]), task_id=1)
    assert time.monotonic() - started < 0.5
    assert transport.requests == [], "a request was made before the policy refused the URL"
    assert servers["ls"].requests == []
    for word in words:
        assert word in str(exc)
    assert not exc.transient


@pytest.mark.parametrize("host, why", [
    ("10.0.0.1", "private"),
    ("192.168.1.20", "private"),
    ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link-local"),
    ("localhost", "loopback"),
    ("127.0.0.1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("100.64.0.1", "routable"),
])
def test_allow_listed_host_on_internal_address_is_refused(make, secrets, host, why):
    client, transport = make(allowed_hosts=(host,), timeout=0.5)
    exc = raises(AccessDenied, client.fetch_image, secrets, f"http://{host}:1/x.jpg")
    assert why in str(exc)
    assert transport.requests == []


def test_allow_private_never_opens_metadata_service(make, secrets):
    client, transport = make(allowed_hosts=("169.254.169.254", "0.0.0.0"), allow_private=True, timeout=0.5)
    raises(AccessDenied, client.fetch_image, secrets, "http://169.254.169.254/latest/meta-data/")
    raises(AccessDenied, client.fetch_image, secrets, "http://0.0.0.0:1/x.jpg")
    assert transport.requests == []


def test_allow_listed_name_resolving_to_internal_address(make, secrets, monkeypatch):
    """DNS is faked (no lookup leaves the machine): a wildcard-allowed name pointing inside."""
    answers = {"img.example.com": "10.1.2.3", "cdn.example.com": "::ffff:127.0.0.1"}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        family = socket.AF_INET6 if ":" in answers[host] else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    client, transport = make(allowed_hosts=("*.example.com",), timeout=0.5)
    assert "10.1.2.3" in str(raises(AccessDenied, client.fetch_image, secrets, "https://img.example.com/a.jpg"))
    assert "loopback" in str(raises(AccessDenied, client.fetch_image, secrets, "https://cdn.example.com/a.jpg"))
    assert transport.requests == []


METADATA_FORMS = [
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200",
    "::ffff:169.254.169.254", "::ffff:100.100.100.200",  # IPv4-mapped
    "::a9fe:a9fe",  # IPv4-compatible
    "2002:a9fe:a9fe::", "2002:6464:64c8::1",  # 6to4
    "64:ff9b::a9fe:a9fe", "64:ff9b::6464:64c8", "64:ff9b:1::a9fe:a9fe",  # NAT64 (well-known and local prefix)
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo whose client is 169.254.169.254 (bits inverted)
]


@pytest.mark.parametrize("address", METADATA_FORMS)
def test_metadata_addresses_are_refused_in_every_form_even_with_allow_private(address):
    from backend.fetchpolicy import blocked_address
    import ipaddress

    assert blocked_address(ipaddress.ip_address(address), allow_private=True) is not None
    assert blocked_address(ipaddress.ip_address(address), allow_private=False) is not None


def test_embedded_private_addresses_are_refused_without_allow_private():
    from backend.fetchpolicy import blocked_address
    import ipaddress

    for address, why in (("2002:7f00:1::", "loopback"), ("64:ff9b::a00:1", "private"), ("::ffff:10.0.0.1", "private")):
        assert blocked_address(ipaddress.ip_address(address), allow_private=False) == why
        assert blocked_address(ipaddress.ip_address(address), allow_private=True) is None
    assert blocked_address(ipaddress.ip_address("2002:808:808::"), allow_private=False) is None  # 6to4 of 8.8.8.8


def test_the_connection_goes_to_the_address_that_was_checked(make, secrets, servers, monkeypatch):
    """DNS is faked (no lookup leaves the machine): ``rebind.example.com`` answers a public address
    first and loopback afterwards. The check sees the public one, and the connection must go there
    (it fails: nothing listens), never to the loopback image host a second lookup would give."""
    real = socket.getaddrinfo
    lookups = []

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.example.com":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) > 1 else "8.8.8.8"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = int(servers["host_url"].rsplit(":", 1)[1])
    sent = []

    class Recording(httpx.BaseTransport):
        def handle_request(self, request):
            sent.append((str(request.url), request.headers.get("host"), request.extensions.get("sni_hostname")))
            raise httpx.ConnectError("no route (test)", request=request)

    client = LabelStudioClient(servers["ls_url"], LEGACY, FetchPolicy(allowed_hosts=("rebind.example.com",),
                                                                      timeout=0.5), transport=Recording())
    with client:
        raises(ImageFetchError, client.fetch_image, secrets, f"http://rebind.example.com:{port}/img.png")
    assert lookups == ["rebind.example.com"], "the name was looked up again after the check"
    assert sent == [(f"http://8.8.8.8:{port}/img.png", f"rebind.example.com:{port}", "rebind.example.com")]
    assert servers["host"].requests == []


def test_host_allow_list_matching():
    policy = FetchPolicy(allowed_hosts=("*.example.com", "Images.Local:8082", "https://cdn.test/", "[::1]:9"))
    assert policy.allows_host("a.example.com", 443)
    assert policy.allows_host("b.a.example.com", 80)
    assert not policy.allows_host("example.com", 443)
    assert not policy.allows_host("badexample.com", 443)
    assert not policy.allows_host("example.com.evil.net", 443)
    assert policy.allows_host("images.local", 8082)
    assert policy.allows_host("images.local.", 8082)
    assert not policy.allows_host("images.local", 80)
    assert policy.allows_host("cdn.test", 443)
    assert policy.allows_host("::1", 9)
    assert FetchPolicy(allowed_hosts="a.com, b.com").allowed_hosts == ("a.com", "b.com")


@pytest.mark.parametrize("path, words", [
    ("/redirect/away", ["evil.example.com", "IMAGE_ALLOWED_HOSTS"]),
    ("/redirect/private", ["10.0.0.1"]),
    ("/redirect/metadata", ["169.254.169.254"]),
    ("/redirect/file", ["file:"]),
    ("/redirect/traversal", [".."]),
])
def test_redirect_from_label_studio_to_refused_target(make, secrets, servers, path, words):
    client, transport = make(timeout=0.5)
    exc = raises(AccessDenied, client.fetch_image, secrets, path)
    for word in words:
        assert word in str(exc)
    assert len(transport.requests) == 1 and len(servers["ls"].requests) == 1


def test_redirect_to_other_host_not_allowed_even_if_loopback(make, secrets, servers):
    client, transport = make()  # the image host is loopback but not allow-listed
    raises(AccessDenied, client.fetch_image, secrets, "/redirect/other")
    assert servers["host"].requests == []


def test_redirect_loop(make, secrets):
    client, transport = make()
    exc = raises(ImageFetchError, client.fetch_image, secrets, "/redirect/loop")
    assert "redirects" in str(exc)
    assert len(transport.requests) == 6


def test_relative_url_without_label_studio_address(secrets, servers):
    with LabelStudioClient("", "", FetchPolicy(allowed_hosts=("127.0.0.1",), allow_private=True),
                           transport=LoopbackOnly()) as client:
        exc = raises(ImageFetchError, client.fetch_image, secrets, "/data/upload/1/a.png")
        assert "LABEL_STUDIO_URL" in str(exc)
        assert client.fetch_image(f"{servers['host_url']}/img.png") == PNG
        assert servers["host"].requests[-1][2] is None


# ---------------------------------------------------------------------------------------------
# limits and failures


def test_size_limit(make, secrets, servers):
    servers["ls"].big = 1_000_000
    client, _ = make(max_bytes=100_000)
    for path in ("/huge", "/huge-declared"):
        exc = raises(ImageFetchError, client.fetch_image, secrets, path)
        assert "100,000 bytes" in str(exc) and "IMAGE_MAX_BYTES" in str(exc)
        assert not exc.transient
    assert client.fetch_image("/data/upload/1/small.png") == PNG


def test_timeout_is_transient(make, secrets, servers):
    client, _ = make(timeout=0.3)
    started = time.monotonic()
    exc = raises(ImageFetchError, client.fetch_image, secrets, "/slow")
    servers["ls"].release_slow.set()
    assert time.monotonic() - started < 5
    assert exc.transient
    assert "127.0.0.1" in str(exc) and "0.3 s" in str(exc)


def test_connection_refused_is_transient(make, secrets):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client, _ = make(url=f"http://127.0.0.1:{port}")
    exc = raises(ImageFetchError, client.fetch_image, secrets, "/data/upload/1/a.png")
    assert exc.transient and f"127.0.0.1:{port}" in str(exc) and "LABEL_STUDIO_URL" in str(exc)
    exc = raises(LabelStudioError, client.create_prediction, secrets, 1, [], 0.5, "v1")
    assert exc.transient
    client, _ = make(PAT, url=f"http://127.0.0.1:{port}")
    assert raises(ImageFetchError, client.fetch_image, secrets, "/data/upload/1/a.png").transient


def test_http_error_messages(make, secrets, servers):
    wrong, _ = make("0000000000000000000000000000000000000000")
    exc = raises(ImageFetchError, wrong.fetch_image, secrets, "/data/upload/1/a.png")
    assert exc.status == 401 and "LABEL_STUDIO_API_KEY" in str(exc) and "token" in str(exc)
    assert not exc.transient
    assert "0000000000000000000000000000000000000000" not in str(exc)

    client, _ = make()
    exc = raises(ImageFetchError, client.fetch_image, secrets, "/forbidden")
    assert exc.status == 403 and "LABEL_STUDIO_API_KEY" in str(exc)

    exc = raises(ImageFetchError, client.fetch_image, secrets, "/data/local-files/?d=missing.png")
    assert exc.status == 404 and not exc.transient
    assert "not found at Label Studio" in str(exc) and "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED" in str(exc)
    assert "missing.png" in str(exc)

    exc = raises(ImageFetchError, client.fetch_image, secrets, "/data/upload/1/boom.png")
    assert exc.status == 500 and exc.transient
    for path, status in (("/error/503", 503), ("/error/429", 429)):
        exc = raises(ImageFetchError, client.fetch_image, secrets, path)
        assert exc.status == status and exc.transient


def test_login_page_is_an_auth_error(make, secrets):
    client, _ = make()
    exc = raises(ImageFetchError, client.fetch_image, secrets, "/redirect/login")
    assert "login" in str(exc) and "LABEL_STUDIO_API_KEY" in str(exc)
    exc = raises(ImageFetchError, client.fetch_image, secrets, "/login-page")
    assert "HTML" in str(exc)


def test_no_token_in_any_error_or_log(make, secrets, servers, caplog):
    """Every failure with both kinds of token; the messages, reprs and log records stay clean."""
    caplog.set_level(logging.DEBUG)
    servers["ls"].big = 1_000_000
    failures = 0
    for key in (LEGACY, PAT):
        client, _ = make(key, timeout=0.3, max_bytes=100_000)
        for ref in ("/forbidden", "/data/local-files/?d=missing.png", "/data/upload/1/boom.png", "/huge",
                    "/redirect/away", "/redirect/login", "/redirect/loop", "/error/503",
                    "/data/local-files/?d=../x", "http://evil.example.com/a.png", "file:///etc/passwd", "s3://b/k",
                    f"/data/local-files/?d=../{key}", f"\\{key}"):
            with pytest.raises(LabelStudioError) as info:
                client.fetch_image(ref)
            assert_clean(info.value, secrets)
            failures += 1
        servers["ls"].prediction_failure = 500
        assert_clean(raises(LabelStudioError, client.create_prediction, secrets, 1, [], 0.5, "v"), secrets)
        servers["ls"].prediction_failure = None
    assert failures == 28
    assert servers["ls"].issued  # the PAT was exchanged along the way
    for record in caplog.records:
        for secret in secrets.all():
            assert secret not in record.getMessage()


# ---------------------------------------------------------------------------------------------
# predictions


def test_prediction_round_trip(make, servers):
    client, _ = make()
    result = [{"type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": 4,
               "original_height": 3, "image_rotation": 0,
               "value": {"format": "rle", "rle": [0, 1, 2], "brushlabels": ["Object"]}}]
    assert client.task_predictions(1) == []
    assert client.has_prediction(1, "hybridgl-v1") is False
    created = client.create_prediction(1, result, 0.75, "hybridgl-v1")
    assert created["id"] == 1 and created["task"] == 1
    assert servers["ls"].predictions == [{"task": 1, "result": result, "score": 0.75,
                                          "model_version": "hybridgl-v1", "id": 1}]
    assert servers["ls"].requests[-1][2] == f"Token {LEGACY}"
    assert client.has_prediction(1, "hybridgl-v1") is True
    assert client.has_prediction(1, "hybridgl-v2") is False
    assert client.has_prediction(2, "hybridgl-v1") is False
    client.create_prediction(2, [], None, "hybridgl-v1")
    assert [p["task"] for p in client.task_predictions(2)] == [2]


def test_prediction_errors(make, secrets, servers):
    client, _ = make()
    exc = raises(LabelStudioError, client.create_prediction, secrets, 999, [], 0.5, "v1")
    assert exc.status == 400 and not exc.transient and "does not exist" in str(exc) and "999" in str(exc)
    for status in (500, 502, 429):
        servers["ls"].prediction_failure = status
        exc = raises(LabelStudioError, client.create_prediction, secrets, 1, [], 0.5, "v1")
        assert exc.transient and exc.status == status
        assert raises(LabelStudioError, client.has_prediction, secrets, 1, "v1").transient
    servers["ls"].prediction_failure = None
    wrong, _ = make("bad-token")
    exc = raises(LabelStudioError, wrong.create_prediction, secrets, 1, [], 0.5, "v1")
    assert exc.status == 401 and "LABEL_STUDIO_API_KEY" in str(exc) and "bad-token" not in str(exc)
    assert servers["ls"].predictions == []


# ---------------------------------------------------------------------------------------------
# configuration


def test_client_from_precedence():
    assert client_from(None, None) is None
    assert client_from("", "", None, None) is None
    assert client_from("http://ls:8080", None) is None
    with client_from("http://env:8080", "env-key", "http://setup:8080", "setup-key") as client:
        assert client.url == "http://env:8080" and client.auth_headers() == {"Authorization": "Token env-key"}
    with client_from(None, None, "http://setup:8080/", "setup-key") as client:
        assert client.url == "http://setup:8080" and client.auth_headers() == {"Authorization": "Token setup-key"}
    # The workers' own token never goes to an address /setup named: no client at all without a setup token.
    assert client_from(None, "env-key", "http://setup:8080", None) is None
    with client_from(None, "env-key", "http://setup:8080", "setup-key") as client:
        assert client.auth_headers() == {"Authorization": "Token setup-key"}
    with client_from("http://label-studio:8080", None, "http://localhost:8080", "setup-key") as client:
        assert client.url == "http://label-studio:8080"
        assert client.auth_headers() == {"Authorization": "Token setup-key"}
    policy = FetchPolicy(allowed_hosts=("cdn.example.com",), max_bytes=10)
    with client_from("http://ls:8080", "k", policy=policy) as client:
        assert client.policy is policy


def test_bad_label_studio_url():
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_URL"):
        LabelStudioClient("ftp://ls", LEGACY)
    with pytest.raises(LabelStudioError) as info:
        LabelStudioClient("http://admin:pw@ls:8080", LEGACY)
    assert "pw" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# the API through label-studio-sdk (an in-process Label Studio: httpx.MockTransport)


class FakeApi:
    """Label Studio's JSON API under a path prefix (``http://ls.test/ls``), recording every request."""

    def __init__(self, tasks: int = 5):
        self.requests: list[httpx.Request] = []
        self.tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}, "meta": {}, "total_annotations": 0,
                       "cancelled_annotations": 0, "total_predictions": 0, "predictions_model_versions": ""}
                      for i in range(1, tasks + 1)]
        self.answers: dict[str, httpx.Response] = {}
        self.access = fake_jwt({"token_type": "access", "exp": int(time.time()) + 3600, "jti": "access-SECRET"})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path in self.answers:
            return self.answers[path]
        if path == "/ls/api/token/refresh/":
            assert json.loads(request.content) == {"refresh": PAT}
            return httpx.Response(200, json={"access": self.access})
        if request.headers.get("authorization") != f"Bearer {self.access}":
            return httpx.Response(401, json={"detail": "Authentication credentials were not provided."})
        if path == "/ls/api/projects/7/":
            return httpx.Response(200, json={"id": 7, "label_config": "<View/>", "created_at": "2024-05-06T07:08:09.123456Z"})
        if path == "/ls/api/tasks/":
            params = request.url.params
            page, size = int(params["page"]), int(params["page_size"])
            tasks = self.tasks
            if "query" in params:
                included = json.loads(params["query"])["selectedItems"]["included"]
                tasks = [t for t in tasks if t["id"] in included]
            tasks = sorted(tasks, key=lambda t: -t["id"])  # Label Studio's order is not ours
            if (page - 1) * size >= len(tasks) and page > 1:
                return httpx.Response(404, json={"detail": "Invalid page."})
            return httpx.Response(200, json={"tasks": tasks[(page - 1) * size: page * size], "total": len(tasks)})
        return httpx.Response(404, json={"detail": "Not found."})

    def api_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path != "/ls/api/token/refresh/"]


def test_api_calls_go_through_the_sdk_keeping_a_path_prefix():
    api = FakeApi()
    with LabelStudioClient("http://ls.test/ls", PAT, transport=httpx.MockTransport(api)) as client:
        project = client.project(7)
        assert project["created_at"] == "2024-05-06T07:08:09.123456Z"  # Label Studio's JSON, not the SDK's model
        assert [r.url.path for r in api.requests] == ["/ls/api/token/refresh/", "/ls/api/projects/7/"]
        assert "authorization" not in api.requests[0].headers  # the PAT goes in the body
        # the SDK made the call (its User-Agent), with the access token it cached
        assert api.requests[1].headers["user-agent"].startswith("label_studio_sdk/")
        assert client.auth_headers() == {"Authorization": f"Bearer {api.access}"}
        assert len(api.requests) == 2


def test_tasks_are_paged_lazily_in_id_order():
    api = FakeApi(tasks=5)
    with LabelStudioClient("http://ls.test/ls", PAT, transport=httpx.MockTransport(api)) as client:
        tasks = client.tasks(7, page_size=2)
        first = next(tasks)
        assert first["id"] == 4  # page 1 is tasks 5 and 4: sorted by id
        assert len(api.api_requests()) == 1  # lazily: one page so far
        rest = list(tasks)
        assert [t["id"] for t in [first, *rest]] == [4, 5, 2, 3, 1]
        assert first == dict(api.tasks[3])  # the dict Label Studio sent, every field as it was
        pages = [r.url.params for r in api.api_requests()]
        assert [p["page"] for p in pages] == ["1", "2", "3"]  # the short page ends it: no fourth request
        assert {p["fields"] for p in pages} == {"all"}
        assert pages[0]["include"] == ",".join(LabelStudioClient.TASK_FIELDS) and pages[0]["project"] == "7"
        assert all(r.headers["user-agent"].startswith("label_studio_sdk/") for r in api.api_requests())

        api.requests.clear()
        assert [t["id"] for t in client.tasks(7, task_ids=[5, 1, 3, 99], page_size=2)] == [1, 3, 5]
        queries = [json.loads(r.url.params["query"]) for r in api.api_requests()]
        assert queries == [{"selectedItems": {"all": False, "included": [1, 3]}},  # `total` reached: one page
                           {"selectedItems": {"all": False, "included": [5, 99]}}]

        api.tasks = api.tasks[:4]  # a full last page: the 404 past it ends the listing
        assert [t["id"] for t in client.tasks(7, page_size=2)] == [3, 4, 1, 2]


def test_api_answers_that_are_not_what_we_expect(secrets):
    api = FakeApi()
    with LabelStudioClient("http://ls.test/ls", PAT, transport=httpx.MockTransport(api)) as client:
        api.answers["/ls/api/projects/7/"] = httpx.Response(302, headers={"Location": "https://ls.test/ls/api/projects/7/"})
        exc = raises(LabelStudioError, client.project, secrets, 7)
        assert exc.status == 302 and "redirected" in str(exc) and "https://ls.test" in str(exc)
        assert "LABEL_STUDIO_URL" in str(exc) and not exc.transient
        api.answers["/ls/api/projects/7/"] = httpx.Response(200, text="<html>hello</html>")
        exc = raises(LabelStudioError, client.project, secrets, 7)
        assert "not JSON" in str(exc) and "LABEL_STUDIO_URL" in str(exc)
        api.answers["/ls/api/projects/7/"] = httpx.Response(200, json=[1, 2])
        assert "not a project" in str(raises(LabelStudioError, client.project, secrets, 7))
        api.answers["/ls/api/tasks/"] = httpx.Response(200, json=[{"id": 1}])
        assert "not a task list" in str(raises(LabelStudioError, lambda: list(client.tasks(7)), secrets))
        api.answers["/ls/api/tasks/"] = httpx.Response(404, json={"detail": "Not found."})
        exc = raises(LabelStudioError, lambda: list(client.tasks(7)), secrets)
        assert exc.status == 404 and "LABEL_STUDIO_URL" in str(exc)  # page 1 is not past the end
        api.answers["/ls/api/tasks/"] = httpx.Response(503, text="busy")
        exc = raises(LabelStudioError, lambda: list(client.tasks(7)), secrets)
        assert exc.status == 503 and exc.transient and exc.unreachable
        assert len([r for r in api.requests if r.url.path == "/ls/api/tasks/"]) == 3  # no retries in the SDK


@pytest.mark.parametrize("status, words", [(404, ["/api/token/refresh/", "legacy token"]),
                                           (401, ["refused the personal access token", "LABEL_STUDIO_API_KEY"]),
                                           (500, ["HTTP 500"])])
def test_token_exchange_failures(secrets, status, words):
    api = FakeApi()
    api.answers["/ls/api/token/refresh/"] = httpx.Response(status, json={"detail": "no"})
    with LabelStudioClient("http://ls.test/ls", PAT, transport=httpx.MockTransport(api)) as client:
        exc = raises(LabelStudioError, client.project, secrets, 7)
        for word in words:
            assert word in str(exc)
        assert exc.status == status and exc.transient == (status == 500)
        exc = raises(ImageFetchError, client.fetch_image, secrets, "/data/upload/1/a.png")
        assert exc.status == status
    assert [r.url.path for r in api.requests] == ["/ls/api/token/refresh/"] * 2  # the image was not asked for
    api.answers["/ls/api/token/refresh/"] = httpx.Response(200, text="not json")
    with LabelStudioClient("http://ls.test/ls", PAT, transport=httpx.MockTransport(api)) as client:
        assert "without an access token" in str(raises(LabelStudioError, client.project, secrets, 7))
