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
from agor_systemd.relay.protocol import Outbound, sidecar_restart_delay_s

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


class Pty:
    """A shell (or program) on a real pseudo-terminal; its output becomes pty_data frames."""

    def __init__(self, pty_id: str, argv: list[str], cwd: str | None, cols: int, rows: int, emit: Emit) -> None:
        self.id, self.emit = pty_id, emit
        master, slave = os.openpty()
        try:
            set_window_size(master, cols, rows)
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
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        os.set_blocking(master, False)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending_input = b""
        self.exit_code: int | None = None
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._readable)
        self.pidfd = os.pidfd_open(self.process.pid)
        loop.add_reader(self.pidfd, self._exited)

    @property
    def alive(self) -> bool:
        return self.exit_code is None

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
        loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.exit_code = self.process.wait()
        with contextlib.suppress(OSError):  # what the shell wrote last
            while data := os.read(self.master, READ_CHUNK):
                self.emit(Outbound("pty_data", self.id, self.decoder.decode(data)))
        loop.remove_reader(self.master)
        loop.remove_writer(self.master)
        os.close(self.master)
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
        """SIGHUP to its process group, as a terminal window closing does."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGHUP)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.process.pid, "alive": self.alive, "exitCode": self.exit_code}


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


class Sidecar:
    """One session's sidecar under the launcher program, restarted on the [restart] schedule."""

    def __init__(self, spec: SidecarSpec, emit: Emit) -> None:
        self.spec, self.emit = spec, emit
        self.state = "starting"  # starting, running, restarting, failed, stopped
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[bytes] = []  # input while the sidecar (re)starts
        self.pending_bytes = 0
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
        reader, self.writer = await asyncio.open_unix_connection(path, limit=16 * 1024 * 1024)
        self.writer.writelines(self.pending)
        self.pending, self.pending_bytes = [], 0
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

    def send(self, message: dict[str, Any]) -> None:
        """One NDJSON line to the sidecar; while it (re)starts, lines wait for it (bounded)."""
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if self.writer is not None and self.state == "running":
            self.writer.write(line)
        elif self.state in ("starting", "restarting") and self.pending_bytes + len(line) <= PENDING_LIMIT_BYTES:
            self.pending.append(line)
            self.pending_bytes += len(line)
        else:
            raise ValueError(
                f"the sidecar is {self.state}" + (", and input waiting for it is full" * (self.state != "failed"))
            )

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


def launcher_program() -> list[str]:
    """How to start the launcher as its unit does: this interpreter, `-I -S`, the package's _launch.py."""
    return [sys.executable, "-I", "-S", str(Path(agor_systemd.__file__).parent / "_launch.py")]
