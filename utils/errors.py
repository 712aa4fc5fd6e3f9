"""One error policy for the whole project.

A ``UserError`` is a mistake the user can fix (an argument, a file, a missing server): its message
names the argument, the value and the fix, and the scripts print it as one line, ``error: ...``,
with exit code 2 and no traceback (``utils.cli.main_entry``). Library code raises; only the
entry wrapper ends the process. Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says how."""


class UsageError(UserError, ValueError):
    """An argument or a combination of arguments that cannot work."""


class TritonServerError(UserError, RuntimeError):
    """The server could not start or stopped: the message says why and how to fix it."""


class InvalidRequest(UserError, ValueError):
    """A generation request itself is wrong: a client error, reported as INVALID_ARG (its checks:
    utils/request.py)."""
