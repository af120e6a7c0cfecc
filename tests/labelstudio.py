"""A real Label Studio (1.23.2) for end-to-end tests: start, talk to it, stop.

Not a test module: helpers only (fixtures belong in conftest). Label Studio runs from its own
virtualenv, made by ``scripts/install-test-deps`` (``.cache/ls-venv``, override with ``LS_VENV``).

    from tests.labelstudio import start_label_studio

    ls = start_label_studio(tmp_path)                 # free port, fresh data dir, ~3-5 s warm
    try:
        project = ls.create_project("t", LABEL_CONFIG)
        ls.add_local_storage(project["id"])           # serves ls.images_dir
        shutil.copy(image, ls.images_dir / "dog.jpg")
        [task_id] = ls.import_tasks(project["id"], [{"image": ls.local_files_url("dog.jpg")}])
        ml = ls.connect_ml_backend(project["id"], "http://127.0.0.1:9090")
        ls.retrieve_predictions(project["id"], [task_id])
        print(ls.predictions(task_id))
    finally:
        ls.stop()

Speed: a cold start spends ~20 s in database migrations. The first start on a machine makes a
migrated template of the data dir (``.cache/ls-template``, override with ``LS_TEMPLATE``; made
under a file lock, so parallel test processes are safe) and every start copies it into its own
``base_dir``. Label Studio creates the user from LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN only
when the user does not exist yet; for an existing user (the copied template) it prints "already
exists" and changes neither password nor token. The template is therefore made with the same fixed
credentials (``USERNAME``, ``PASSWORD``, ``TOKEN`` below) and stamped with them; a template made
with other credentials or another Label Studio version is rebuilt.

Label Studio facts this relies on (1.23.2):
  * A local-files storage must be a strict subfolder of LOCAL_FILES_DOCUMENT_ROOT (the root
    itself is refused), and ``?d=`` is relative to the root: files go in ``images_dir`` and their
    URL is ``/data/local-files/?d=images/<name>`` (``local_files_url``).
  * Connecting an ML backend also creates a webhook to ``<url>/webhook``; its URL check (SSRF
    protection, also applied to every delivery) refuses 127.0.0.1 and private networks with HTTP
    403, whatever ML_BLOCK_LOCAL_IP says. The harness keeps the protection on and lifts only
    loopback from its banned subnets (USE_DEFAULT_BANNED_SUBNETS=false with the default list minus
    127.0.0.0/8 as USER_ADDITIONAL_BANNED_SUBNETS), as docker-compose.yml does for its network.
  * LABEL_STUDIO_HOST is not set (as in a default install): ``/setup``'s ``hostname`` is
    ``http://localhost:<port>`` and task URLs stay relative. Pass
    ``extra_env={"LABEL_STUDIO_HOST": ...}`` to change that (storage-synced tasks then carry
    absolute URLs).
  * Project titles need at least 3 characters.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

REPO = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"

USERNAME = "tests@example.com"
PASSWORD = "tests-password-1234"
TOKEN = "e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0e2e0"  # legacy token: at most 40 characters

DEFAULT_STARTUP_TIMEOUT = 180.0  # seconds; a cold start (migrations) on 2 slow cores takes ~30 s

# Variables that would redirect the Label Studio child to another database, settings module or
# Python; the test process may carry them for its own reasons.
_SCRUB_PREFIXES = ("LABEL_STUDIO_", "DJANGO_", "POSTGRE_", "MYSQL_", "REDIS_", "SENTRY_")
_SCRUB_NAMES = {"DATABASE_NAME", "DJANGO_DB", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HOST",
                "PORT", "LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_SERVING_ENABLED"}

_SERVER_LINE = re.compile(r"Starting development server at https?://[^:/\s]+:(\d+)/")


class LabelStudioError(RuntimeError):
    """Label Studio failed to start, or answered an API call with an error."""


# Label Studio 1.23.2's default banned subnets (label_studio/core/utils/io.py, validate_ip).
LABEL_STUDIO_DEFAULT_BANNED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4", "255.255.255.255/32", "::/128", "::1/128", "::ffff:0:0/96",
    "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001:0000::/32", "2001:20::/28",
    "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
)


def ls_venv() -> Path:
    value = os.environ.get("LS_VENV")
    path = Path(value) if value else REPO / ".cache" / "ls-venv"
    return path if path.is_absolute() else REPO / path


def ls_template_dir() -> Path:
    value = os.environ.get("LS_TEMPLATE")
    path = Path(value) if value else REPO / ".cache" / "ls-template"
    return path if path.is_absolute() else REPO / path


def label_studio_executable() -> Path:
    """The ``label-studio`` command of the LS virtualenv; a clear error when it is not installed."""
    exe = ls_venv() / "bin" / "label-studio"
    if not exe.exists():
        raise LabelStudioError(
            f"Label Studio is not installed at {exe.parent.parent}: run scripts/install-test-deps")
    return exe


def label_studio_installed() -> bool:
    return (ls_venv() / "bin" / "label-studio").exists()


# --------------------------------------------------------------------------------------------
# The API client


class LabelStudio:
    """One running Label Studio and a small JSON client for its API (legacy-token auth)."""

    def __init__(self, *, url: str, token: str, base_dir: Path, data_dir: Path,
                 documents_root: Path, log_path: Path,
                 process: subprocess.Popen[bytes] | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.base_dir = base_dir
        self.data_dir = data_dir  # LABEL_STUDIO_BASE_DATA_DIR
        # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT. Label Studio refuses a local storage whose path
        # *is* the document root; storages must be subfolders, so images go in images_dir.
        self.documents_root = documents_root
        self.images_dir = documents_root / "images"
        self.log_path = log_path
        self.process = process
        self.client = httpx.Client(base_url=self.url, timeout=60.0,
                                   headers={"Authorization": f"Token {token}"})

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"<LabelStudio {self.url} pid={pid} base_dir={self.base_dir}>"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    # --- raw calls ------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """An authenticated request (path relative to ``url``, or a full URL); no status check."""
        try:
            return self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"{method} {path}: {type(exc).__name__}: {exc}"
                                   f"{self._log_hint()}") from exc

    def api(self, method: str, path: str, **kw: Any) -> Any:
        """Call the API; return the parsed JSON (None for an empty body). Raises LabelStudioError
        with the status and the body on any status >= 400."""
        response = self.request(method, path, **kw)
        if response.status_code >= 400:
            body = response.text
            if len(body) > 4000:
                body = body[:4000] + f"... [{len(response.text)} chars]"
            raise LabelStudioError(f"{method} {path} -> HTTP {response.status_code}: {body}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise LabelStudioError(f"{method} {path} -> HTTP {response.status_code}, not JSON: "
                                   f"{response.text[:1000]}") from exc

    def download(self, url_or_path: str) -> bytes:
        """Bytes of a task image URL (``/data/local-files/?d=...``, ``/data/upload/...``)."""
        response = self.request("GET", url_or_path)
        if response.status_code != 200:
            raise LabelStudioError(f"GET {url_or_path} -> HTTP {response.status_code}: "
                                   f"{response.text[:1000]}")
        return response.content

    # --- projects, storage, tasks ---------------------------------------------------------

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict[str, Any]:
        return self.api("POST", "/api/projects/",
                        json={"title": title, "label_config": label_config, **fields})

    def project(self, project_id: int) -> dict[str, Any]:
        return self.api("GET", f"/api/projects/{project_id}/")

    def delete_project(self, project_id: int) -> None:
        self.api("DELETE", f"/api/projects/{project_id}/")

    def add_local_storage(self, project_id: int, path: Path | str | None = None, *,
                          title: str = "local files", sync: bool = False) -> dict[str, Any]:
        """A local-files import storage, so that ``/data/local-files/?d=<relative path>`` URLs of
        files under ``path`` (default ``images_dir``; created if missing) are served. ``path`` must
        be a strict subfolder of ``documents_root``. ``sync=True`` also imports one task per file."""
        folder = Path(path) if path is not None else self.images_dir
        if not folder.is_absolute():
            folder = self.documents_root / folder
        folder.mkdir(parents=True, exist_ok=True)
        storage = self.api("POST", "/api/storages/localfiles", json={
            "project": project_id, "path": str(folder), "title": title,
            "use_blob_urls": True, "regex_filter": "",
        })
        if sync:
            self.api("POST", f"/api/storages/localfiles/{storage['id']}/sync")
        return storage

    def local_files_url(self, file: Path | str) -> str:
        """The task URL of a file under ``documents_root``; a relative name is taken relative to
        ``images_dir`` (so ``local_files_url("dog.jpg")`` is ``/data/local-files/?d=images/dog.jpg``)."""
        path = Path(file)
        if not path.is_absolute():
            path = self.images_dir / path
        relative = path.resolve().relative_to(self.documents_root.resolve())
        return "/data/local-files/?d=" + quote(relative.as_posix(), safe="/")

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks (each either a bare data dict or ``{"data": {...}, "predictions": ...}``);
        return the new task ids in order."""
        response = self.api("POST", f"/api/projects/{project_id}/import",
                            params={"return_task_ids": "true"}, json=tasks)
        ids = response.get("task_ids")
        if ids is None or len(ids) != len(tasks):
            raise LabelStudioError(f"import into project {project_id}: expected {len(tasks)} task ids,"
                                   f" got {response}")
        return [int(i) for i in ids]

    def task(self, task_id: int) -> dict[str, Any]:
        return self.api("GET", f"/api/tasks/{task_id}/")

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks of a project (paged through)."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            response = self.request("GET", "/api/tasks/",
                                    params={"project": project_id, "page": page, "page_size": 100})
            if response.status_code == 404 and page > 1:  # past the last page
                break
            if response.status_code >= 400:
                raise LabelStudioError(f"GET /api/tasks/?project={project_id}&page={page} -> HTTP "
                                       f"{response.status_code}: {response.text[:2000]}")
            data = response.json()
            batch = data.get("tasks", data) if isinstance(data, dict) else data
            out.extend(batch)
            if len(batch) < 100:
                break
            page += 1
        return out

    # --- predictions and ML backends ------------------------------------------------------

    def create_prediction(self, task_id: int, result: list[dict[str, Any]], *,
                          score: float | None = None, model_version: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"task": task_id, "result": result}
        if score is not None:
            body["score"] = score
        if model_version is not None:
            body["model_version"] = model_version
        return self.api("POST", "/api/predictions/", json=body)

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.api("GET", "/api/predictions/", params={"task": task_id})

    def connect_ml_backend(self, project_id: int, url: str, is_interactive: bool = True,
                           **fields: Any) -> dict[str, Any]:
        """POST /api/ml. Label Studio calls the backend's /health and /setup before answering, so
        the backend must already be up (and reachable from Label Studio)."""
        return self.api("POST", "/api/ml", timeout=60.0, json={
            "project": project_id, "url": url, "is_interactive": is_interactive,
            "title": fields.pop("title", "hybridgl"), **fields,
        })

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        return self.api("GET", "/api/ml", params={"project": project_id})

    def retrieve_predictions(self, project_id: int, task_ids: list[int], *,
                             timeout: float = 360.0) -> dict[str, Any]:
        """The Data Manager's "Retrieve Predictions" action. Synchronous in Label Studio: it
        calls the project's (first) ML backend's /predict and saves what comes back. Tasks that
        already have a prediction of the backend's current model_version are skipped.
        Careful: Label Studio treats ``"included": []`` as *every* task of the project, so an
        empty ``task_ids`` is a no-op here."""
        if not task_ids:
            return {"processed_items": 0, "detail": "no tasks given"}
        return self.api("POST", "/api/dm/actions",
                        params={"id": "retrieve_tasks_predictions", "project": project_id},
                        json={"selectedItems": {"all": False, "included": list(task_ids)}},
                        timeout=timeout)

    def interactive_annotating(self, ml_backend_id: int, task_id: int,
                               context: dict[str, Any] | None, *,
                               timeout: float = 360.0) -> dict[str, Any]:
        """What the editor calls with Auto-Annotation on. The answer is ``{"data": ...}`` or
        ``{"errors": [...]}`` with HTTP 200 either way: callers must look at "errors"."""
        return self.api("POST", f"/api/ml/{ml_backend_id}/interactive-annotating",
                        json={"task": task_id, "context": context}, timeout=timeout)

    # --- lifecycle ------------------------------------------------------------------------

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def _log_hint(self) -> str:
        if self.process is not None and self.process.poll() is not None:
            return (f"\nLabel Studio exited with code {self.process.returncode}; log tail:\n"
                    f"{self.log_tail()}")
        return ""

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the process group (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        self.client.close()
        if self.process is not None:
            _stop_process(self.process, timeout)
            _RUNNING.discard(self)

    def __enter__(self) -> LabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Starting and stopping

_RUNNING: weakref.WeakSet[LabelStudio] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for ls in list(_RUNNING):
        with contextlib.suppress(Exception):
            ls.stop(timeout=5.0)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # started with start_new_session: pgid == pid
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    # anything else left in the group (none expected: runserver --noreload is one process)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (a SIGKILLed pytest must not
    leave Label Studio running). Linux only; harmless elsewhere."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env(home: Path, data_dir: Path, documents_root: Path,
               extra_env: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_NAMES}
    venv_bin = str(ls_venv() / "bin")
    env.update({
        "PATH": venv_bin + os.pathsep + env.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "PYTHONUNBUFFERED": "1",  # the log is how we read the bound port and report failures
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        # Connecting an ML backend also creates a webhook to <url>/webhook, and the webhook's URL
        # check (SSRF protection, on by default) refuses loopback/private addresses with HTTP 403
        # even when ML_BLOCK_LOCAL_IP is false: only loopback, where the backend runs, is lifted.
        "LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS": "false",
        "LABEL_STUDIO_USER_ADDITIONAL_BANNED_SUBNETS": ",".join(s for s in LABEL_STUDIO_DEFAULT_BANNED
                                                                if s != "127.0.0.0/8"),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents_root),
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
    })
    env.update(extra_env or {})
    return env


def _launch(base_dir: Path, port: int | None, extra_env: dict[str, str] | None,
            startup_timeout: float) -> LabelStudio:
    exe = label_studio_executable()
    base_dir = base_dir.resolve()
    data_dir = base_dir / "data"
    documents_root = base_dir / "documents"
    home = base_dir / "home"
    for folder in (data_dir, documents_root / "images", home):
        folder.mkdir(parents=True, exist_ok=True)
    log_path = base_dir / "label-studio.log"
    requested = port or _free_port()
    env = _child_env(home, data_dir, documents_root, extra_env)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
             "--port", str(requested)],
            cwd=str(base_dir), env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            # PDEATHSIG follows the parent *thread*: only tie it to the main thread, which lives
            # as long as the process.
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread()
            else None)
    ls = LabelStudio(url=f"http://127.0.0.1:{requested}", token=TOKEN, base_dir=base_dir,
                     data_dir=data_dir, documents_root=documents_root, log_path=log_path,
                     process=process)
    _RUNNING.add(ls)
    try:
        _wait_ready(ls, requested, explicit_port=port is not None, timeout=startup_timeout)
    except BaseException:
        ls.stop()
        raise
    return ls


def _wait_ready(ls: LabelStudio, requested: int, *, explicit_port: bool, timeout: float) -> None:
    """Poll until the server is bound, /health answers and the token is accepted."""
    assert ls.process is not None
    deadline = time.monotonic() + timeout
    port: int | None = None
    last = "no answer yet"

    def fail(why: str) -> LabelStudioError:
        return LabelStudioError(f"Label Studio at {ls.base_dir} {why}\n--- {ls.log_path} (tail) ---\n"
                                f"{ls.log_tail()}")

    while True:
        if ls.process.poll() is not None:
            raise fail(f"exited with code {ls.process.returncode} during startup ({last})")
        if time.monotonic() > deadline:
            raise fail(f"was not ready within {timeout:.0f} s ({last})")
        if port is None:
            # Label Studio silently moves to the next port when the asked one is busy; trust the
            # port Django reports binding, not the one we asked for.
            match = _SERVER_LINE.search(ls.log_path.read_text(errors="replace"))
            if match:
                port = int(match.group(1))
                if port != requested and explicit_port:
                    raise fail(f"was asked for port {requested}, which is busy (it chose {port})")
                ls.url = f"http://127.0.0.1:{port}"
                ls.client.base_url = httpx.URL(ls.url)
        if port is not None:
            try:
                health = httpx.get(f"{ls.url}/health", timeout=2.0)
                if health.status_code == 200:
                    who = ls.client.get("/api/current-user/whoami", timeout=10.0)
                    if who.status_code == 200 and who.json().get("email") == USERNAME:
                        if ls.process.poll() is None:
                            return
                    elif who.status_code in (401, 403):
                        raise fail(f"rejects the token (HTTP {who.status_code}: {who.text[:300]}); a "
                                   "stale data dir or template with other credentials?")
                    last = f"whoami HTTP {who.status_code}: {who.text[:200]}"
                else:
                    last = f"/health HTTP {health.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _template_stamp() -> dict[str, Any]:
    return {"harness": 1, "label_studio": LS_VERSION, "username": USERNAME, "password": PASSWORD, "token": TOKEN}


def _template_ok(template: Path) -> bool:
    stamp = template / "stamp.json"
    try:
        return (json.loads(stamp.read_text()) == _template_stamp()
                and (template / "data" / "label_studio.sqlite3").is_file())
    except (OSError, ValueError):
        return False


def ensure_template(startup_timeout: float = DEFAULT_STARTUP_TIMEOUT) -> Path:
    """The migrated data-dir template (made once: start Label Studio in a scratch dir, stop it,
    keep its data dir). Returns the template folder; its ``data`` is a LABEL_STUDIO_BASE_DATA_DIR."""
    template = ls_template_dir()
    if _template_ok(template):
        return template
    with _locked(template.parent / (template.name + ".lock")):
        if _template_ok(template):  # another process made it while we waited
            return template
        scratch = Path(tempfile.mkdtemp(prefix="ls-template-", dir=template.parent))
        try:
            ls = _launch(scratch, None, None, startup_timeout)
            ls.stop()
            staged = scratch / "template"
            staged.mkdir()
            shutil.copytree(scratch / "data", staged / "data")
            (staged / "stamp.json").write_text(json.dumps(_template_stamp(), indent=1))
            if template.exists():
                shutil.rmtree(template)
            staged.rename(template)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return template


def start_label_studio(base_dir: Path, port: int | None = None, *,
                       extra_env: dict[str, str] | None = None,
                       startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
                       use_template: bool = True) -> LabelStudio:
    """Start a fresh Label Studio whose data lives in ``base_dir`` (data/, documents/, home/,
    label-studio.log) and return it once it answers with the token. ``port=None`` picks a free
    one. ``extra_env`` adds environment variables (e.g. ML_TIMEOUT_PREDICT). With
    ``use_template`` (default) the data dir starts as a copy of the migrated template; without it
    Label Studio migrates a new database (~20 s more). Stop it with ``.stop()``."""
    base_dir = Path(base_dir)
    data_dir = base_dir / "data"
    if use_template and not (data_dir / "label_studio.sqlite3").exists():
        template = ensure_template(startup_timeout)
        shutil.copytree(template / "data", data_dir, dirs_exist_ok=True)
    return _launch(base_dir, port, extra_env, startup_timeout)
