"""The one way every program of the toolkit ends: `run_main`.

An AgorError (or an OSError: a file or socket the user named) becomes one line,
`PROG: error: <message>` — with a journal priority when stderr is the journal — and the error's
exit status; never a traceback. `at_exit` hooks run however the program ends: that is where
telemetry is flushed. Import-light (the launcher's `main` goes through here).
"""

from __future__ import annotations

import os
import sys

from agor_systemd import journal
from agor_systemd.errors import AgorError

TYPE_CHECKING = False  # import cost: `typing` is ~6 ms, more than the launcher's whole start
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn, TypeVar

    T = TypeVar("T")

_at_exit: list[Callable[[], None]] = []
failure: str | None = None  # the message of the one-line error the program ended with (telemetry reads it)


def at_exit(hook: Callable[[], None]) -> None:
    """Run `hook` when the program's `run_main` ends, error or not (e.g. flush spans)."""
    _at_exit.append(hook)


def os_error_text(error: OSError) -> str:
    return f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error.strerror or error)


def fail(prog: str, message: str, status: int = 1) -> NoReturn:
    global failure
    failure = message
    sys.stdout.flush()
    sys.stderr.write(journal.line(prog, f"error: {message}", journal.ERR))
    sys.stderr.flush()
    sys.exit(status)


def call(prog: str, function: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`function(...)`, with an AgorError or OSError turned into one line and its exit status."""
    try:
        return function(*args, **kwargs)
    except AgorError as e:
        fail(prog, str(e), e.exit_status)
    except OSError as e:
        fail(prog, os_error_text(e))


def run_main(prog: str, main: Callable[[], int | None], quick_exit: bool = False) -> NoReturn:
    """A program's entry point: its exit status, one-line errors, Ctrl-C as 130, the at_exit hooks.

    `quick_exit`: end without the interpreter's teardown, for short programs called often. An SQLite
    connection left open then keeps its committed WAL for the next opener instead of checkpointing
    it on close — an fsync'd copy that would cost `btmsg heartbeat` more than its own work."""
    try:
        status = call(prog, main)
    except KeyboardInterrupt:
        status = 130
    except SystemExit as e:  # call() exits with the error's status after printing it
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
        if not quick_exit:
            raise
    finally:
        for hook in _at_exit:
            hook()
    if quick_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    sys.exit(status or 0)
