"""The one error class for expected failures: input the user can fix (a config value, a file, a server).

The command line prints a `UserError` as one line and exits 2 (`t2po/cli.py`); every other exception is
an internal bug and keeps its traceback. Raise it with a message that names the problem and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error: one line for the user, exit status 2, no traceback."""
