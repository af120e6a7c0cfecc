"""Client for Label Studio: image download with auth, reading and writing predictions.

Light (httpx only): both the web process and the workers import it.

Security model of :meth:`LabelStudioClient.fetch_image` (task data is written by anyone who can
import tasks, so an image reference is untrusted input):

- The Label Studio token is only ever sent to Label Studio's own origin (scheme, host and port of
  LABEL_STUDIO_URL). It is decided per request, never set on the HTTP client, so a redirect to
  another host never carries it.
- Relative references (``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...``,
  ``/tasks/<id>/presign/...``) are joined to Label Studio's URL; ``..`` segments are refused.
- Absolute http(s) URLs to other hosts must match ``FetchPolicy.allowed_hosts`` (IMAGE_ALLOWED_HOSTS)
  and must not resolve to private, loopback, reserved addresses (unless ``allow_private``) nor
  ever to cloud metadata, link-local, multicast or unspecified ones, in any IPv6 spelling (see
  :mod:`backend.fetchpolicy`). The host is resolved once per hop and the connection goes to the
  address that was checked. Every redirect hop is checked again, before any connection is made.
- Cloud URIs (s3://, gs://, gcs://, azure-blob://) go through Label Studio's presign endpoint; the
  host Label Studio redirects to is trusted for that fetch (it may be a private MinIO, but never a
  metadata address), without token.
- Bodies are streamed and cut at ``max_bytes``; every request has explicit timeouts.

Tokens never appear in exception messages, reprs or logs: they are held in a redacting wrapper and
every message is scrubbed before it is raised.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx

from backend.errors import UserError
from backend.fetchpolicy import (
    ENV_ALLOWED_HOSTS,
    ENV_MAX_BYTES,
    PIN_EXTENSION,
    AddressRefused,
    FetchPolicy,
    PinnedTransport,
    ResolveFailed,
    norm_host,
    resolve_checked,
)

log = logging.getLogger(__name__)

__all__ = [
    "AccessDenied",
    "FetchPolicy",
    "ImageFetchError",
    "LabelStudioClient",
    "LabelStudioError",
    "client_from",
    "prediction_versions",
]

ENV_URL = "LABEL_STUDIO_URL"
ENV_KEY = "LABEL_STUDIO_API_KEY"
ENV_TIMEOUT = "IMAGE_FETCH_TIMEOUT"

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob")
MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
ACCESS_TOKEN_MARGIN = 30.0  # refresh this many seconds before the access token's exp
ACCESS_TOKEN_DEFAULT_TTL = 60.0  # when the access token has no readable exp
_PRESIGN_PATH = re.compile(r"/(tasks|projects)/\d+/presign/?$")
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]*$")
_BODY_SNIPPET = 300


# --------------------------------------------------------------------------------------------
# errors


class LabelStudioError(UserError):
    """Talking to Label Studio (or fetching an image) failed.

    ``transient`` is True when retrying later may help (timeouts, connection errors, 429, 5xx);
    ``unreachable`` is True when it was Label Studio itself (not an image host) that could not be reached.
    The message says what is wrong and what to change; it never contains a token.
    """

    def __init__(self, message: str, *, transient: bool = False, status: int | None = None,
                 unreachable: bool = False):
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.unreachable = unreachable


class ImageFetchError(LabelStudioError):
    """An image could not be downloaded."""


class AccessDenied(ImageFetchError):
    """Our fetch policy refuses this URL (scheme, host not allowed, private address, path traversal)."""


def prediction_versions(task: dict) -> set[str]:
    """The model versions of a task's predictions, from a task as :meth:`LabelStudioClient.tasks`
    lists it (``predictions_model_versions``) or with full ``predictions``."""
    versions = {p.get("model_version") for p in task.get("predictions") or () if isinstance(p, dict)}
    joined = task.get("predictions_model_versions")
    if isinstance(joined, str) and joined:
        versions.update(v.strip() for v in joined.split(","))
    elif isinstance(joined, list):
        versions.update(str(v) for v in joined)
    return {v for v in versions if v}


# --------------------------------------------------------------------------------------------
# tokens


class _Secret:
    """A string that never shows itself in a repr, a log or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<empty>"

    __str__ = __repr__


def _jwt_payload(token: str) -> dict | None:
    """The payload of a JWT, decoded without verification; None when ``token`` is no JWT."""
    match = _JWT.match(token)
    if not match:
        return None
    part = match.group(1)
    try:
        payload = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _clean_key(key: str | None) -> str:
    key = (key or "").strip()
    for prefix in ("Token ", "Bearer ", "token ", "bearer "):  # pasted with its scheme
        if key.startswith(prefix):
            key = key[len(prefix):].strip()
    return key


# --------------------------------------------------------------------------------------------
# the client


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port
    if port is None:
        port = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, norm_host(url.host), port


def _hostport(url: httpx.URL) -> str:
    return f"{url.host}:{url.port}" if url.port else url.host


def _decoded(value: str) -> str:
    """Percent-decode until stable (catches %252e%252e)."""
    for _ in range(5):
        new = unquote(value)
        if new == value:
            break
        value = new
    return value


def _has_dotdot(path: str) -> bool:
    return any(part == ".." for part in re.split(r"[/\\]", _decoded(path)))


class LabelStudioClient:
    """One Label Studio instance: ``url`` (LABEL_STUDIO_URL) and a user's ``api_key``
    (LABEL_STUDIO_API_KEY: a legacy token, or a personal access token that is exchanged for
    short-lived access tokens). ``url`` may be empty: then only allow-listed absolute URLs can be
    fetched. Thread-safe."""

    def __init__(self, url: str, api_key: str, policy: FetchPolicy = FetchPolicy(), *,
                 transport: httpx.BaseTransport | None = None):
        self.policy = policy
        url = (url or "").strip()
        if url:
            if "://" not in url:
                url = "http://" + url
            try:
                parsed = httpx.URL(url)
            except Exception:
                parsed = None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
                raise LabelStudioError(f"{ENV_URL} must look like http://host:8080 (got a value that is not "
                                       "an http(s) URL)")
            if parsed.userinfo:
                raise LabelStudioError(f"{ENV_URL} must not contain a user name or password; "
                                       f"put the token in {ENV_KEY}")
            self._base: httpx.URL | None = parsed.copy_with(query=None, fragment=None)
            self.url = str(self._base).rstrip("/")
        else:
            self._base = None
            self.url = ""
        key = _clean_key(api_key)
        self._key = _Secret(key)
        payload = _jwt_payload(key) if key else None
        self._jwt = payload is not None
        self._key_is_access = bool(payload) and payload.get("token_type") == "access"
        self._access: _Secret | None = None
        self._access_until = 0.0
        self._lock = threading.Lock()
        self._timeout = httpx.Timeout(policy.timeout)
        # Every connection an image host gets goes to the address the policy checked (PinnedTransport).
        self._http = httpx.Client(transport=PinnedTransport(transport or httpx.HTTPTransport()), timeout=self._timeout, follow_redirects=False,
                                  headers={"User-Agent": "hybridgl-labelstudio"})

    # ---- housekeeping

    def __repr__(self) -> str:
        kind = "personal access token" if self._jwt else ("legacy token" if self._key else "no token")
        return f"LabelStudioClient(url={self.url!r}, auth={kind!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LabelStudioClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _redact(self, text: str) -> str:
        for secret in (self._key, self._access):
            if secret and secret.get():
                text = text.replace(secret.get(), "<redacted>")
        return text

    def _error(self, cls: type[LabelStudioError], message: str, *, transient: bool = False,
               status: int | None = None, unreachable: bool = False) -> LabelStudioError:
        return cls(self._redact(message), transient=transient, status=status, unreachable=unreachable)

    # ---- auth

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for Label Studio (exchanging a personal access token first)."""
        if not self._key:
            return {}
        if not self._jwt or self._key_is_access:
            scheme = "Bearer" if self._jwt else "Token"
            return {"Authorization": f"{scheme} {self._key.get()}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def _access_token(self, force: bool = False) -> str:
        with self._lock:
            if force or self._access is None or time.time() >= self._access_until:
                self._refresh()
            assert self._access is not None
            return self._access.get()

    def _refresh(self) -> None:
        """POST /api/token/refresh/ {"refresh": PAT} -> {"access": JWT}. Holds self._lock."""
        self._require_url("exchange the personal access token")
        url = self._api_url("/api/token/refresh/")
        try:
            response = self._http.post(url, json={"refresh": self._key.get()})
        except httpx.HTTPError as exc:
            raise self._transport_error(LabelStudioError, exc, url, "exchange the personal access token") from None
        status = response.status_code
        if status in (401, 403):
            raise self._error(LabelStudioError, (
                f"Label Studio at {self.url} refused the personal access token in {ENV_KEY} (HTTP {status}: "
                "expired, revoked or from another Label Studio). Create a new one under Account & Settings "
                "> Personal Access Token, or use the user's legacy token."), status=status)
        if status in (404, 405):
            raise self._error(LabelStudioError, (
                f"Label Studio at {self.url} has no /api/token/refresh/ (HTTP {status}): it predates personal "
                f"access tokens, or {ENV_URL} is not Label Studio. Use the user's legacy token in {ENV_KEY}."),
                status=status)
        if status >= 400:
            raise self._status_error(LabelStudioError, response, url, "exchange the personal access token")
        try:
            access = response.json()["access"]
            assert isinstance(access, str) and access
        except Exception:
            raise self._error(LabelStudioError, (
                f"Label Studio at {self.url} answered /api/token/refresh/ without an access token; is "
                f"{ENV_URL} Label Studio?")) from None
        self._access = _Secret(access)
        exp = (_jwt_payload(access) or {}).get("exp")
        now = time.time()
        if isinstance(exp, (int, float)):
            lifetime = max(exp - now, 0.0)
            self._access_until = now + max(lifetime - min(ACCESS_TOKEN_MARGIN, lifetime / 2), 0.0)
        else:
            self._access_until = now + ACCESS_TOKEN_DEFAULT_TTL
        log.debug("exchanged the personal access token for an access token at %s", self.url)

    def _exchanging(self) -> bool:
        return self._jwt and not self._key_is_access

    # ---- plumbing

    def _require_url(self, doing: str) -> None:
        if self._base is None:
            raise LabelStudioError(f"cannot {doing}: Label Studio's address is unknown; set {ENV_URL} and {ENV_KEY}")

    def _api_url(self, path: str, params: dict | None = None) -> httpx.URL:
        assert self._base is not None
        url = httpx.URL(self.url + path)
        return url.copy_merge_params(params) if params else url

    def _is_ls(self, url: httpx.URL) -> bool:
        return self._base is not None and _origin(url) == _origin(self._base)

    def _describe(self, url: httpx.URL) -> str:
        """A URL for messages: Label Studio's with its query (local-files' d=), others without
        (presigned signatures)."""
        if self._is_ls(url):
            text = url.raw_path.decode("ascii", "replace")
        else:
            text = str(url.copy_with(query=None, fragment=None, username=None, password=None))
        return text if len(text) <= 200 else text[:197] + "..."

    def _transport_error(self, cls: type[LabelStudioError], exc: Exception, url: httpx.URL,
                         doing: str) -> LabelStudioError:
        where = "Label Studio at " + self.url if self._is_ls(url) else _hostport(url)
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            setting = f" within {self.policy.timeout:g} s" + (f" ({ENV_TIMEOUT})" if cls is not LabelStudioError else "")
            return self._error(cls, f"cannot {doing}: {where} did not answer{setting} ({type(exc).__name__}); "
                               "retry later", transient=True, unreachable=self._is_ls(url))
        if isinstance(exc, httpx.ConnectError) and ("CERTIFICATE" in detail.upper() or "SSL" in detail.upper()):
            return self._error(cls, f"cannot {doing}: TLS with {where} failed ({detail}); check its certificate "
                               "or point SSL_CERT_FILE at your CA bundle")
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL)):
            return self._error(cls, f"cannot {doing}: invalid request to {where} ({detail})")
        hint = f"; is Label Studio running and is {ENV_URL} right?" if self._is_ls(url) else "; retry later"
        return self._error(cls, f"cannot {doing}: {where} is unreachable ({detail}){hint}", transient=True,
                           unreachable=self._is_ls(url))

    def _body_snippet(self, response: httpx.Response) -> str:
        """The start of an error body (Label Studio's JSON explains 400s); never HTML, never unread streams."""
        try:
            text = response.text
        except Exception:  # a streamed image response: not read
            return ""
        if "html" in response.headers.get("content-type", ""):
            return ""
        text = " ".join(text.split())
        return (": " + text[:_BODY_SNIPPET]) if text else ""

    def _status_error(self, cls: type[LabelStudioError], response: httpx.Response, url: httpx.URL,
                      doing: str) -> LabelStudioError:
        status = response.status_code
        where = f"Label Studio at {self.url}" if self._is_ls(url) else _hostport(url)
        if status in (401, 403):
            if self._is_ls(url):
                what = "missing" if not self._key else "wrong or lacks access to this project"
                return self._error(cls, (
                    f"cannot {doing}: {where} answered HTTP {status} for {self._describe(url)}: the API token is "
                    f"{what}. Set {ENV_KEY} (a legacy token, or a personal access token, of a user who can see the "
                    f"project) and {ENV_URL} on the backend and the workers."), status=status)
            return self._error(cls, (
                f"cannot {doing}: {where} answered HTTP {status} for {self._describe(url)}. The Label Studio "
                f"token is only sent to {self.url or ENV_URL}; if this is Label Studio under another name, set "
                f"{ENV_URL} to that address; a presigned URL may have expired."), status=status)
        if status == 429 or status >= 500:
            return self._error(cls, f"cannot {doing}: {where} answered HTTP {status} for {self._describe(url)}; "
                               "retry later", transient=True, status=status, unreachable=self._is_ls(url))
        return self._error(cls, f"cannot {doing}: {where} answered HTTP {status} for "
                           f"{self._describe(url)}{self._body_snippet(response)}", status=status)

    def _api(self, method: str, path: str, doing: str, *, params: dict | None = None,
             json_body: Any = None) -> Any:
        """One JSON API call with auth (refreshing an access token once on 401)."""
        self._require_url(doing)
        url = self._api_url(path, params)
        for attempt in (0, 1):
            headers = self.auth_headers()
            try:
                response = self._http.request(method, url, json=json_body, headers=headers)
            except httpx.HTTPError as exc:
                raise self._transport_error(LabelStudioError, exc, url, doing) from None
            if response.status_code == 401 and attempt == 0 and self._exchanging():
                self._access_token(force=True)
                continue
            break
        if response.status_code in REDIRECT_STATUSES:
            target = response.headers.get("location", "")
            raise self._error(LabelStudioError, (
                f"cannot {doing}: Label Studio at {self.url} redirected {path} (HTTP {response.status_code}"
                f"{' to ' + target[:120] if target else ''}); set {ENV_URL} to Label Studio's exact address "
                "(http vs https, path prefix)"), status=response.status_code)
        if response.status_code == 404:
            raise self._error(LabelStudioError, (
                f"cannot {doing}: Label Studio at {self.url} answered HTTP 404 for {path}{self._body_snippet(response)}"
                f" (is {ENV_URL} Label Studio, and does the task exist?)"), status=404)
        if response.status_code >= 400:
            raise self._status_error(LabelStudioError, response, url, doing)
        try:
            return response.json()
        except ValueError:
            raise self._error(LabelStudioError, (
                f"cannot {doing}: Label Studio at {self.url} answered {path} with something that is not JSON "
                f"(is {ENV_URL} Label Studio's API address?)")) from None

    # ---- projects and tasks

    # What `tasks` asks for: enough to build a request and to decide what to skip (no prediction
    # results, which can be large brush masks).
    TASK_FIELDS = ("id", "data", "meta", "total_annotations", "cancelled_annotations", "total_predictions",
                   "predictions_model_versions")
    TASK_PAGE_SIZE = 100

    def project(self, project_id: int) -> dict:
        """GET /api/projects/ID/: the project (title, label_config, task_number, ...)."""
        data = self._api("GET", f"/api/projects/{int(project_id)}/", f"read project {project_id}")
        if not isinstance(data, dict) or "label_config" not in data:
            raise self._error(LabelStudioError, f"cannot read project {project_id}: Label Studio answered something "
                              "that is not a project")
        return data

    def tasks(self, project_id: int, task_ids: Iterable[int] | None = None,
              page_size: int = TASK_PAGE_SIZE) -> Iterator[dict]:
        """The project's tasks in id order, one page at a time (GET /api/tasks/?project=ID&fields=all).

        Each task has ``id``, ``data``, ``total_annotations`` (submitted, not skipped),
        ``cancelled_annotations`` and ``predictions_model_versions`` (comma-joined); see
        :func:`prediction_versions`. With ``task_ids`` only those (that belong to the project) are
        listed. Pages are fetched lazily, so a caller can start work before the last page.
        """
        if task_ids is None:
            yield from self._task_pages(project_id, None, page_size)
            return
        wanted = sorted({int(t) for t in task_ids})
        for start in range(0, len(wanted), page_size):
            chunk = wanted[start:start + page_size]
            selected = {"selectedItems": {"all": False, "included": chunk}}
            yield from self._task_pages(project_id, selected, page_size)

    def _task_pages(self, project_id: int, query: dict | None, page_size: int) -> Iterator[dict]:
        page, seen = 1, 0
        while True:
            params: dict[str, Any] = {"project": int(project_id), "page": page, "page_size": page_size,
                                      "fields": "all", "include": ",".join(self.TASK_FIELDS)}
            if query is not None:
                params["query"] = json.dumps(query)
            doing = f"list the tasks of project {project_id} (page {page})"
            try:
                data = self._api("GET", "/api/tasks/", doing, params=params)
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:  # past the last page
                    return
                raise
            if isinstance(data, dict):
                batch, total = data.get("tasks"), data.get("total")
            else:  # a bare list (older Label Studio)
                batch, total = data, None
            if not isinstance(batch, list):
                raise self._error(LabelStudioError, f"cannot {doing}: Label Studio answered something that is "
                                  "not a task list")
            batch = sorted((t for t in batch if isinstance(t, dict) and "id" in t), key=lambda t: t["id"])
            yield from batch
            seen += len(batch)
            if len(batch) < page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1

    # ---- predictions

    def create_prediction(self, task_id: int, result: list[dict], score: float | None, model_version: str) -> dict:
        """POST /api/predictions/; returns the created prediction."""
        body = {"task": int(task_id), "result": result, "score": score, "model_version": model_version}
        created = self._api("POST", "/api/predictions/", f"write the prediction of task {task_id}", json_body=body)
        log.debug("wrote prediction %s for task %s (%s)", created.get("id") if isinstance(created, dict) else "?",
                  task_id, model_version)
        return created

    def task_predictions(self, task_id: int) -> list[dict]:
        """GET /api/predictions/?task=ID."""
        data = self._api("GET", "/api/predictions/", f"read the predictions of task {task_id}",
                         params={"task": int(task_id)})
        if isinstance(data, dict) and isinstance(data.get("results"), list):  # a paginated answer
            data = data["results"]
        if not isinstance(data, list):
            raise LabelStudioError(f"cannot read the predictions of task {task_id}: Label Studio answered "
                                   "something that is not a list")
        # defensive: should the filter be ignored, keep only this task's predictions
        return [p for p in data if isinstance(p, dict) and p.get("task", task_id) == task_id]

    def has_prediction(self, task_id: int, model_version: str) -> bool:
        return any(p.get("model_version") == model_version for p in self.task_predictions(task_id))

    # ---- images

    def fetch_image(self, ref: str, task_id: int | None = None) -> bytes:
        """The bytes behind a task's image reference. Raises AccessDenied when the policy refuses
        the URL (before connecting), ImageFetchError otherwise (``transient`` for network trouble)."""
        if not isinstance(ref, str) or not ref.strip():
            raise ImageFetchError(f"task {task_id}: the image reference is empty" if task_id is not None
                                  else "the image reference is empty")
        ref = ref.strip()
        try:
            url, trusted = self._first_url(ref, task_id)
            return self._fetch(url, trusted)
        except LabelStudioError as exc:
            cls = type(exc) if isinstance(exc, ImageFetchError) else ImageFetchError
            message = self._redact(str(exc))
            if cls is type(exc) and message == str(exc):
                raise
            failure = exc
        # One family for callers (a failed token exchange is an ImageFetchError here), and one last
        # scrub (a reference could quote a token); raised outside the handler so that the original
        # is not kept as __context__.
        raise cls(message, transient=failure.transient, status=failure.status, unreachable=failure.unreachable)

    def _first_url(self, ref: str, task_id: int | None) -> tuple[httpx.URL, set]:
        scheme = ref.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", ref) else ""
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageFetchError(f"cannot fetch {ref[:200]}: a cloud storage URI is fetched through Label "
                                      "Studio's presign endpoint, which needs the task id (none was given)")
            if self._base is None:
                raise ImageFetchError(f"cannot fetch {ref[:200]}: cloud storage URIs are fetched through Label "
                                      f"Studio, whose address is unknown; set {ENV_URL} and {ENV_KEY}")
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return self._api_url(f"/tasks/{int(task_id)}/presign/", {"fileuri": fileuri}), set()
        if ref.startswith("//"):  # scheme-relative: Label Studio's scheme
            ref = (self._base.scheme if self._base is not None else "https") + ":" + ref
            scheme = ref.split(":", 1)[0]
        elif ref.startswith("/") or ref.startswith("\\"):
            if self._base is None:
                raise ImageFetchError(f"cannot fetch {ref[:200]}: it is relative to Label Studio, whose address "
                                      f"is unknown; set {ENV_URL} and {ENV_KEY} on the workers")
            prefix = self._base.path.rstrip("/")
            joined = ref if prefix and ref.startswith(prefix + "/") else prefix + ref
            self._check_ls_path(joined, ref)
            try:
                url = self._base.copy_with(raw_path=joined.encode("utf-8"))
            except Exception:
                raise AccessDenied(f"refusing to fetch {ref[:200]!r}: not a valid path") from None
            self._check_ls_path(url, ref)
            return url, set()
        if scheme not in ("http", "https"):
            shown = scheme + ":" if scheme else repr(ref[:60])
            raise AccessDenied(f"refusing to fetch {shown} URLs: images must be Label Studio URLs (/data/...), "
                               f"http(s) URLs of hosts in {ENV_ALLOWED_HOSTS}, or cloud storage URIs "
                               f"({', '.join(s + '://' for s in CLOUD_SCHEMES)})")
        try:
            url = httpx.URL(ref)
        except Exception:
            raise AccessDenied(f"refusing to fetch {ref[:200]!r}: not a valid URL") from None
        if not url.host:
            raise AccessDenied(f"refusing to fetch {ref[:200]!r}: the URL has no host")
        if self._is_ls(url):
            self._check_ls_path(ref)
        return url, set()

    def _check_ls_path(self, url: httpx.URL | str, shown: str | None = None) -> None:
        """Refuse ``..`` in paths to Label Studio and in local-files' d= (before any request). Given
        the reference as written too: httpx removes dot segments from a path when it parses it."""
        raw = url if isinstance(url, str) else url.raw_path.decode("ascii", "replace")
        path, _, query = raw.split("#", 1)[0].partition("?")
        bad = _has_dotdot(path)
        if not bad:
            for name, value in parse_qsl(query, keep_blank_values=True):
                if name in ("d", "filepath", "fileuri") and _has_dotdot(value):
                    bad = True
        if bad:
            raise AccessDenied(f"refusing to fetch {(shown or raw)[:200]}: '..' path segments are not allowed "
                               "(path traversal)")

    def _check_hop(self, url: httpx.URL, trusted: set) -> tuple[bool, str | None]:
        """Policy for one request: (whether it carries the Label Studio token, the address to connect
        to, or None for Label Studio's own origin, which the operator configured). Raises
        AccessDenied before any connection."""
        if url.scheme not in ("http", "https"):
            raise AccessDenied(f"refusing to fetch {url.scheme}: URLs (only http and https are fetched)")
        if not url.host:
            raise AccessDenied("refusing to fetch a URL without a host")
        if self._is_ls(url):
            self._check_ls_path(url)
            return True, None
        host, port = norm_host(url.host), _origin(url)[2] or 80
        if _origin(url) in trusted:  # the storage Label Studio presigned for: may be a private MinIO
            return False, self._checked_address(host, port, allow_private=True)
        if not self.policy.allows_host(host, port):
            ls = f" (Label Studio is {self.url})" if self.url else ""
            raise AccessDenied(f"refusing to fetch from host {host!r}: it is not Label Studio{ls} and not in "
                               f"{ENV_ALLOWED_HOSTS}; add it there (comma-separated, '*.example.com' for "
                               "subdomains) to allow it")
        return False, self._checked_address(host, port, self.policy.allow_private)

    @staticmethod
    def _checked_address(host: str, port: int, allow_private: bool) -> str:
        try:
            return resolve_checked(host, port, allow_private)
        except AddressRefused as exc:
            raise AccessDenied(f"refusing to fetch from host {host!r}: {exc}") from None
        except ResolveFailed as exc:
            raise ImageFetchError(f"cannot fetch from host {host!r}: {exc}", transient=exc.transient) from None

    def _fetch(self, url: httpx.URL, trusted: set) -> bytes:
        for _hop in range(MAX_REDIRECTS + 1):
            with_auth, address = self._check_hop(url, trusted)
            response = self._send(url, with_auth, address)
            try:
                status = response.status_code
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise self._error(ImageFetchError, f"cannot fetch {self._describe(url)}: HTTP {status} "
                                          "redirect without a Location")
                    try:
                        target = url.join(location)
                    except Exception:
                        raise AccessDenied(f"refusing to follow the redirect from {self._describe(url)}: invalid "
                                           "Location") from None
                    if self._is_ls(target):
                        self._check_ls_path(location)
                    if self._is_ls(url) and self._is_ls(target) and "/user/login" in target.path:
                        key_state = "missing" if not self._key else "wrong"
                        raise self._error(ImageFetchError, (
                            f"cannot fetch {self._describe(url)}: Label Studio redirected to its login page, so "
                            f"the API token is {key_state}; set {ENV_KEY} (and {ENV_URL}) on the workers"),
                            status=401)
                    if self._is_ls(url) and _PRESIGN_PATH.search(url.path) and not self._is_ls(target):
                        trusted = trusted | {_origin(target)}  # the storage Label Studio presigned for us
                    log.debug("image redirect %s -> %s", self._describe(url), self._describe(target))
                    url = target
                    continue
                if status >= 400:
                    raise self._image_status_error(response, url)
                return self._read(response, url)
            finally:
                response.close()
        raise self._error(ImageFetchError, f"cannot fetch the image: more than {MAX_REDIRECTS} redirects "
                          f"(last {self._describe(url)})")

    def _send(self, url: httpx.URL, with_auth: bool, address: str | None) -> httpx.Response:
        for attempt in (0, 1):
            headers = self.auth_headers() if with_auth else {}
            request = self._http.build_request("GET", url, headers=headers,
                                               extensions={PIN_EXTENSION: address} if address else None)
            try:
                response = self._http.send(request, stream=True, follow_redirects=False)
            except httpx.HTTPError as exc:
                raise self._transport_error(ImageFetchError, exc, url, f"fetch {self._describe(url)}") from None
            if response.status_code == 401 and with_auth and attempt == 0 and self._exchanging():
                response.close()
                self._access_token(force=True)
                continue
            return response
        raise AssertionError("unreachable")

    def _image_status_error(self, response: httpx.Response, url: httpx.URL) -> ImageFetchError:
        status = response.status_code
        if status == 404:
            if self._is_ls(url):
                if "/data/local-files" in url.path:
                    hint = ("; local files need a Local Files storage in the project that covers this path, and "
                            "Label Studio started with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
                            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set")
                elif "/data/upload" in url.path:
                    hint = "; the uploaded file was deleted, or the task comes from another Label Studio"
                else:
                    hint = ""
                return self._error(ImageFetchError, f"image not found at Label Studio ({self.url}): "
                                   f"{self._describe(url)} answered HTTP 404{hint}", status=404)
            return self._error(ImageFetchError, f"image not found: {self._describe(url)} answered HTTP 404",
                               status=404)
        error = self._status_error(ImageFetchError, response, url, f"fetch {self._describe(url)}")
        assert isinstance(error, ImageFetchError)
        return error

    def _read(self, response: httpx.Response, url: httpx.URL) -> bytes:
        limit = self.policy.max_bytes
        too_big = (f"cannot fetch {self._describe(url)}: the image is larger than the limit of {limit:,} bytes; "
                   f"raise {ENV_MAX_BYTES} to accept it")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._error(ImageFetchError, too_big)
        if response.headers.get("content-type", "").lower().startswith("text/html"):
            hint = (f" (often Label Studio's login page: check {ENV_KEY} and {ENV_URL})" if self._is_ls(url) else "")
            raise self._error(ImageFetchError, f"cannot fetch {self._describe(url)}: the server answered an HTML "
                              f"page, not an image{hint}")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise self._error(ImageFetchError, too_big)
                chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise self._transport_error(ImageFetchError, exc, url, f"fetch {self._describe(url)}") from None
        return b"".join(chunks)


def client_from(url: str | None, api_key: str | None, setup_hostname: str | None = None,
                setup_token: str | None = None, policy: FetchPolicy | None = None, *,
                transport: httpx.BaseTransport | None = None) -> LabelStudioClient | None:
    """A client for the Label Studio the operator named; None when its address or a token is unknown.

    A token only ever goes to the origin it came with, never to an address a request named:
    - LABEL_STUDIO_URL set: that address, with LABEL_STUDIO_API_KEY, else the token /setup sent
      (e.g. http://label-studio:8080 inside docker, where /setup's hostname is the browser's
      address); /setup's hostname is ignored.
    - LABEL_STUDIO_URL unset: /setup's hostname with /setup's own token, both from the record an
      authenticated /setup pinned (see backend.queue.save_setup). LABEL_STUDIO_API_KEY is never
      sent there.
    """
    if (url or "").strip():
        address, key = url.strip(), _clean_key(api_key) or _clean_key(setup_token)
    else:
        address, key = (setup_hostname or "").strip(), _clean_key(setup_token)
    if not address or not key:
        return None
    return LabelStudioClient(address, key, policy if policy is not None else FetchPolicy(), transport=transport)
