"""sd_notify(3) without libsystemd: READY=1, STATUS=, WATCHDOG=1 as datagrams to $NOTIFY_SOCKET, fds
for the fd store; and sd_listen_fds(3), the fds systemd passes back.

Shared by every Type=notify daemon of the toolkit (the launcher today). Import-light: the socket
is made with the C module `_socket` on first use (`socket` would import enum, ~2 ms per start).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # `typing` would cost the launcher ~6 ms; _socket itself is loaded on first use
if TYPE_CHECKING:
    import _socket


class Notifier:
    """Sends notify messages over one socket; does nothing when systemd gave no $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET")
        self._socket: _socket.socket | None = None

    def _connected(self) -> _socket.socket:
        if self._socket is None:
            import _socket  # import cost: `socket` would import enum (~2 ms per start)

            assert self._address
            address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
            self._socket = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
            self._socket.connect(address)
        return self._socket

    def __call__(self, *fields: str) -> None:
        if not self._address:
            return
        self._connected().sendall("\n".join(fields).encode("utf-8", "surrogateescape"))

    def with_fds(self, fds: list[int], *fields: str) -> bool:
        """Fields with file descriptors attached (FDSTORE=1: systemd keeps them across a restart);
        False when there is no $NOTIFY_SOCKET to send them to."""
        if not self._address:
            return False
        import _socket  # import cost: none, _connected loaded it
        import array  # import cost: ~1 ms, only in programs that store fds (the relay)

        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
        self._connected().sendmsg(["\n".join(fields).encode("utf-8", "surrogateescape")], ancillary)
        return True


notify = Notifier()


def watchdog_interval_s() -> float:
    """How often to send WATCHDOG=1 (half of $WATCHDOG_USEC), 0 when the watchdog is not ours."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    owner = os.environ.get("WATCHDOG_PID", str(os.getpid()))
    return int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and owner == str(os.getpid()) else 0.0


LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


def listen_fds(environ: dict[str, str], pid: int) -> list[tuple[str, int]]:
    """sd_listen_fds_with_names(3): (name, fd) of each fd systemd passed process `pid` — a socket
    unit's sockets, the fd store's fds — with "" where systemd gave no name; [] when the variables
    are not `pid`'s (LISTEN_PID: inherited from a parent)."""
    try:
        if int(environ.get("LISTEN_PID", "")) != pid:
            return []
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    return [(names[i] if i < len(names) else "", LISTEN_FDS_START + i) for i in range(count)]
