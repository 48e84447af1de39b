"""One root for every error a user is told about in one line.

Every program's `main` goes through `console.run_main`, which prints `prog: error: <message>` and
exits with the error's `exit_status`; anything else is a bug and keeps its traceback. Error classes
also derive from the builtin they refine (ValueError, LookupError, ...) where callers rely on it.
Import-light: the launcher's modules may raise these.
"""

from __future__ import annotations


class AgorError(Exception):
    """A problem worded as one line for the user, and the exit status it ends a program with."""

    exit_status = 1


class UsageError(AgorError):
    """The command line itself is wrong (sysexits' EX_USAGE is not used: 2 is what click and argparse use)."""

    exit_status = 2


class FileWriteError(AgorError, OSError):
    """A file could not be written; the message names the file, never a temporary one."""
