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
