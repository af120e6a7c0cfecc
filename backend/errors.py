"""The serving side's errors meant for users: their message says what is wrong and what to change.

Callers (the command line, the web process, the worker's jobs) catch ``UserError`` to show the
message alone; any other exception is a bug and keeps its traceback. The method has a base of its own
(``worker.hybridgl.errors.UserError``), since it imports nothing from here.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message is meant for the user."""


class ConfigError(UserError, ValueError):
    """A deployment setting (environment variable) has a value that cannot be used."""


class LabelStudioError(UserError):
    """Talking to Label Studio (or fetching an image) failed.

    ``transient`` is True when retrying later may help (timeouts, connection errors, 429, 5xx);
    ``unreachable`` is True when it was Label Studio itself (not an image host) that could not be reached.
    The message says what is wrong and what to change; it never contains a token.
    (Here rather than in backend.labelstudio: backend.imagefetch raises it too, and imports nothing
    from the API client.)
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
