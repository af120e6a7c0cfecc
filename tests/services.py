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


def serve_directory(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTP server on 127.0.0.1 serving a folder (a stand-in for any image host)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
