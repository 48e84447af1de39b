"""One log line for the journal: a `<N>` syslog priority prefix, which systemd strips and keeps.

Every daemon and command of the toolkit writes its diagnostics through here. Import-light (os
only): the launcher imports it on every restart. With tracing on, lines go to journald through
its native protocol instead, with TRACE_ID= and SPAN_ID= fields (`send_natively`).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # import cost: `typing` is ~6 ms, more than the launcher's whole start
if TYPE_CHECKING:
    from collections.abc import Callable

EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)  # syslog priorities


def connected_to_journal(fd: int = 2) -> bool:
    """Whether `fd` is the journal stream systemd gave this service ($JOURNAL_STREAM = dev:inode)."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def prefix(priority: int, fd: int = 2) -> str:
    """`<N>` when `fd` goes to the journal, else nothing (a terminal shows the text alone)."""
    return f"<{priority}>" if connected_to_journal(fd) else ""


def line(prog: str, message: str, priority: int = NOTICE, *, always_prefix: bool = False) -> str:
    """`PROG: message` as one line (newlines escaped), with the priority when it goes to the journal.
    `always_prefix`: for programs that only ever run under systemd (the launcher), skip the check."""
    head = f"<{priority}>" if always_prefix else prefix(priority)
    return f"{head}{prog}: " + message.replace("\n", "\\n") + "\n"


def log(prog: str, message: str, priority: int = NOTICE, *, always_prefix: bool = False) -> None:
    """`line()` straight to fd 2: safe in signal handlers, where sys.stderr may be mid-write.
    After send_natively() and when fd 2 is the journal: a native entry with the extra fields."""
    if _native is not None and (always_prefix or connected_to_journal()):
        identifier, fields = _native
        if send_line(identifier, f"{prog}: {message}", priority, fields()):
            return
    os.write(2, line(prog, message, priority, always_prefix=always_prefix).encode("utf-8", "surrogateescape"))


# -- the native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): fields a stream line cannot carry ------

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_native: tuple[str, Callable[[], dict[str, str]]] | None = None  # (SYSLOG_IDENTIFIER, extra fields)
_socket = None


def send_natively(identifier: str, fields: Callable[[], dict[str, str]]) -> None:
    """From now on `log()` sends its lines to journald as datagrams with `fields()` added (tracing:
    TRACE_ID=, SPAN_ID=) and SYSLOG_IDENTIFIER=`identifier`, falling back to stderr if that fails."""
    global _native
    _native = (identifier, fields)


def encode_fields(fields: dict[str, str]) -> bytes:
    """One journal entry in the native format: KEY=value lines; a value with a newline as
    KEY, newline, its length (64-bit little-endian), the bytes, newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def send(fields: dict[str, str], socket_path: str = JOURNAL_SOCKET) -> bool:
    """Send one entry to journald without ever blocking: False when it cannot take it now (not
    running, its queue full)."""
    global _socket
    # import cost: ~5 ms (enum); only programs that send native entries (tracing on, agor-units log)
    import socket

    try:
        if _socket is None:
            _socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        _socket.sendto(encode_fields(fields), socket.MSG_DONTWAIT, socket_path)
    except OSError:
        return False
    return True


def send_line(identifier: str, message: str, priority: int, extra: dict[str, str]) -> bool:
    return send({"MESSAGE": message, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": identifier, **extra})
