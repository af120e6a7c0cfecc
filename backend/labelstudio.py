"""Label Studio's JSON API for this backend: the project, its tasks page by page, reading and writing
predictions, and which origin a token goes to (:func:`client_from`); through ``label-studio-sdk``.

Light to import (httpx; the SDK is imported on first use): both the web process and the workers
import it. Images are fetched by :mod:`backend.imagefetch`; a :class:`LabelStudioClient` holds one
:class:`~backend.imagefetch.ImageFetcher` for the same Label Studio and token (:meth:`fetch_image`).

The SDK (``label_studio_sdk.LabelStudio``) makes every API call and exchanges a personal access
token for access tokens (POST /api/token/refresh/, cached until their ``exp``). Our own code, each
place saying why: the SDK is given our httpx client (our timeouts and transport, no redirects
followed, no retries of its own); its errors become :class:`LabelStudioError` with messages that say
what to change; a 401 drops the cached access token and retries once (Label Studio forgot it); tasks
are handed on as the JSON dicts Label Studio sent.

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
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
from label_studio_sdk.core.api_error import ApiError

from backend.errors import AccessDenied, ImageFetchError, LabelStudioError
from backend.fetchpolicy import FetchPolicy
from backend.imagefetch import (
    CLOUD_SCHEMES,
    ENV_KEY,
    ENV_URL,
    REDIRECT_STATUSES,
    ImageFetcher,
    labelstudio_base,
    transport_failure,
)

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

log = logging.getLogger(__name__)

__all__ = [
    "AccessDenied",
    "CLOUD_SCHEMES",
    "FetchPolicy",
    "ImageFetchError",
    "LabelStudioClient",
    "LabelStudioError",
    "client_from",
    "prediction_versions",
]

_JWT = re.compile(r"^[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]*$")
_BODY_SNIPPET = 300
# What the SDK's answer parsing raises on a 2xx body of the wrong shape (a list where it expects an
# object: TypeError from its model construction; pydantic's ValidationError is a ValueError).
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, ValueError)


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


class LabelStudioClient:
    """One Label Studio instance: ``url`` (LABEL_STUDIO_URL) and a user's ``api_key``
    (LABEL_STUDIO_API_KEY: a legacy token, or a personal access token that is exchanged for
    short-lived access tokens). ``url`` may be empty: then only allow-listed absolute URLs can be
    fetched. Thread-safe."""

    # What `tasks` asks for: enough to build a request and to decide what to skip (no prediction
    # results, which can be large brush masks).
    TASK_FIELDS = ("id", "data", "meta", "total_annotations", "cancelled_annotations", "total_predictions",
                   "predictions_model_versions")
    TASK_PAGE_SIZE = 100

    def __init__(self, url: str, api_key: str, policy: FetchPolicy = FetchPolicy(), *,
                 transport: httpx.BaseTransport | None = None):
        self.policy = policy
        self._base = labelstudio_base(url)
        self.url = str(self._base).rstrip("/") if self._base is not None else ""
        key = _clean_key(api_key)
        self._key = _Secret(key)
        payload = _jwt_payload(key) if key else None
        self._jwt = payload is not None
        self._key_is_access = bool(payload) and payload.get("token_type") == "access"
        self._lock = threading.Lock()
        self._sdk_client: LabelStudio | None = None
        # The SDK's HTTP client is ours: our timeouts and transport, and redirects are not followed
        # (an API redirect means LABEL_STUDIO_URL is not Label Studio's exact address; following it
        # would send the token to wherever it points).
        self._http = httpx.Client(transport=transport or httpx.HTTPTransport(), timeout=httpx.Timeout(policy.timeout),
                                  follow_redirects=False, headers={"User-Agent": "hybridgl-labelstudio"})
        self._images = ImageFetcher(self.url, self, policy, transport=transport)

    # ---- housekeeping

    def __repr__(self) -> str:
        kind = "personal access token" if self._jwt else ("legacy token" if self._key else "no token")
        return f"LabelStudioClient(url={self.url!r}, auth={kind!r})"

    def close(self) -> None:
        self._images.close()
        self._http.close()

    def __enter__(self) -> "LabelStudioClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def redact(self, text: str) -> str:
        secrets = [self._key.get()]
        client = self._sdk_client
        if client is not None:
            secrets.append(self._tokens(client)._access_token or "")
        for secret in secrets:
            if secret:
                text = text.replace(secret, "<redacted>")
        return text

    def _error(self, message: str, *, transient: bool = False, status: int | None = None,
               unreachable: bool = False) -> LabelStudioError:
        return LabelStudioError(self.redact(message), transient=transient, status=status, unreachable=unreachable)

    # ---- the SDK client and its tokens

    def _sdk(self, doing: str) -> "LabelStudio":
        """The SDK's client, made on first use (importing the SDK takes half a second, and it checks
        a personal access token's expiry when it is made: an expired one is reported at the call)."""
        if self._base is None:
            raise LabelStudioError(f"cannot {doing}: Label Studio's address is unknown; set {ENV_URL} and {ENV_KEY}")
        with self._lock:
            if self._sdk_client is not None:
                return self._sdk_client
            from label_studio_sdk import LabelStudio

            try:
                client = LabelStudio(
                    # The trailing slash keeps a path prefix (https://host/ls): the SDK joins
                    # /api/token/refresh/ with urljoin, which replaces the last path segment.
                    base_url=self.url + "/", api_key=self._key.get(), httpx_client=self._http,
                    # No retries in the SDK: a transient failure is raised as such and the
                    # RQ job (or prelabel's caller) retries it later, with the job's backoff.
                    max_retries=0)
            except ApiError as exc:  # the SDK refuses a personal access token that has expired
                status = exc.status_code
                detail = exc.body.get("detail") if isinstance(exc.body, dict) else None
                failure = self._error(
                    f"the personal access token in {ENV_KEY} cannot be used for Label Studio at {self.url} "
                    f"({detail or 'expired'}). Create a new one under Account & Settings "
                    "> Personal Access Token, or use the user's legacy token.", status=status)
            else:
                if self._key_is_access:
                    # An access token pasted as the key: the SDK would try to exchange it; it is
                    # used as it is instead, until its exp (then the exchange fails and says so).
                    self._tokens(client)._set_access_token(self._key.get())
                self._sdk_client = client
                return client
        raise failure

    @staticmethod
    def _tokens(client: "LabelStudio"):
        """The SDK's token cache (label_studio_sdk.tokens.client_ext.TokensClientExt). The SDK has no
        public handle on it; we need it to give the image fetcher the same access token and to drop
        an access token that Label Studio refused."""
        return client._client_wrapper._tokens_client

    def _exchanging(self) -> bool:
        return self._jwt and not self._key_is_access

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for Label Studio (exchanging a personal access token first,
        through the SDK, whose cached access token the API calls use too)."""
        if not self._key:
            return {}
        if not self._exchanging():
            scheme = "Bearer" if self._jwt else "Token"
            return {"Authorization": f"{scheme} {self._key.get()}"}
        doing = "exchange the personal access token"
        tokens = self._tokens(self._sdk(doing))
        failure: LabelStudioError | None = None
        try:
            return {"Authorization": f"Bearer {tokens.api_key}"}
        except ApiError as exc:
            failure = self._refresh_error(exc)
        except httpx.HTTPError as exc:
            failure = self._transport_error(exc, doing)
        except _SHAPE_ERRORS:
            # The SDK parses every answer of the exchange as JSON, an error's too, and loses its
            # status when it is not JSON (an HTML 404 from a Label Studio without the endpoint).
            failure = self._error(f"Label Studio at {self.url} answered /api/token/refresh/ without an access "
                                  f"token; is {ENV_URL} Label Studio, and one recent enough for personal access "
                                  f"tokens? Else use the user's legacy token in {ENV_KEY}.")
        raise failure

    def renew_auth(self, rejected: dict[str, str]) -> bool:
        """Label Studio answered 401 to ``rejected``: forget that access token (revoked, or Label Studio
        restarted with another secret) so that the next request exchanges the personal access token
        again. The SDK refreshes only at its own clock's exp, so this part is ours."""
        if not self._exchanging() or self._sdk_client is None:
            return False
        tokens = self._tokens(self._sdk_client)
        with tokens._token_refresh_lock:
            if rejected.get("Authorization") == f"Bearer {tokens._access_token}":
                tokens._access_token = None
        return True

    def _refresh_error(self, exc: ApiError) -> LabelStudioError:
        status = exc.status_code
        if status in (401, 403):
            return self._error(
                f"Label Studio at {self.url} refused the personal access token in {ENV_KEY} (HTTP {status}: "
                "expired, revoked or from another Label Studio). Create a new one under Account & Settings "
                "> Personal Access Token, or use the user's legacy token.", status=status)
        if status in (404, 405):
            return self._error(
                f"Label Studio at {self.url} has no /api/token/refresh/ (HTTP {status}): it predates personal "
                f"access tokens, or {ENV_URL} is not Label Studio. Use the user's legacy token in {ENV_KEY}.",
                status=status)
        return self._api_error(exc, "/api/token/refresh/", None, "exchange the personal access token")

    # ---- one API call

    def _api_path(self, path: str, params: dict | None = None) -> httpx.URL:
        url = httpx.URL(self.url + path)
        return url.copy_merge_params(params) if params else url

    def _call(self, doing: str, path: str, params: dict | None, call: Callable[["LabelStudio"], Any],
              what: str) -> Any:
        """``call(sdk)`` with our error mapping, after a 401 once more with a fresh access token.
        ``path`` and ``params`` are what the SDK requests, for messages; ``what`` names the answer
        expected, for when the SDK cannot parse it into its model."""
        client = self._sdk(doing)
        failure: LabelStudioError | None = None
        for attempt in (0, 1):
            # The token first: a failed exchange is reported as such, not as the call's failure.
            sent = self.auth_headers()
            try:
                return call(client)
            except ApiError as exc:
                if exc.status_code == 401 and attempt == 0 and self.renew_auth(sent):
                    continue
                failure = self._api_error(exc, path, params, doing)
            except httpx.HTTPError as exc:
                failure = self._transport_error(exc, doing)
            except _SHAPE_ERRORS:  # JSON, but not the shape the SDK's model expects
                failure = self._error(f"cannot {doing}: Label Studio answered something that is not {what}")
            break
        # raised outside the handler: the SDK's ApiError (response headers and body) is not kept
        # as __context__
        assert failure is not None
        raise failure

    @staticmethod
    def _body_snippet(exc: ApiError) -> str:
        """The start of an error body (Label Studio's JSON explains 400s); never HTML. The SDK has
        parsed it: JSON back to text, anything else is the text itself."""
        if "html" in (exc.headers or {}).get("content-type", "") or exc.body is None:
            return ""
        try:
            text = exc.body if isinstance(exc.body, str) else json.dumps(exc.body)
        except (TypeError, ValueError):
            text = str(exc.body)
        text = " ".join(text.split())
        return (": " + text[:_BODY_SNIPPET]) if text else ""

    def _api_error(self, exc: ApiError, path: str, params: dict | None, doing: str) -> LabelStudioError:
        status = exc.status_code or 0
        shown = self._api_path(path, params).raw_path.decode("ascii", "replace")
        shown = shown if len(shown) <= 200 else shown[:197] + "..."
        where = f"Label Studio at {self.url}"
        if 200 <= status < 300:  # the SDK could not parse it as JSON
            return self._error(f"cannot {doing}: {where} answered {path} with something that is not JSON "
                               f"(is {ENV_URL} Label Studio's API address?)")
        if status in REDIRECT_STATUSES:
            target = (exc.headers or {}).get("location", "")
            return self._error(
                f"cannot {doing}: {where} redirected {path} (HTTP {status}{' to ' + target[:120] if target else ''}); "
                f"set {ENV_URL} to Label Studio's exact address (http vs https, path prefix)", status=status)
        if status == 404:
            return self._error(f"cannot {doing}: {where} answered HTTP 404 for {path}{self._body_snippet(exc)} "
                               f"(is {ENV_URL} Label Studio, and does the task exist?)", status=404)
        if status in (401, 403):
            what = "missing" if not self._key else "wrong or lacks access to this project"
            return self._error(
                f"cannot {doing}: {where} answered HTTP {status} for {shown}: the API token is {what}. Set "
                f"{ENV_KEY} (a legacy token, or a personal access token, of a user who can see the project) and "
                f"{ENV_URL} on the backend and the workers.", status=status)
        if status == 429 or status >= 500:
            return self._error(f"cannot {doing}: {where} answered HTTP {status} for {shown}; retry later",
                               transient=True, status=status, unreachable=True)
        return self._error(f"cannot {doing}: {where} answered HTTP {status} for {shown}{self._body_snippet(exc)}",
                           status=status or None)

    def _transport_error(self, exc: Exception, doing: str) -> LabelStudioError:
        message, transient = transport_failure(exc, doing, "Label Studio at " + self.url,
                                               f"{self.policy.timeout:g} s", at_labelstudio=True)
        return self._error(message, transient=transient, unreachable=transient)

    # ---- projects and tasks

    def project(self, project_id: int) -> dict:
        """GET /api/projects/ID/: the project (title, label_config, task_number, created_at, ...) as
        Label Studio sent it (the SDK's model would turn created_at into a datetime)."""
        doing = f"read project {project_id}"
        response = self._call(doing, f"/api/projects/{int(project_id)}/", None,
                              lambda sdk: sdk.projects.with_raw_response.get(int(project_id)), "a project")
        try:
            data = response.response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or "label_config" not in data:
            raise self._error(f"cannot read project {project_id}: Label Studio answered something that is not a "
                              "project")
        return data

    def tasks(self, project_id: int, task_ids: Iterable[int] | None = None,
              page_size: int = TASK_PAGE_SIZE) -> Iterator[dict]:
        """The project's tasks in id order, one page at a time (the SDK's ``tasks.list`` pager,
        GET /api/tasks/?project=ID&fields=all).

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
        params: dict[str, Any] = {"project": int(project_id), "page_size": page_size, "fields": "all",
                                  "include": ",".join(self.TASK_FIELDS)}
        if query is not None:
            params["query"] = json.dumps(query)
        page, seen = 1, 0
        doing = f"list the tasks of project {project_id} (page {page})"
        pager = self._call(doing, "/api/tasks/", dict(params, page=page), lambda sdk: sdk.tasks.list(**params), "a task list")
        while True:
            try:
                batch = [_task_dict(t) for t in pager.items or ()]
                total = getattr(pager.response, "total", None)
            except _SHAPE_ERRORS:
                batch = None
            if batch is None or any(b is None for b in batch):
                raise self._error(f"cannot {doing}: Label Studio answered something that is not a task list")
            batch = sorted((t for t in batch if "id" in t), key=lambda t: t["id"])
            yield from batch
            seen += len(batch)
            # Our own end of the listing: the SDK's pager asks for pages until one is empty (or 404s);
            # this stops at a short page or at `total`, one request earlier.
            if len(batch) < page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1
            doing = f"list the tasks of project {project_id} (page {page})"
            try:
                pager = self._call(doing, "/api/tasks/", dict(params, page=page),
                                   lambda sdk, current=pager: current.next_page(),
                                   "a task list")
            except LabelStudioError as exc:
                if exc.status == 404:  # past the last page
                    return
                raise
            if pager is None:
                return

    # ---- predictions

    def create_prediction(self, task_id: int, result: list[dict], score: float | None, model_version: str) -> dict:
        """POST /api/predictions/; returns the created prediction."""
        doing = f"write the prediction of task {task_id}"
        response = self._call(doing, "/api/predictions/", None, lambda sdk: sdk.predictions.with_raw_response.create(
            task=int(task_id), result=result, score=score, model_version=model_version), "a prediction")
        try:
            created = response.response.json()
        except ValueError:
            created = None
        log.debug("wrote prediction %s for task %s (%s)", created.get("id") if isinstance(created, dict) else "?",
                  task_id, model_version)
        return created

    def task_predictions(self, task_id: int) -> list[dict]:
        """GET /api/predictions/?task=ID."""
        doing = f"read the predictions of task {task_id}"
        try:
            response = self._call(doing, "/api/predictions/", {"task": int(task_id)},
                                  lambda sdk: sdk.predictions.with_raw_response.list(task=int(task_id)),
                                  "a list")
            data = response.response.json()
        except ValueError:
            data = None
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
        """The bytes behind a task's image reference (:meth:`backend.imagefetch.ImageFetcher.fetch`,
        with this client's token for Label Studio's own origin)."""
        return self._images.fetch(ref, task_id)


def _task_dict(task: Any) -> dict | None:
    """A task of the SDK's pager as the dict Label Studio sent: the SDK builds pydantic models (a
    union of role-based task types) without validating, keeping every field it was given; we only
    asked for plain fields (TASK_FIELDS), so its dict() is the JSON object."""
    if isinstance(task, dict):
        return task
    to_dict = getattr(task, "dict", None)
    return to_dict() if callable(to_dict) else None


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
