"""A client of agor-sidecar.socket: the supervised sidecar's stdio as a line stream (docs/socket.md).

    from agor_systemd.api import connect

    with connect() as sidecar:               # $XDG_RUNTIME_DIR/agor/sidecar.sock
        sidecar.send(b'{"type":"query","prompt":"hi"}')
        for line in sidecar:                 # bytes, one line each, newline stripped; ends at EOF
            ...

EOF is the sidecar's exit, as agor knows it from a runner's stdout, after one line that says how it
ended: `{"type":"supervisor","state":"restarting",...}`, or `"failed"` after the last attempt (none
after a stop); connect again for the next sidecar.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from agor_systemd.errors import AgorError
from agor_systemd.sidecar.protocol import SIDECAR_SOCKET


class SocketUnavailable(AgorError, ConnectionError):
    """Nothing listens at the sidecar's socket."""


def socket_path(system: bool = False) -> Path:
    """Where agor-sidecar.socket listens (its ListenStream=%t/agor/sidecar.sock)."""
    if system:
        return Path("/run/agor/sidecar.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return Path(runtime) / "agor" / "sidecar.sock"


class LineStream:
    """One connection: send() whole lines, iterate over the sidecar's lines until EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")

    def send(self, line: bytes | str) -> None:
        data = line.encode() if isinstance(line, str) else line
        if b"\n" in data.rstrip(b"\n"):
            raise ValueError("send() takes one line; a newline inside would split it")
        self.sock.sendall(data.rstrip(b"\n") + b"\n")

    def readline(self) -> bytes | None:
        """The next line without its newline; None at EOF."""
        line = self._reader.readline()
        return line.rstrip(b"\n") if line else None

    def __iter__(self) -> Iterator[bytes]:
        while (line := self.readline()) is not None:
            yield line

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self._reader.close()
        self.sock.close()

    def __enter__(self) -> LineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    path: str | os.PathLike[str] | None = None, *, system: bool = False, timeout: float | None = None
) -> LineStream:
    """Connect to the sidecar's socket. While the sidecar restarts the connection is queued by
    systemd and served by the next sidecar; `timeout` bounds each read and write (None: no bound)."""
    where = Path(path) if path is not None else socket_path(system)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(where))
    except OSError as e:
        sock.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            scope = "" if system else " --user"
            raise SocketUnavailable(
                f"nothing listens at {where}: start it with `systemctl{scope} start {SIDECAR_SOCKET}` "
                "(or run `agor-units install --now`)"
            ) from None
        raise SocketUnavailable(f"cannot connect to {where}: {e.strerror}") from None
    return LineStream(sock)
