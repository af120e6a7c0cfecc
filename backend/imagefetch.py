"""Downloading a task's image behind the SSRF guard: which URLs may be fetched, with or without
Label Studio's token, every redirect hop checked and every connection pinned to a checked address.

Light (httpx only): both the web process and the workers import it.

Security model of :meth:`ImageFetcher.fetch` (task data is written by anyone who can import tasks,
so an image reference is untrusted input):

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

Tokens never appear in exception messages: the :class:`Credentials` that give the token also scrub
every message before it is raised.
"""

from __future__ import annotations

import base64
import logging
import re
from typing import Protocol
from urllib.parse import parse_qsl, unquote

import httpx

from backend.errors import AccessDenied, ImageFetchError, LabelStudioError
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

__all__ = ["AccessDenied", "Credentials", "ImageFetchError", "ImageFetcher", "labelstudio_base"]

ENV_URL = "LABEL_STUDIO_URL"
ENV_KEY = "LABEL_STUDIO_API_KEY"
ENV_TIMEOUT = "IMAGE_FETCH_TIMEOUT"

CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob")
MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_PRESIGN_PATH = re.compile(r"/(tasks|projects)/\d+/presign/?$")
_BODY_SNIPPET = 300


class Credentials(Protocol):
    """Label Studio's token as the fetcher uses it (``backend.labelstudio.LabelStudioClient`` is one)."""

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header for Label Studio's origin ({} without a token). May raise
        LabelStudioError (a personal access token that cannot be exchanged)."""

    def renew_auth(self, rejected: dict[str, str]) -> bool:
        """Label Studio answered 401 to ``rejected``: drop that access token. True when a retry
        with fresh headers may succeed (a personal access token), False otherwise."""

    def redact(self, text: str) -> str:
        """``text`` with every token replaced by ``<redacted>``."""


def labelstudio_base(url: str | None) -> httpx.URL | None:
    """LABEL_STUDIO_URL checked and parsed (no query, no fragment); None when it is empty."""
    url = (url or "").strip()
    if not url:
        return None
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
        raise LabelStudioError(f"{ENV_URL} must not contain a user name or password; put the token in {ENV_KEY}")
    return parsed.copy_with(query=None, fragment=None)


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port
    if port is None:
        port = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, norm_host(url.host), port


def _hostport(url: httpx.URL) -> str:
    return f"{url.host}:{url.port}" if url.port else url.host


def transport_failure(exc: Exception, doing: str, where: str, within: str, at_labelstudio: bool) -> tuple[str, bool]:
    """What a request that got no answer means, for the image fetch and the API client alike:
    (message, transient). ``within`` says the time allowed (and which setting gives it)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"cannot {doing}: {where} did not answer within {within} ({type(exc).__name__}); retry later", True
    if isinstance(exc, httpx.ConnectError) and ("CERTIFICATE" in detail.upper() or "SSL" in detail.upper()):
        return (f"cannot {doing}: TLS with {where} failed ({detail}); check its certificate or point SSL_CERT_FILE "
                "at your CA bundle"), False
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL)):
        return f"cannot {doing}: invalid request to {where} ({detail})", False
    hint = f"; is Label Studio running and is {ENV_URL} right?" if at_labelstudio else "; retry later"
    return f"cannot {doing}: {where} is unreachable ({detail}){hint}", True


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


class _NoCredentials:
    def auth_headers(self) -> dict[str, str]:
        return {}

    def renew_auth(self, rejected: dict[str, str]) -> bool:
        return False

    def redact(self, text: str) -> str:
        return text


class ImageFetcher:
    """Fetches image references for one Label Studio (``labelstudio_url``, may be empty: then only
    allow-listed absolute URLs can be fetched) with its ``credentials`` (None: no token). Thread-safe."""

    def __init__(self, labelstudio_url: str, credentials: Credentials | None, policy: FetchPolicy = FetchPolicy(),
                 *, transport: httpx.BaseTransport | None = None):
        self.policy = policy
        self._base = labelstudio_base(labelstudio_url)
        self.url = str(self._base).rstrip("/") if self._base is not None else ""
        self._credentials = credentials if credentials is not None else _NoCredentials()
        # Every connection an image host gets goes to the address the policy checked (PinnedTransport).
        # No auth on the client itself: the token is added per request, for Label Studio's origin only.
        self._http = httpx.Client(transport=PinnedTransport(transport or httpx.HTTPTransport()),
                                  timeout=httpx.Timeout(policy.timeout), follow_redirects=False,
                                  headers={"User-Agent": "hybridgl-labelstudio"})

    def __repr__(self) -> str:
        return f"ImageFetcher(url={self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ImageFetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(self, ref: str, task_id: int | None = None) -> bytes:
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

    # ---- helpers

    def _redact(self, text: str) -> str:
        return self._credentials.redact(text)

    def _error(self, cls: type[LabelStudioError], message: str, *, transient: bool = False,
               status: int | None = None, unreachable: bool = False) -> LabelStudioError:
        return cls(self._redact(message), transient=transient, status=status, unreachable=unreachable)

    def _is_ls(self, url: httpx.URL) -> bool:
        return self._base is not None and origin(url) == origin(self._base)

    def _ls_url(self, path: str, params: dict | None = None) -> httpx.URL:
        url = httpx.URL(self.url + path)
        return url.copy_merge_params(params) if params else url

    def _describe(self, url: httpx.URL) -> str:
        """A URL for messages: Label Studio's with its query (local-files' d=), others without
        (presigned signatures)."""
        if self._is_ls(url):
            text = url.raw_path.decode("ascii", "replace")
        else:
            text = str(url.copy_with(query=None, fragment=None, username=None, password=None))
        return text if len(text) <= 200 else text[:197] + "..."

    # ---- the policy

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
            return self._ls_url(f"/tasks/{int(task_id)}/presign/", {"fileuri": fileuri}), set()
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
        host, port = norm_host(url.host), origin(url)[2] or 80
        if origin(url) in trusted:  # the storage Label Studio presigned for: may be a private MinIO
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

    # ---- the requests

    def _fetch(self, url: httpx.URL, trusted: set) -> bytes:
        for _hop in range(MAX_REDIRECTS + 1):
            with_auth, address = self._check_hop(url, trusted)
            response, authed = self._send(url, with_auth, address)
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
                        key_state = "wrong" if authed else "missing"
                        raise self._error(ImageFetchError, (
                            f"cannot fetch {self._describe(url)}: Label Studio redirected to its login page, so "
                            f"the API token is {key_state}; set {ENV_KEY} (and {ENV_URL}) on the workers"),
                            status=401)
                    if self._is_ls(url) and _PRESIGN_PATH.search(url.path) and not self._is_ls(target):
                        trusted = trusted | {origin(target)}  # the storage Label Studio presigned for us
                    log.debug("image redirect %s -> %s", self._describe(url), self._describe(target))
                    url = target
                    continue
                if status >= 400:
                    raise self._status_error(response, url, authed)
                return self._read(response, url)
            finally:
                response.close()
        raise self._error(ImageFetchError, f"cannot fetch the image: more than {MAX_REDIRECTS} redirects "
                          f"(last {self._describe(url)})")

    def _send(self, url: httpx.URL, with_auth: bool, address: str | None) -> tuple[httpx.Response, bool]:
        """One GET, streamed; (the response, whether it carried the token). The token is asked for
        here, per request, and only when the hop is Label Studio's origin."""
        for attempt in (0, 1):
            headers = self._credentials.auth_headers() if with_auth else {}
            request = self._http.build_request("GET", url, headers=headers,
                                               extensions={PIN_EXTENSION: address} if address else None)
            try:
                response = self._http.send(request, stream=True, follow_redirects=False)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, url) from None
            if response.status_code == 401 and headers and attempt == 0 and self._credentials.renew_auth(headers):
                response.close()
                continue
            return response, bool(headers)
        raise AssertionError("unreachable")

    def _transport_error(self, exc: Exception, url: httpx.URL) -> LabelStudioError:
        at_labelstudio = self._is_ls(url)
        where = "Label Studio at " + self.url if at_labelstudio else _hostport(url)
        message, transient = transport_failure(exc, f"fetch {self._describe(url)}", where,
                                               f"{self.policy.timeout:g} s ({ENV_TIMEOUT})", at_labelstudio)
        return self._error(ImageFetchError, message, transient=transient, unreachable=transient and at_labelstudio)

    def _status_error(self, response: httpx.Response, url: httpx.URL, authed: bool) -> LabelStudioError:
        status = response.status_code
        doing = f"fetch {self._describe(url)}"
        where = f"Label Studio at {self.url}" if self._is_ls(url) else _hostport(url)
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
        if status in (401, 403):
            if self._is_ls(url):
                what = "wrong or lacks access to this project" if authed else "missing"
                return self._error(ImageFetchError, (
                    f"cannot {doing}: {where} answered HTTP {status} for {self._describe(url)}: the API token is "
                    f"{what}. Set {ENV_KEY} (a legacy token, or a personal access token, of a user who can see the "
                    f"project) and {ENV_URL} on the backend and the workers."), status=status)
            return self._error(ImageFetchError, (
                f"cannot {doing}: {where} answered HTTP {status} for {self._describe(url)}. The Label Studio "
                f"token is only sent to {self.url or ENV_URL}; if this is Label Studio under another name, set "
                f"{ENV_URL} to that address; a presigned URL may have expired."), status=status)
        if status == 429 or status >= 500:
            return self._error(ImageFetchError, f"cannot {doing}: {where} answered HTTP {status} for "
                               f"{self._describe(url)}; retry later", transient=True, status=status,
                               unreachable=self._is_ls(url))
        # a streamed response: its body is not read (it could be large)
        return self._error(ImageFetchError, f"cannot {doing}: {where} answered HTTP {status} for "
                           f"{self._describe(url)}", status=status)

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
            raise self._transport_error(exc, url) from None
        return b"".join(chunks)
