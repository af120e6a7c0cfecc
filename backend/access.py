"""Who may call the web process, and what one request may cost it.

:class:`AccessGuard` is the outermost ASGI middleware: with BASIC_AUTH_USER set, every path needs
the Basic auth (both fields compared in constant time, before the body is read); every body is
cut at HYBRIDGL_MAX_BODY_BYTES (413) whether or not it declares its length.
:func:`startup_warnings` lists what `hybridgl serve` should say about an open configuration.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json

from starlette.exceptions import HTTPException

from backend.config import ServeSettings
from backend.errors import ConfigError

EXAMPLE_PASSWORD = "change-me"  # docker/.env.example's BASIC_AUTH_PASS: `hybridgl serve` refuses it


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison's time independent of the lengths too.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def basic_auth_matches(header: str, expected: tuple[str, str]) -> bool:
    """Whether an Authorization header carries these Basic credentials; both fields are always
    compared, in constant time, so that the answer's timing tells nothing about either."""
    user = password = ""
    if header[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user = password = ""
    user_ok = hmac.compare_digest(_digest(user), _digest(expected[0]))
    password_ok = hmac.compare_digest(_digest(password), _digest(expected[1]))
    return user_ok & password_ok


class BodyTooLarge(HTTPException):
    """Raised while the app reads a body past the limit: an HTTPException, so that FastAPI's body
    parsing lets it through and the app answers it like any HTTP error (413, JSON)."""


class AccessGuard:
    """ASGI middleware: Basic auth on every path (when configured), then the body size limit."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.credentials = settings.basic_auth
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if self.credentials is not None and not basic_auth_matches(headers.get("authorization", ""), self.credentials):
            return await _answer(send, 401, "authentication required: use the Basic auth user and password configured "
                                            "on the backend (BASIC_AUTH_USER / BASIC_AUTH_PASS)",
                                 [(b"www-authenticate", b'Basic realm="hybridgl"')])
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _answer(send, 413, self._too_large())
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(413, self._too_large())
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _answer(send, 413, self._too_large())

    def _too_large(self) -> str:
        return (f"the request body is larger than the limit of {self.max_body:,} bytes (HYBRIDGL_MAX_BODY_BYTES): "
                "send fewer tasks per request, or raise the limit")


async def _answer(send, status: int, error: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def listens_beyond_loopback(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.strip().lower() != "localhost"


def startup_warnings(settings: ServeSettings) -> list[str]:
    """What an operator should hear about when the web process starts with an open configuration."""
    warnings = []
    if settings.basic_auth is None and listens_beyond_loopback(settings.host):
        warnings.append(f"listening on {settings.host}:{settings.port} without authentication: anyone who reaches "
                        "this port can enqueue work and read job results. Set BASIC_AUTH_USER and BASIC_AUTH_PASS "
                        "(and give Label Studio the same), or listen on 127.0.0.1 (--host)")
    if settings.basic_auth is None and not settings.label_studio_url:
        warnings.append("LABEL_STUDIO_URL is unset and /setup is not authenticated: the address Label Studio sends "
                        "in /setup is not used, so workers cannot reach Label Studio; set LABEL_STUDIO_URL (and "
                        "LABEL_STUDIO_API_KEY), or BASIC_AUTH_USER / BASIC_AUTH_PASS")
    elif settings.label_studio_api_key and not settings.label_studio_url:
        warnings.append("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key is only ever sent to "
                        "LABEL_STUDIO_URL, so it is not used; set LABEL_STUDIO_URL to Label Studio's address")
    return warnings


def refuse_example_password(settings: ServeSettings) -> None:
    """`hybridgl serve` does not start with docker/.env.example's password."""
    if settings.basic_auth is not None and settings.basic_auth_pass.strip() in ("", EXAMPLE_PASSWORD):
        raise ConfigError("BASIC_AUTH_PASS is empty or still the example's value: set a long random password "
                         "(e.g. `openssl rand -hex 24`) in .env, and the same in Label Studio's model connection")
