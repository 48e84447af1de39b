"""What a controller's session owns on the relay machine: real PTYs and a supervised sidecar.

The sidecar runs under the toolkit's launcher *program* (agor-sidecar.service's ExecStart=, started
here as a subprocess: same Landlock sandbox, readiness and journal lines), which bridges a unix
socket to the sidecar's stdin and stdout (docs/socket.md); the relay is that socket's one client.
When the launcher ends, the relay restarts it on [restart]'s schedule and gives up after its
attempts, as systemd does for agor-sidecar.service.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agor_systemd
from agor_systemd import journal
from agor_systemd.manager import BusError
from agor_systemd.relay.host import UnitHost, forget_fd, pty_fd_name, pty_unit, store_fd
from agor_systemd.relay.protocol import Outbound, sidecar_restart_delay_s
from agor_systemd.relay.units import relay_sidecar_instance, relay_sidecar_socket_path

Emit = Callable[[Outbound], None]
READ_CHUNK = 64 * 1024
PENDING_LIMIT_BYTES = 4 * 1024 * 1024  # controller input held while the sidecar (re)starts
STOP_TIMEOUT_S = 10.0  # a sidecar's time to end after SIGTERM, as agor-sidecar.service's stop gives it
# the relay's own variables never reach what it starts (the token's credential least of all)
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
PRIVATE_ENV_PREFIXES = ("CREDENTIALS_DIRECTORY", "AGOR_RELAY_")


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV and not k.startswith(PRIVATE_ENV_PREFIXES)}
    return {**env, **(extra or {})}


def log(message: str, priority: int = journal.NOTICE) -> None:
    sys.stderr.write(journal.line("agor-relay", message, priority))
    sys.stderr.flush()


# -- PTYs ------------------------------------------------------------------------------------------------


def set_window_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_terminal() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ChildTerminal:
    """A terminal's program as the relay's own child (`agor-relay serve` by hand, the tests)."""

    def __init__(self, argv: list[str], cwd: str | None, slave: int) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=child_environment({"TERM": os.environ.get("TERM", "xterm-256color")}),
            start_new_session=True,
            preexec_fn=_take_controlling_terminal,
        )
        self.pid = self.process.pid

    async def exit_status(self) -> int | None:
        return self.process.wait()  # its pidfd said it has exited: no wait

    def hang_up(self) -> None:
        """pty_close: SIGHUP to its process group, as a terminal window closing does."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGHUP)

    def end(self) -> None:
        """The session ends: hang up, as a closing terminal window."""
        self.hang_up()

    def forget(self) -> None:
        """It has exited and its status is read: nothing is left to clean up."""


class UnitTerminal:
    """A terminal's program as a transient service (relay/host.py): it outlives the relay."""

    def __init__(self, host: UnitHost, session: str, pty: str, pid: int) -> None:
        self.host, self.unit, self.fd_name, self.pid = host, pty_unit(session, pty), pty_fd_name(session, pty), pid

    async def exit_status(self) -> int | None:
        """What systemd recorded: it reaps the program a moment after its pidfd says it has ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT_S
        while (status := self.host.exit_status(self.unit)) is None and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return status

    def hang_up(self) -> None:
        """pty_close: SIGHUP to every process of its unit (systemd knows them all, the relay is
        not their parent)."""
        self.host.kill(self.unit, signal.SIGHUP)

    def end(self) -> None:
        self.forget()  # the stop is the hangup: SendSIGHUP=, SIGTERM and SIGHUP to all of the unit

    def forget(self) -> None:
        self.host.stop(self.unit)  # what the program left running on the terminal, and the unit
        forget_fd(self.fd_name)


Terminal = ChildTerminal | UnitTerminal


def open_pty(cols: int, rows: int) -> tuple[int, int]:
    master, slave = os.openpty()
    try:
        set_window_size(master, cols, rows)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def check_program(argv: list[str], cwd: str | None) -> list[str]:
    """argv with its program found on $PATH, or ValueError naming what is missing."""
    if cwd is not None and not os.path.isdir(cwd):
        raise ValueError(f"no directory {cwd!r}")
    program = shutil.which(argv[0]) if "/" not in argv[0] else argv[0]
    if program is None or not os.access(program, os.X_OK) or os.path.isdir(program):
        raise ValueError(f"no program {argv[0]!r}")
    return [program, *argv[1:]]


def spawn_child_pty(pty_id: str, argv: list[str], cwd: str | None, cols: int, rows: int, emit: Emit) -> Pty:
    master, slave = open_pty(cols, rows)
    try:
        terminal = ChildTerminal(argv, cwd, slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return Pty(pty_id, master, terminal, emit)


async def spawn_unit_pty(
    host: UnitHost, session: str, pty_id: str, argv: list[str], cwd: str | None, cols: int, rows: int, emit: Emit
) -> Pty:
    argv = check_program(argv, cwd)
    master, slave = open_pty(cols, rows)
    try:
        pid = await host.start_terminal(
            pty_unit(session, pty_id),
            argv,
            cwd,
            os.ttyname(slave),
            {"TERM": os.environ.get("TERM", "xterm-256color")},
            f"agor relay session {session[:8]}: terminal {pty_id} ({argv[0]})",
        )
        store_fd(master, pty_fd_name(session, pty_id))
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    # The slave stays open here while the terminal lives: systemd's child opens the terminal some
    # time after the start job is done, and a master with no slave open reads EIO, the end.
    return Pty(pty_id, master, UnitTerminal(host, session, pty_id, pid), emit, slave)


def adopt_unit_pty(host: UnitHost, session: str, pty_id: str, master: int, emit: Emit) -> Pty:
    """A terminal of an earlier relay process: its master from the fd store, its program still
    running in its unit (or ended meanwhile: then its pty_exit follows at once)."""
    return Pty(pty_id, master, UnitTerminal(host, session, pty_id, host.main_pid(pty_unit(session, pty_id))), emit)


class Pty:
    """A program on a real pseudo-terminal; its output becomes pty_data frames."""

    def __init__(self, pty_id: str, master: int, terminal: Terminal, emit: Emit, slave: int | None = None) -> None:
        self.id, self.master, self.terminal, self.emit, self.slave = pty_id, master, terminal, emit, slave
        os.set_blocking(master, False)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending_input = b""
        self.exit_code: int | None = None
        self.ended = False
        self.ending: asyncio.Task[None] | None = None  # its exit status being read
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._readable)
        try:
            self.pidfd: int | None = os.pidfd_open(terminal.pid) if terminal.pid else None
        except ProcessLookupError:  # ended before we looked (an adopted terminal)
            self.pidfd = None
        if self.pidfd is None:
            loop.call_soon(self._exited)
        else:
            loop.add_reader(self.pidfd, self._exited)

    @property
    def alive(self) -> bool:
        return not self.ended

    def _readable(self) -> None:
        try:
            data = os.read(self.master, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: every slave end closed (the shell and its children are gone)
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.emit(Outbound("pty_data", self.id, self.decoder.decode(data)))

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        if self.pidfd is not None:
            loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
        self.ending = loop.create_task(self._end())

    async def _end(self) -> None:
        self.exit_code = await self.terminal.exit_status()
        loop = asyncio.get_running_loop()
        self.ended = True
        with contextlib.suppress(OSError):  # what the program wrote last
            while data := os.read(self.master, READ_CHUNK):
                self.emit(Outbound("pty_data", self.id, self.decoder.decode(data)))
        loop.remove_reader(self.master)
        loop.remove_writer(self.master)
        os.close(self.master)
        if self.slave is not None:
            os.close(self.slave)
        self.terminal.forget()
        self.emit(Outbound("pty_exit", self.id, {"exitCode": self.exit_code}))

    def hold(self, held: bool) -> None:
        """Stop reading its output for now (a full queue), or read again."""
        if not self.alive:
            return
        loop = asyncio.get_running_loop()
        if held:
            loop.remove_reader(self.master)
        else:
            loop.add_reader(self.master, self._readable)

    def write(self, data: str) -> None:
        if not self.alive:
            raise ValueError(f"PTY {self.id} has exited")
        self.pending_input += data.encode()
        self._flush_input()

    def _flush_input(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            written = os.write(self.master, self.pending_input) if self.pending_input else 0
        except BlockingIOError:
            written = 0
        except OSError:
            self.pending_input = b""
            return
        self.pending_input = self.pending_input[written:]
        if self.pending_input:
            loop.add_writer(self.master, self._flush_input)
        else:
            loop.remove_writer(self.master)

    def resize(self, cols: int, rows: int) -> None:
        if self.alive:
            set_window_size(self.master, cols, rows)

    def close(self) -> None:
        """pty_close: the terminal hangs up."""
        if self.alive and self.terminal.pid:
            self.terminal.hang_up()

    def end(self) -> None:
        """The session ends: the program is hung up, and (in a unit) stopped with what it left."""
        if self.alive:
            self.terminal.end()

    def suspend(self) -> None:
        """The relay restarts: stop reading; the master stays open in the fd store."""
        if self.alive:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.master)
            loop.remove_writer(self.master)
            if self.pidfd is not None:
                loop.remove_reader(self.pidfd)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.terminal.pid, "alive": self.alive, "exitCode": self.exit_code}


# -- the sidecar -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarSpec:
    """How a session's sidecar is started: the launcher's full argv (interpreter, launcher, its
    options, `--`, the sidecar command) and [restart]'s schedule."""

    launcher_argv: tuple[str, ...]
    base_s: float = 1.0
    cap_s: float = 30.0
    attempts: int = 5
    stability_window_s: float = 300.0


# systemd's socket-passing variables for the launcher (sd_listen_fds): the listening socket as fd 3,
# named as agor-sidecar.socket names it; LISTEN_PID must be the launcher's own pid, so a shell sets it
# right before it becomes the launcher (exec keeps the pid) and moves the socket to fd 3 (bash: dash
# takes only one-digit fds in redirections)
_PASS_SOCKET = 'export LISTEN_PID=$$; fd=$1; shift; exec "$@" 3<&"$fd" {fd}<&-'
FD_NAME = "sidecar"


class SidecarInput:
    """What a session's sidecar is sent: NDJSON lines to its bridge; while it (re)starts they wait
    for it, and so do lines it does not read yet, both bounded."""

    def __init__(self) -> None:
        self.state = "starting"  # starting, running, restarting, failed, stopped
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[bytes] = []  # input while the sidecar (re)starts
        self.pending_bytes = 0

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if self.writer is not None and self.state == "running":
            if self.writer.transport.get_write_buffer_size() + len(line) > PENDING_LIMIT_BYTES:
                raise ValueError("the sidecar is not reading its input, and input waiting for it is full")
            self.writer.write(line)
        elif self.state in ("starting", "restarting") and self.pending_bytes + len(line) <= PENDING_LIMIT_BYTES:
            self.pending.append(line)
            self.pending_bytes += len(line)
        else:
            raise ValueError(
                f"the sidecar is {self.state}" + (", and input waiting for it is full" * (self.state != "failed"))
            )

    def connected(self, writer: asyncio.StreamWriter) -> None:
        """The bridge takes input now: what waited goes first."""
        self.writer = writer
        writer.writelines(self.pending)
        self.pending, self.pending_bytes = [], 0


class Sidecar(SidecarInput):
    """One session's sidecar under the launcher program, restarted on the [restart] schedule."""

    def __init__(self, spec: SidecarSpec, emit: Emit) -> None:
        super().__init__()
        self.spec, self.emit = spec, emit
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self.output_closed = asyncio.Event()  # the bridge's EOF: the sidecar itself has ended
        self.directory = tempfile.mkdtemp(prefix="agor-relay-sidecar.")  # mode 0700
        self.task = asyncio.get_running_loop().create_task(self._supervise())

    async def _start(self) -> asyncio.StreamReader:
        path = os.path.join(self.directory, "sidecar.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(4)
            fd = listener.fileno()
            self.process = await asyncio.create_subprocess_exec(
                "/bin/bash",
                "-c",
                _PASS_SOCKET,
                "bash",
                str(fd),
                *self.spec.launcher_argv,
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                env=child_environment({"LISTEN_FDS": "1", "LISTEN_FDNAMES": FD_NAME}),
            )
        finally:
            listener.close()  # the launcher holds it now
        reader, writer = await asyncio.open_unix_connection(path, limit=16 * 1024 * 1024)
        self.connected(writer)
        return reader

    async def _supervise(self) -> None:
        while self.state != "stopped":
            started = time.monotonic()
            try:
                reader = await self._start()
                self.state = "running"
                await self._forward(reader)
                self.output_closed.set()
                code = await self.process.wait() if self.process else -1
            except OSError as e:
                code = -1
                log(f"cannot start the sidecar's launcher: {e}", journal.ERR)
            self.writer = None
            if self.state == "stopped":
                return
            if time.monotonic() - started >= self.spec.stability_window_s:
                self.restarts = 0  # it ran long enough: a fresh budget, as the launcher does
            self.restarts += 1
            delay = sidecar_restart_delay_s(self.restarts, self.spec.base_s, self.spec.cap_s, self.spec.attempts)
            self.state = "failed" if delay is None else "restarting"
            self.emit(
                Outbound("sidecar_exited", payload={"exitCode": code, "restart": self.restarts, "retryInS": delay})
            )
            if delay is None:
                log(f"the sidecar gave up after {self.spec.attempts} restarts; sidecar_restart starts it again")
                return
            await asyncio.sleep(delay)

    async def _forward(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not NDJSON (a stray print): the launcher logs the sidecar's lines anyway
            self.emit(Outbound("sidecar_message", payload=message))

    async def stop(self) -> None:
        """SIGTERM to the launcher, which stops the sidecar; once the sidecar's output has ended
        the launcher is killed if still there: after a stop it waits until it is alone in its
        unit's cgroup, which, started by the relay, holds the relay itself."""
        self.state = "stopped"
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            ended = [asyncio.ensure_future(self.output_closed.wait()), asyncio.ensure_future(process.wait())]
            await asyncio.wait(ended, timeout=STOP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            for waiter in ended:
                waiter.cancel()
            try:
                await asyncio.wait_for(process.wait(), 0.5)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.directory, "sidecar.sock"))
            os.rmdir(self.directory)

    async def restarted(self) -> Sidecar:
        """sidecar_restart: stopped, and started again with a fresh restart budget."""
        await self.stop()
        return Sidecar(self.spec, self.emit)

    async def suspend(self) -> None:
        """The relay restarts: a sidecar that is the relay's child cannot outlive it."""
        await self.stop()


CONNECT_WAIT_S = 10.0  # for the instance's socket to appear after its start job


class UnitSidecar(SidecarInput):
    """A session's sidecar as the instance agor-relay-sidecar@SESSION (relay/units.py): systemd
    supervises it with agor-sidecar.service's restart schedule and give-up, and it outlives the
    relay's process. The relay is its socket's one client: the bridge keeps what the sidecar writes
    while the relay is away (up to [socket] buffer_mib) and hands it over on the next connect."""

    def __init__(self, host: UnitHost, session: str, spec: SidecarSpec, emit: Emit) -> None:
        self.host, self.session, self.spec, self.emit = host, session, spec, emit
        super().__init__()
        self.service, self.socket = relay_sidecar_instance(session)
        self.path = relay_sidecar_socket_path(host.runtime_dir, session)
        self.task = asyncio.get_running_loop().create_task(self._supervise())

    async def _connect(self) -> asyncio.StreamReader:
        self.host.start(self.socket)  # listening already: nothing happens
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_WAIT_S
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=16 * 1024 * 1024)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.02)
        self.connected(writer)
        return reader

    async def _supervise(self) -> None:
        while self.state != "stopped":
            end: dict[str, Any] = {}
            try:
                reader = await self._connect()
                self.state = "running"
                end = await self._forward(reader)
            except (OSError, BusError) as e:
                log(f"cannot reach {self.service}: {e}", journal.ERR)
                end = {"state": "failed"}
            self.writer = None
            if self.state == "stopped":
                return
            restart = int(end.get("restart", 0)) or None
            delay = None
            if end.get("state") == "restarting" and restart is not None:
                delay = sidecar_restart_delay_s(restart, self.spec.base_s, self.spec.cap_s, self.spec.attempts)
            self.state = "failed" if end.get("state") == "failed" else "restarting"
            self.emit(
                Outbound(
                    "sidecar_exited",
                    payload={"exitCode": end.get("exit_code"), "restart": restart, "retryInS": delay},
                )
            )
            if self.state == "failed":
                log(f"{self.service} gave up; sidecar_restart starts it again")
                return
            # connecting at once is right: systemd keeps the connection in the socket's backlog
            # until its restart delay has passed and the next launcher takes it

    async def _forward(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        """Lines to the controller until EOF. The launcher's last line says how the sidecar ended
        (`{"type": "supervisor", "state": "restarting" | "failed", ...}`, docs/socket.md): returned,
        for sidecar_exited, not forwarded; {} when the sidecar was stopped or killed with its launcher."""
        end: dict[str, Any] = {}
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("type") == "supervisor":
                end = message
                continue
            self.emit(Outbound("sidecar_message", payload=message))
        return end

    async def _disconnect(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def stop(self) -> None:
        """The session ends: its sidecar units are stopped (the service's stop is the launcher's)."""
        self.state = "stopped"
        await self._disconnect()
        self.host.forget_sidecar(self.service, self.socket)

    async def restarted(self) -> UnitSidecar:
        self.state = "stopped"
        await self._disconnect()
        self.host.restart_sidecar(self.service)
        return UnitSidecar(self.host, self.session, self.spec, self.emit)

    async def suspend(self) -> None:
        """The relay restarts: only the connection ends; the bridge keeps the output meanwhile."""
        self.state = "stopped"
        await self._disconnect()


def launcher_program() -> list[str]:
    """How to start the launcher as its unit does: this interpreter, `-I -S`, the package's _launch.py."""
    return [sys.executable, "-I", "-S", str(Path(agor_systemd.__file__).parent / "_launch.py")]
