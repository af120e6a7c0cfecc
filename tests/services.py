"""Real processes for tests and benchmarks: workers, the web backend, an image server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from worker.hybridgl.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


ARTIFACTS = REPO / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, proc: "Service | None" = None) -> None:
    """Poll a condition until it holds or the deadline passes (synchronisation on state, not sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode} before {what}:\n{proc.log_tail()}")
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.05)
    tail = proc.log_tail() if proc is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


class Service:
    """A real subprocess (worker, backend) with its log in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                        start_new_session=True)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, sig: int = 15, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class _QuietHandler(SimpleHTTPRequestHandler):
    delay = 0.0  # seconds before each answer: a distant or slow image host
    arrivals: list | None = None  # (path, time.time()) of each request, when a list is given

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.arrivals is not None:
            self.arrivals.append((self.path, time.time()))
        if self.delay:
            time.sleep(self.delay)  # the slow host itself, not a synchronisation
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


def service_env(settings: Settings, redis_url: str, **extra: str) -> dict[str, str]:
    """Environment of a worker/backend process using the test weights and Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_", "BASIC_AUTH"))}
    env.update({
        "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1",
        "HYBRIDGL_SAM_MODEL": settings.sam_model, "HYBRIDGL_SAM_CHECKPOINT": settings.sam_checkpoint,
        "HYBRIDGL_CLIP_MODEL": settings.clip_model, "HYBRIDGL_CLIP_CHECKPOINT": settings.clip_checkpoint,
        "HYBRIDGL_WEIGHTS_DIR": settings.weights_dir, "HYBRIDGL_DEVICE": "cpu",
        "HYBRIDGL_MASKING_BLOCK": str(settings.masking_block), "HYBRIDGL_GEM_BLOCKS": str(settings.gem_blocks),
        "HYBRIDGL_TORCH_THREADS": "1",
        "IMAGE_ALLOWED_HOSTS": "127.0.0.1", "IMAGE_ALLOW_PRIVATE": "true",
    })
    env.update(extra)
    return env


def start_worker(env: dict[str, str], name: str, log_dir: Path, redis_url: str) -> Service:
    service = Service(name, [sys.executable, "-m", "worker.cli", "worker", "--name", name], env, log_dir)
    conn = redis.Redis.from_url(redis_url)
    wait_for(lambda: conn.exists(f"hybridgl:worker:{name}") and _listening(conn, name), 180,
             f"worker {name} to register", service)
    return service


def _listening(conn: redis.Redis, name: str) -> bool:
    from rq import Worker

    return any(w.name == name for w in Worker.all(connection=conn))


def start_backend(env: dict[str, str], log_dir: Path) -> tuple[Service, str]:
    port = free_port()
    service = Service("backend", [sys.executable, "-m", "worker.cli", "serve", "--host", "127.0.0.1", "--port",
                                  str(port), "--log-level", "warning"], env, log_dir)
    url = f"http://127.0.0.1:{port}"
    import httpx

    wait_for(lambda: httpx.get(url + "/health", timeout=1).status_code > 0, 60, "the backend to answer", service)
    return service, url


def small_png() -> bytes:
    """A 96x64 PNG with a red square: an image for a stand-in image host."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 64), (230, 230, 220))
    ImageDraw.Draw(image).rectangle((10, 10, 50, 50), fill=(200, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def serve_directory(directory: Path, delay: float = 0.0, arrivals: list | None = None) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTP server on 127.0.0.1 serving a folder (a stand-in for any image host); it waits
    ``delay`` seconds before each answer, and records each request in ``arrivals`` when given."""
    handler = type("Handler", (_QuietHandler,), {"delay": delay, "arrivals": arrivals})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def make_tls_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (its own CA): (certificate, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class RedisServer:
    """A Redis of the test's own on a free port, keeping nothing on disk (like this machine's): it can be
    killed and started again on the same port, losing everything, as a restart without persistence does.
    With ``password`` it requires it (AUTH); with ``tls`` it speaks only TLS (a self-signed certificate
    that ``url`` tells clients to trust)."""

    def __init__(self, directory: Path, password: str | None = None, tls: bool = False):
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.tls = make_tls_certificate(directory) if tls else None
        userinfo = f":{password}@" if password else ""
        if self.tls:
            self.url = f"rediss://{userinfo}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        else:
            self.url = f"redis://{userinfo}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls[0]),
                     "--tls-key-file", str(self.tls[1]), "--tls-ca-cert-file", str(self.tls[0]),
                     "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        conn = redis.Redis.from_url(self.url)
        wait_for(lambda: conn.ping(), 20, f"redis-server on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class TcpProxy:
    """A TCP relay in front of a server (Label Studio): ``cut()`` makes the server unreachable through it
    (open connections are dropped, new ones refused), ``restore()`` reconnects it on the same port."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            for sock in [listener, *self._sockets]:
                if sock is None:
                    continue
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)
