"""Sessions that outlive the relay's process (`agor-relay serve --session-units`, as agor-relay.service
runs it): systemd, not the relay, is the parent of every session process.

- a terminal is a transient service, `agor-relay-pty-SESSION-PTY.service`, on the PTY the relay
  opened (TTYPath=, as `systemd-run --pty` does); systemd keeps its exit status (RemainAfterExit=)
  until the relay has read it;
- a sidecar is the instance `agor-relay-sidecar@SESSION` of the template pair `agor-units install`
  writes next to agor-relay.service (relay/units.py), agor-sidecar's units for the relay;
- the PTY masters are in the relay's fd store (FDSTORE=1, FDNAME=pty-SESSION-PTY): a master's last
  close would hang its terminal up, and the store hands them to the next relay process;
- the sessions themselves (ids, terminals, the replay buffers on a restart) are in
  $RUNTIME_DIRECTORY/sessions.json, which systemd keeps across a restart (RuntimeDirectoryPreserve=).

D-Bus goes through the core's `manager.Systemd` (pystemd), called from the event loop: each call is
a local round trip of well under a millisecond.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
from typing import Any

from agor_systemd.giveup import gave_up_variable
from agor_systemd.manager import PROPERTIES_IFACE, BusError, Systemd, runtime_directory, unit_path
from agor_systemd.notify import listen_fds, notify

SESSION_ID = re.compile(r"[0-9a-f]{32}")
PTY_ID = re.compile(r"[0-9a-f]{16}")
STATE_FILE = "sessions.json"
LISTEN_FD_NAME = "listen"  # the relay's listening socket in the fd store
JOB_WAIT_S = 10.0  # a transient unit's start job: systemd forks at once, this is the backstop
LISTEN_BACKLOG = 128  # connections waiting while the relay restarts (asyncio's default backlog, 100)


UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"


def pty_unit(session: str, pty: str) -> str:
    return f"agor-relay-pty-{session}-{pty}.service"


def pty_fd_name(session: str, pty: str) -> str:
    return f"pty-{session}-{pty}"


def parse_pty_fd_name(name: str) -> tuple[str, str] | None:
    """(session, pty) of a stored PTY master's FDNAME=, else None."""
    kind, _, rest = name.partition("-")
    session, _, pty = rest.partition("-")
    if kind == "pty" and SESSION_ID.fullmatch(session) and PTY_ID.fullmatch(pty):
        return session, pty
    return None


def exit_code(code: int, status: int) -> int | None:
    """ExecMainCode/ExecMainStatus as the relay reports exits (as subprocess does): the status of a
    process that exited, minus the signal of one that was killed; None while it has not ended."""
    if code == 0:
        return None
    return status if code == os.CLD_EXITED else -status


def passed_fds(environ: dict[str, str], pid: int) -> dict[str, int]:
    """The fds systemd passed this process (its fd store's), by name; unnamed ones as unknownN."""
    return {name or f"unknown{i}": fd for i, (name, fd) in enumerate(listen_fds(environ, pid))}


def bind_listener(bind: str | None, port: int) -> socket.socket:
    """A listening TCP socket on `bind` (None: every address, one IPv6 socket that takes IPv4 too,
    or IPv4 alone where the kernel has no IPv6)."""
    if bind is None:
        try:
            listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            address: tuple[str, int] = ("::", port)
        except OSError:
            listener, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port)
    else:
        family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
        listener, address = socket.socket(family, socket.SOCK_STREAM), (bind, port)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


def listening_as(listener: socket.socket, bind: str | None, port: int) -> bool:
    """Whether a stored listening socket is bound as the settings say (they may have changed)."""
    host, bound_port = listener.getsockname()[:2]
    wanted = {"::", "0.0.0.0"} if bind is None else {str(ipaddress.ip_address(bind))}
    return bound_port == port and host in wanted


def store_fd(fd: int, name: str) -> bool:
    """Hand `fd` to systemd's fd store under `name`; False outside a unit with a store."""
    return notify.with_fds([fd], "FDSTORE=1", f"FDNAME={name}")


def forget_fd(name: str) -> None:
    notify("FDSTOREREMOVE=1", f"FDNAME={name}")


class UnitHost:
    """The user manager, as the relay's sessions use it: one connection for the relay's life."""

    def __init__(self, system: bool = False) -> None:
        self.systemd = Systemd(system).__enter__()
        self.runtime_dir = runtime_directory()  # the manager's %t: where the sidecars' sockets are

    def _get(self, path: bytes, interface: str, prop: str) -> Any:
        """Properties.Get: the value itself (pystemd hands back the one-element body)."""
        reply = self.systemd.call(path, PROPERTIES_IFACE, b"Get", b"ss", [interface.encode(), prop.encode()])
        return reply[0] if isinstance(reply, list | tuple) and len(reply) == 1 else reply

    def _unit(self, name: str, interface: str, prop: str) -> Any:
        return self._get(unit_path(name), interface, prop)

    # -- terminals -----------------------------------------------------------------------------------

    async def start_terminal(
        self, name: str, argv: list[str], cwd: str | None, tty: str, environment: dict[str, str], description: str
    ) -> int:
        """Start `argv` on the terminal `tty` as the transient service `name`; its main pid (0 when
        it has ended already)."""
        properties: list[tuple[str, str, Any]] = [
            ("Description", "s", description),
            ("ExecStart", "a(sasb)", [(argv[0], argv, False)]),
            ("StandardInput", "s", "tty"),
            ("StandardOutput", "s", "tty"),
            ("StandardError", "s", "tty"),
            ("TTYPath", "s", tty),
            ("Environment", "as", [f"{k}={v}" for k, v in environment.items()]),
            # its exit status stays readable until the relay has read it and removes the unit:
            # active (exited) after a success, failed otherwise
            ("RemainAfterExit", "b", True),
            ("SendSIGHUP", "b", True),  # a stop is a terminal hanging up
        ]
        if cwd is not None:
            properties.append(("WorkingDirectory", "s", cwd))
        self.systemd.start_transient(name, properties)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOB_WAIT_S
        while self._unit(name, UNIT_IFACE, "Job")[0] != 0 and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return self.main_pid(name)

    def main_pid(self, name: str) -> int:
        """A unit's main pid; 0 when it has none (ended, or not loaded)."""
        try:
            return int(self._unit(name, SERVICE_IFACE, "MainPID"))
        except BusError:
            return 0

    def exit_status(self, name: str) -> int | None:
        try:
            return exit_code(
                int(self._unit(name, SERVICE_IFACE, "ExecMainCode")),
                int(self._unit(name, SERVICE_IFACE, "ExecMainStatus")),
            )
        except BusError:
            return None

    def kill(self, name: str, signal: int) -> None:
        """Manager.KillUnit: `signal` to every process of the unit."""
        try:
            self.systemd.manager("KillUnit", "ssi", name, "all", signal)
        except BusError:
            pass  # ended meanwhile

    def stop(self, *names: str) -> None:
        """Stop each unit, if loaded, and forget a failed one (a transient unit is gone then)."""
        for name in names:
            try:
                self.systemd.stop(name)
                self.systemd.reset_failed(name)
            except BusError:
                pass

    # -- sidecars ---------------------------------------------------------------------------------

    def start(self, name: str) -> None:
        self.systemd.start(name)

    def restart_sidecar(self, service: str) -> None:
        """What `agor-units restart` does for agor-sidecar: the given-up mark and the failed state
        cleared, a fresh start with a full budget."""
        self.systemd.unset_environment([gave_up_variable(service)])
        self.systemd.reset_failed(service)
        self.systemd.restart(service)

    def forget_sidecar(self, service: str, socket: str) -> None:
        self.stop(socket, service)
        try:
            self.systemd.unset_environment([gave_up_variable(service)])
        except BusError:
            pass

    # -- the relay's own unit ------------------------------------------------------------------------

    def stopping_for_restart(self) -> bool:
        """Whether the relay's own unit is being restarted (a job of type restart), not stopped."""
        try:
            path = self.systemd.manager("GetUnitByPID", "u", os.getpid())
            path = path[0] if isinstance(path, list | tuple) else path
            job_id, job_path = self._get(path.encode(), UNIT_IFACE, "Job")
            if not job_id:
                return False
            job_type = self._get(job_path.encode(), "org.freedesktop.systemd1.Job", "JobType")
            return str(job_type) in ("restart", "try-restart", "reload-or-restart")
        except BusError:
            return False
