"""One log line for the journal: a `<N>` syslog priority prefix, which systemd strips and keeps.

Every daemon and command of the toolkit writes its diagnostics through here. Import-light (os
only): the launcher imports it on every restart.
"""

from __future__ import annotations

import os

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
    """`line()` straight to fd 2: safe in signal handlers, where sys.stderr may be mid-write."""
    os.write(2, line(prog, message, priority, always_prefix=always_prefix).encode("utf-8", "surrogateescape"))
