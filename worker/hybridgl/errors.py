"""The method's errors meant for users: their message says what is wrong and what to change.

Callers (the command line, the worker's jobs) catch ``UserError`` to show the message alone; any
other exception is a bug and keeps its traceback. Errors that were ``ValueError``s stay so too.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message is meant for the user."""


class SettingsError(UserError, ValueError):
    """A setting has a value the method cannot use."""


class InputError(UserError, ValueError):
    """An input (image, expression, proposals, index) cannot be used as given."""
