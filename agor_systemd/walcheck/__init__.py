"""agor-walcheck: checkpoint and truncate the WAL of agor's SQLite databases, and say what happened.

agor runs ``PRAGMA wal_checkpoint(TRUNCATE)`` every 5 minutes from a background task and ignores
the result, so a checkpoint that a reader blocks goes unnoticed and the WAL keeps growing. This
module does the same checkpoint from a systemd timer (``walcheck_units.py``) and makes every
outcome visible: one line per database (in the journal when run by the timer), ``--json`` on
request, and an exit status ``systemctl --user status agor-walcheck`` shows.

Safety: nothing here can lose a committed transaction or corrupt a database. Only SQLite itself
writes the database, with its default durability (``synchronous=FULL``); the checkpoint is SQLite's
own crash-safe operation (a kill at any point leaves the WAL as the source of truth). This module
never creates, deletes, renames or copies a database, WAL or shm file, and never opens a file
SQLite could damage: a missing path is not created (``mode=rw``), and a zero-byte database is not
opened at all, because SQLite deletes the WAL next to an empty database file when it opens it.
The database file is opened only through SQLite, never with ``open()``: closing a plain
descriptor of it would drop the POSIX locks of every SQLite connection the calling process holds
on it, and another process's last close would then delete the WAL under them.

Library use::

    from agor_systemd.walcheck import checkpoint
    result = checkpoint("/home/me/.local/share/agor/btmsg.db", busy_timeout_s=1)
    result.outcome, result.as_dict()
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TextIO

from agor_systemd import journal, tracing
from agor_systemd.config import WalcheckConfig, expand_home
from agor_systemd.console import run_main
from agor_systemd.sqlite import (
    EXIT_DATAERR,
    EXIT_IOERR,
    EXIT_NOPERM,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    OUTCOME_EXIT,
    classify,
    sqlite_uri,
)
from agor_systemd.usage import ArgumentParser

PROG = "agor-walcheck"

# Exit statuses (sysexits.h where one fits). With several databases the most severe one wins,
# in this order: 65, 74, 77, 70, 75, then 0.
# 65, 70, 74, 75, 77: the SQLite outcomes' (agor_systemd.sqlite); 75 here: readers or writers held
# the database through every retry
EXIT_OK = 0  # every database checkpointed and truncated, or skipped (missing, not in WAL mode)
EXIT_USAGE = 2  # bad command line
SEVERITY = (EXIT_DATAERR, EXIT_IOERR, EXIT_NOPERM, EXIT_SOFTWARE, EXIT_TEMPFAIL)

# outcome -> exit status
OUTCOMES = {
    "truncated": EXIT_OK,  # checkpointed, WAL truncated to 0 bytes
    "missing": EXIT_OK,  # no such file: skipped (agor has not created it yet)
    "not-wal": EXIT_OK,  # rollback-journal mode: no WAL to checkpoint; --ensure-wal switches
    **OUTCOME_EXIT,
}

# The busy timeout is the most one run waits for locks on one database, over all its attempts.
# TRUNCATE waits holding the write lock, so this also bounds how long agor's writers are held up
# (a writer without busy timeout, as on sessions.db, fails at once meanwhile). agor's own
# checkpoint holds them for up to its 5 s busy timeout: never more than that.
BUSY_TIMEOUT_S = 1.0
MAX_BUSY_TIMEOUT_S = 5.0

# Retries after a busy attempt, no locks held while waiting: one run takes at most
# busy_timeout + sum(RETRY_DELAYS_S) per database, plus the copying.
RETRY_DELAYS_S = (0.25, 0.5, 1.0)


@dataclass
class CheckpointResult:
    """What happened to one database. `busy`/`log_frames`/`checkpointed_frames` are the row of
    the last ``PRAGMA wal_checkpoint(TRUNCATE)`` (None when it did not run); WAL sizes in bytes
    (None when not looked at)."""

    path: str
    outcome: str
    message: str
    busy: int | None = None
    log_frames: int | None = None
    checkpointed_frames: int | None = None
    wal_bytes_before: int | None = None
    wal_bytes_after: int | None = None
    passive: list[int] | None = None  # the PASSIVE pre-pass row of the last attempt
    truncate_s: float = 0.0  # time in TRUNCATE, all attempts: the most agor's writers were held up
    journal_mode: str | None = None
    switched_to_wal: bool = False
    attempts: int = 0
    seconds: float = 0.0

    @property
    def exit_status(self) -> int:
        return OUTCOMES[self.outcome]

    @property
    def ok(self) -> bool:
        return self.exit_status == EXIT_OK

    def as_dict(self) -> dict:
        return asdict(self) | {"exit_status": self.exit_status}

    def line(self) -> str:
        """The one line for the journal / terminal."""
        return f"{self.path}: {self.outcome}: {self.message}"


def size_text(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _wal_size(path: str) -> int:
    try:
        return os.stat(path + "-wal").st_size
    except FileNotFoundError:
        return 0


_UNTOUCHED = "file left untouched"


def _precheck(path: str) -> CheckpointResult | None:
    """Look at the file before a read-write SQLite connection may touch it: a result for what
    must not be opened, else None.

    The file itself is never opened outside SQLite: POSIX locks belong to the process, so closing
    any descriptor of the database file would drop the locks of every connection the calling
    process holds on it (another process's last close would then delete the WAL under them).
    SQLite's own VFS keeps such a descriptor open until this process's last lock on the file is
    released, so the header is read through SQLite.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return CheckpointResult(path, "missing", "no such file; skipped")
    except NotADirectoryError:
        return CheckpointResult(path, "missing", "a parent of the path is not a directory; skipped")
    except PermissionError:
        return CheckpointResult(path, "permission-denied", "cannot look up the file (permission denied)")
    except OSError as e:
        return CheckpointResult(path, "io-error", f"cannot stat the file: {e.strerror}")
    if stat.S_ISDIR(st.st_mode):
        return CheckpointResult(path, "not-a-database", "is a directory, not an SQLite database")
    if not stat.S_ISREG(st.st_mode):
        return CheckpointResult(path, "not-a-database", f"not a regular file; {_UNTOUCHED}")
    if st.st_size == 0:
        # SQLite would treat it as a new, empty database and delete a WAL lying next to it
        wal = _wal_size(path)
        extra = f"; its WAL ({size_text(wal)}) left alone" if os.path.exists(path + "-wal") else ""
        return CheckpointResult(
            path,
            "not-a-database",
            f"empty file (0 bytes), not an SQLite database; {_UNTOUCHED}{extra}",
            wal_bytes_before=wal,
            wal_bytes_after=wal,
        )
    if not os.access(path, os.R_OK):
        return CheckpointResult(path, "permission-denied", f"cannot read the file (permission denied); {_UNTOUCHED}")
    refused = _header_refused(path)
    if refused is not None:
        return CheckpointResult(
            path,
            "not-a-database",
            f"no valid SQLite header ({st.st_size} bytes), not an SQLite database: {refused}; {_UNTOUCHED}",
        )
    if not os.access(path, os.W_OK):
        return CheckpointResult(path, "permission-denied", f"read-only for this user: cannot checkpoint; {_UNTOUCHED}")
    return None


def _header_refused(path: str) -> str | None:
    """SQLite's reason when the 100-byte header (magic, page size, format) is not a database's.

    ``immutable=1`` reads the main file only: no locks, no journal or WAL looked at, nothing
    created, so a non-database with a ``-wal`` beside it is not "recovered" into. Any other error
    (e.g. SQLITE_CORRUPT: the main file alone is behind its WAL after an interrupted checkpoint)
    means the header passed; the read-write connection, which sees the WAL, judges the rest.
    """
    conn = None
    try:
        conn = sqlite3.connect(sqlite_uri(path, "mode=ro&immutable=1"), uri=True)
        conn.execute("PRAGMA schema_version").fetchone()  # reads page 1 and checks its header
    except sqlite3.Error as e:
        outcome, reason = classify(e)
        return reason if outcome == "not-a-database" else None
    finally:
        if conn is not None:
            conn.close()
    return None


def _enable_wal(conn: sqlite3.Connection) -> None:
    # outside a transaction, as SQLite requires; a busy database raises here and is reported so
    conn.execute("PRAGMA journal_mode = WAL").fetchone()


def checkpoint(
    path: str | os.PathLike[str],
    busy_timeout_s: float = BUSY_TIMEOUT_S,
    *,
    ensure_wal: bool = False,
    retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckpointResult:
    """Checkpoint one database with ``PRAGMA wal_checkpoint(TRUNCATE)``; never raises for a
    database problem, the result says what happened.

    Each attempt first runs a PASSIVE checkpoint (copies what it can without the write lock and
    without waiting, so agor's writers are not held up by the bulk copy), then TRUNCATE, which
    takes the write lock and waits for readers to leave the WAL. The attempts share
    `busy_timeout_s` (0 to 5 s) equally: that is the most all of them together wait for locks,
    and so the most they hold up writers, apart from copying frames committed since the PASSIVE
    pass. A busy attempt is retried after each of `retry_delays_s` (no locks held while sleeping).
    """
    if not 0 <= busy_timeout_s <= MAX_BUSY_TIMEOUT_S:
        raise ValueError(f"busy_timeout_s must be between 0 and {MAX_BUSY_TIMEOUT_S:g}, got {busy_timeout_s:g}")
    path = os.fspath(path)
    if not path:
        raise ValueError("an empty database path")
    started = time.monotonic()
    # SQLite follows symbolic links: the WAL lives beside the target, so look there
    real = os.path.realpath(path)
    result = _precheck(real)
    if result is None:
        result = _checkpoint_open(real, busy_timeout_s, ensure_wal, retry_delays_s, sleep)
    result.path = path
    result.seconds = round(time.monotonic() - started, 4)
    result.truncate_s = round(result.truncate_s, 4)
    return result


def _checkpoint_open(
    path: str, busy_timeout_s: float, ensure_wal: bool, retry_delays_s: Sequence[float], sleep: Callable[[float], None]
) -> CheckpointResult:
    result = CheckpointResult(path, "error", "")
    attempt_timeout_s = busy_timeout_s / (1 + len(retry_delays_s))
    conn = None
    try:
        conn = sqlite3.connect(sqlite_uri(path), uri=True, timeout=attempt_timeout_s, isolation_level=None)
        # reading the schema validates the header and page 1 and recovers a hot WAL/journal
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
        result.journal_mode = mode
        if mode != "wal":
            if not ensure_wal:
                result.outcome = "not-wal"
                result.message = (
                    f"not in WAL mode (journal_mode={mode}): no WAL to checkpoint, "
                    "mode left as it is; --ensure-wal switches it"
                )
                return result
            _enable_wal(conn)
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
            if mode != "wal":
                result.outcome = "error"
                result.message = f"--ensure-wal: SQLite kept journal_mode={mode}"
                return result
            result.journal_mode, result.switched_to_wal = mode, True
        result.wal_bytes_before = _wal_size(path)
        delays = list(retry_delays_s)
        reason: str | None  # SQLite's words when the last attempt was busy before it could report frames
        while True:
            result.attempts += 1
            try:
                result.passive = list(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
                truncate_started = time.monotonic()
                try:
                    busy, log, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    result.truncate_s += time.monotonic() - truncate_started
                result.busy, result.log_frames, result.checkpointed_frames = busy, log, done
            except sqlite3.OperationalError as e:
                if classify(e)[0] != "busy":
                    raise
                busy, reason = 1, classify(e)[1]
            else:
                reason = None
            if not busy:
                break
            if not delays:
                break
            sleep(delays.pop(0))
        result.wal_bytes_after = _wal_size(path)
        before, after = size_text(result.wal_bytes_before), size_text(result.wal_bytes_after)
        switched = "switched to WAL mode (--ensure-wal); " if result.switched_to_wal else ""
        if busy:
            result.outcome = "busy"
            row = (
                f"busy={result.busy}, {result.log_frames} frames in the WAL, {result.checkpointed_frames} checkpointed"
                if result.busy is not None
                else reason
            )
            result.message = (
                f"{switched}readers or writers held the database through {result.attempts} attempts "
                f"({result.truncate_s:.2f} s in TRUNCATE, busy timeout {busy_timeout_s:g} s in all): "
                f"{row}; WAL {before} -> {after}; the next run tries again"
            )
        else:
            result.outcome = "truncated"
            frames = result.passive[2] if result.passive and result.passive[2] > 0 else 0
            result.message = (
                f"{switched}checkpointed {frames} frames, WAL {before} -> {after} "
                f"(TRUNCATE busy={result.busy} log={result.log_frames} "
                f"checkpointed={result.checkpointed_frames}; "
                f"{result.attempts} attempt{'s' if result.attempts > 1 else ''})"
            )
        return result
    except sqlite3.Error as e:
        outcome, reason = classify(e)
        result.outcome = outcome
        if outcome == "disk-full":
            result.message = f"disk full during the checkpoint: {reason}; the WAL still holds every commit"
        elif outcome == "io-error" and result.wal_bytes_before is not None:
            result.message = f"I/O error during the checkpoint: {reason}; the WAL still holds every commit"
        elif outcome in ("not-a-database", "corrupt"):
            result.message = f"{reason}; {_UNTOUCHED}"
        else:
            result.message = reason
        if result.wal_bytes_before is not None:
            result.wal_bytes_after = _wal_size(path)
        return result
    finally:
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


def default_databases(home: str | None = None) -> list[str]:
    home = home or os.path.expanduser("~")
    return [expand_home(d, home) for d in WalcheckConfig().databases]


def exit_status(results: Sequence[CheckpointResult]) -> int:
    statuses = {r.exit_status for r in results}
    return next((s for s in SEVERITY if s in statuses), EXIT_OK)


# -- command line ---------------------------------------------------------------------------------

RETRY_TEXT = ", ".join(f"{d:g}" for d in RETRY_DELAYS_S)
HELP = f"""\
For each database (default: ~/.local/share/agor/sessions.db and btmsg.db): run PRAGMA
wal_checkpoint(PASSIVE), then PRAGMA wal_checkpoint(TRUNCATE), and print one line with the
outcome, SQLite's result row (busy, frames in the WAL, frames checkpointed) and the WAL size
before and after. TRUNCATE holds agor's writers up while it waits for readers: all attempts on a
database together wait at most the busy timeout (default {BUSY_TIMEOUT_S:g} s; at most {MAX_BUSY_TIMEOUT_S:g} s, agor's
own checkpoint's bound).

outcomes and exit statuses (with several databases the first listed here that occurred wins):
  {EXIT_DATAERR}  not-a-database, corrupt   not SQLite, empty (0 bytes), a directory, malformed;
                                the file is left untouched
  {EXIT_IOERR}  disk-full, io-error        the checkpoint could not write; the WAL still holds
                                every commit, nothing is damaged
  {EXIT_NOPERM}  permission-denied          cannot read, or cannot write (read-only file/directory)
  {EXIT_SOFTWARE}  error                      an SQLite error this tool does not know
  {EXIT_TEMPFAIL}  busy                       readers or writers held the database through every
                                attempt ({1 + len(RETRY_DELAYS_S)} attempts, {RETRY_TEXT} s apart,
                                sharing the busy timeout); the next run tries again
   0  truncated                  checkpointed, WAL truncated to 0 bytes
   0  missing                    no such file: skipped with a notice
   0  not-wal                    not in WAL mode: reported, mode left alone (--ensure-wal)
   {EXIT_USAGE}  usage error
"""


def argument_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Checkpoint and truncate the WAL of agor's SQLite databases.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("databases", nargs="*", metavar="DB", help="database files (default: agor's two)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of lines")
    p.add_argument(
        "--ensure-wal", action="store_true", help="switch a database that is not in WAL mode to WAL, then checkpoint it"
    )
    p.add_argument(
        "--busy-timeout",
        type=float,
        default=BUSY_TIMEOUT_S,
        metavar="SECONDS",
        help="the most all attempts on one database wait for locks, and so hold agor's writers "
        f"up (default {BUSY_TIMEOUT_S:g}, at most {MAX_BUSY_TIMEOUT_S:g}: agor's own checkpoint's)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=len(RETRY_DELAYS_S),
        metavar="N",
        help=f"retries after a busy attempt, 0-{len(RETRY_DELAYS_S)} (default {len(RETRY_DELAYS_S)})",
    )
    return p


_LEVELS = {EXIT_OK: 6, EXIT_TEMPFAIL: 4}  # info, warning; errors are 3


def main(argv: Sequence[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    if not (0 <= args.busy_timeout <= MAX_BUSY_TIMEOUT_S):
        argument_parser().error(
            f"--busy-timeout must be between 0 and {MAX_BUSY_TIMEOUT_S:g} seconds, got {args.busy_timeout:g}"
        )
    if not (0 <= args.retries <= len(RETRY_DELAYS_S)):
        argument_parser().error(f"--retries must be between 0 and {len(RETRY_DELAYS_S)}, got {args.retries}")
    if "" in args.databases:
        argument_parser().error("an empty database path")
    databases = args.databases or default_databases()
    results = []
    for db in databases:
        with tracing.span("walcheck.checkpoint", database=db) as span:
            try:
                result = checkpoint(
                    db, args.busy_timeout, ensure_wal=args.ensure_wal, retry_delays_s=RETRY_DELAYS_S[: args.retries]
                )
            except Exception as e:
                result = CheckpointResult(db, "error", f"unexpected {type(e).__name__}: {e}".splitlines()[0])
            trace_result(span, result)
            results.append(result)
            if not args.json or not result.ok:
                report(result, sys.stdout if result.ok and not args.json else sys.stderr)
    status = exit_status(results)
    if args.json:
        sys.stdout.write(
            json.dumps({"exit_status": status, "databases": [r.as_dict() for r in results]}, indent=2) + "\n"
        )
    return status


def report(result: CheckpointResult, stream: TextIO) -> None:
    """One line for the database, with its priority when it goes to the journal (and, with
    tracing on, TRACE_ID= and SPAN_ID=: the native protocol)."""
    level = _LEVELS.get(result.exit_status, 3)
    priority = 5 if result.outcome != "truncated" and result.ok else level
    text = result.line() if stream is sys.stdout else f"{PROG}: {result.line()}"
    if tracing.enabled() and journal.connected_to_journal(stream.fileno()):
        stream.flush()
        if journal.send_line(PROG, text, priority, tracing.journal_fields()):
            return
    stream.write(journal.prefix(priority, stream.fileno()) + text.replace("\n", "\\n") + "\n")
    stream.flush()


def trace_result(span: tracing.Span | tracing.NoSpan, result: CheckpointResult) -> None:
    span.set(
        outcome=result.outcome,
        exit_status=result.exit_status,
        attempts=result.attempts,
        seconds=result.seconds,
        truncate_s=result.truncate_s,
        wal_bytes_before=result.wal_bytes_before if result.wal_bytes_before is not None else -1,
        wal_bytes_after=result.wal_bytes_after if result.wal_bytes_after is not None else -1,
    )
    if not result.ok:
        span.fail(f"{result.outcome}: {result.message}")


def traced_main() -> int:
    tracing.start(PROG)
    with tracing.span(PROG) as span:
        status = main()
        span.set(**{"exit.status": status})
        if status:
            span.fail(f"exit status {status}")
        return status


def run() -> None:
    """The agor-walcheck program (and `python -m agor_systemd.walcheck`)."""
    run_main(PROG, traced_main)
