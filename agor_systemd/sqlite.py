"""SQLite the way every tool of the toolkit opens agor's databases, and what its errors mean.

agor's databases are shared with a running agor: open them by URI (any path, never created by
accident) and classify an error into an outcome a user can act on.
"""

from __future__ import annotations

# import cost: the C module itself; the `sqlite3` package around it adds ~3 ms (datetime and its
# adapters, unused here) to every `btmsg heartbeat`. Its connect() and classes are the very same objects.
import _sqlite3 as sqlite3
import os

# primary result codes (sqlite3.h); Python exposes the extended code as sqlite_errorcode
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 11, 13, 14
_SQLITE_AUTH, _SQLITE_NOTADB = 23, 26


# what urllib.parse.quote leaves as it is; without urllib, whose import (~3 ms) btmsg heartbeat would pay
_URI_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/")


# exit statuses of an SQLite outcome (sysexits.h), the same in every tool of the toolkit
EXIT_DATAERR = 65  # not an SQLite database, empty file, corrupt, a directory
EXIT_SOFTWARE = 70  # an SQLite error the toolkit does not know (a bug, report it)
EXIT_IOERR = 74  # I/O error or disk full
EXIT_TEMPFAIL = 75  # busy: other connections held the locks through every wait
EXIT_NOPERM = 77  # the file (or its directory) cannot be read or written by this user

# classify()'s outcome -> exit status
OUTCOME_EXIT = {
    "busy": EXIT_TEMPFAIL,
    "not-a-database": EXIT_DATAERR,
    "corrupt": EXIT_DATAERR,
    "disk-full": EXIT_IOERR,
    "io-error": EXIT_IOERR,
    "permission-denied": EXIT_NOPERM,
    "error": EXIT_SOFTWARE,
}


def sqlite_uri(path: str, query: str = "mode=rw") -> str:
    """An SQLite URI for any path (spaces, %, ?, #, newlines, any bytes); by default read-write, never create."""
    encoded = "".join(chr(b) if b in _URI_SAFE else f"%{b:02X}" for b in os.fsencode(os.path.abspath(path)))
    return "file:" + encoded + "?" + query


def classify(error: sqlite3.Error) -> tuple[str, str]:
    """(outcome, reason) for an SQLite error."""
    code = getattr(error, "sqlite_errorcode", None)
    name = getattr(error, "sqlite_errorname", None) or "SQLITE_ERROR"
    text = str(error).strip().splitlines()[0] if str(error).strip() else name
    reason = f"{text} ({name})"
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return "busy", reason
    if primary == _SQLITE_NOTADB:
        return "not-a-database", reason
    if primary == _SQLITE_CORRUPT:
        return "corrupt", reason
    if primary == _SQLITE_FULL:
        return "disk-full", reason
    if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN):
        return "io-error", reason
    if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_AUTH):
        return "permission-denied", reason
    return "error", reason
