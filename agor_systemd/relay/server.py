"""agor-relay's server: websockets (asyncio) with the decisions of relay.protocol.

Where things happen, one method each (for logs today, tracing later): `Relay.admit` (every
connection attempt: cap, lockout, token), `Relay.auth_failed`, `Relay.serve_connection` (a
controller's connection from `ready` to close), `Relay.run_command` (every controller command).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from agor_systemd import journal, tracing
from agor_systemd.files import atomic_write
from agor_systemd.notify import notify, watchdog_interval_s
from agor_systemd.relay.host import (
    LISTEN_FD_NAME,
    SESSION_ID,
    STATE_FILE,
    UnitHost,
    bind_listener,
    forget_fd,
    listening_as,
    parse_pty_fd_name,
    passed_fds,
    pty_fd_name,
    pty_unit,
    store_fd,
)
from agor_systemd.relay.protocol import (
    CLOSE_SESSION_TAKEN,
    CLOSE_TRY_AGAIN_LATER,
    SESSION_HEADER,
    Command,
    FailureLimiter,
    FrameError,
    Outbound,
    OutQueue,
    ReplayBuffer,
    bearer_token,
    error_frame,
    parse_command,
    payload_field,
    state_sync,
    token_matches,
)
from agor_systemd.relay.sessions import (
    Pty,
    Sidecar,
    SidecarSpec,
    UnitSidecar,
    adopt_unit_pty,
    log,
    spawn_child_pty,
    spawn_unit_pty,
)
from agor_systemd.relay.tls import ReloadableContext, TLSError

MIB = 1024 * 1024
STATUS_EVERY_S = 5.0
# a peer's close frame is awaited this long (websockets' default, 10 s, would hold a restart up)
CLOSE_TIMEOUT_S = 2.0


# keystrokes, resizes and pings: too many to be worth a span each
UNTRACED_COMMANDS = frozenset({"ping", "pty_write", "pty_resize"})


@dataclass(frozen=True)
class RelaySettings:
    token_digest: bytes
    tls: ReloadableContext | None  # None: plain ws (only with --insecure)
    port: int = 9750
    bind: str | None = None  # None: every address, as agor
    max_connections: int = 128
    max_frame_bytes: int = 4 * MIB
    ping_interval_s: float = 15.0
    ping_timeout_s: float = 15.0
    client_queue_bytes: int = 4 * MIB
    replay_bytes: int = 4 * MIB
    session_linger_s: float = 600.0
    lockout_failures: int = 10
    lockout_window_s: float = 300.0
    sidecar: SidecarSpec | None = None
    default_shell: str = "/bin/bash"
    # --session-units: terminals and sidecars as systemd units, sessions kept across a restart in
    # `state_directory` (relay/host.py); None: they are the relay's children and end with it
    host: UnitHost | None = None
    state_directory: str | None = None


class Link:
    """One controller connection's outgoing side: a bounded queue and the task that writes it."""

    def __init__(self, connection: ServerConnection, limit_bytes: int, session: Session) -> None:
        self.connection, self.session = connection, session
        self.queue = OutQueue(limit_bytes)
        self.wakeup = asyncio.Event()
        self.closing = False
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def send(self, frame: Outbound, replayed: bool = False) -> None:
        """Queue `frame`. Over the reader's limit, terminal output holds its PTYs back (their programs
        wait, as on a slow terminal); any other frame closes the connection with 1013 — agent messages
        are never dropped, the session keeps them for state_sync. A replayed frame is bounded by the
        replay buffer already and does not count against the limit."""
        if self.closing:
            self.session.replay.extend([frame])
            return
        if not self.queue.push(frame) and not replayed:
            if frame.type == "pty_data":
                self.session.hold_ptys(True)
            else:
                log(
                    f"{self.connection.remote_address[0]}: reader too slow ({self.queue.bytes} bytes queued), "
                    f"closed with {CLOSE_TRY_AGAIN_LATER}; session {self.session.id[:8]} keeps its output",
                    journal.WARNING,
                )
                self.close(CLOSE_TRY_AGAIN_LATER, "reader too slow; reconnect to resume the session")
        self.wakeup.set()

    def close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.session.replay.extend(self.queue.drain())
            self.writer.cancel()
            asyncio.get_running_loop().create_task(self.connection.close(code, reason))

    async def _write(self) -> None:
        while True:
            frame = self.queue.pop()
            if frame is None:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await self.connection.send(frame.text())
            if self.queue.bytes <= self.queue.limit_bytes // 2:
                self.session.hold_ptys(False)


class Session:
    """A controller's PTYs and sidecar; they outlive its connection for `session_linger_s` (and,
    with --session-units, the relay's process)."""

    def __init__(self, relay: Relay, session_id: str, with_sidecar: bool = True) -> None:
        self.relay, self.id = relay, session_id
        self.ptys: dict[str, Pty] = {}
        self.link: Link | None = None
        self.replay = ReplayBuffer(relay.settings.replay_bytes)
        self.linger: asyncio.TimerHandle | None = None
        self.ptys_held = False
        settings = relay.settings
        self.sidecar: Sidecar | UnitSidecar | None = None
        if settings.sidecar is not None and with_sidecar:
            if settings.host is not None:
                self.sidecar = UnitSidecar(settings.host, session_id, settings.sidecar, self.emit)
            else:
                self.sidecar = Sidecar(settings.sidecar, self.emit)

    def hold_ptys(self, held: bool) -> None:
        """Stop (or resume) reading the PTYs while the controller's queue is full."""
        if held != self.ptys_held:
            self.ptys_held = held
            for pty in self.ptys.values():
                pty.hold(held)

    def emit(self, frame: Outbound) -> None:
        if self.link is not None:
            self.link.send(frame)
        else:
            self.replay.extend([frame])

    def attach(self, link: Link, resumed: bool) -> None:
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        if self.link is not None:  # last connection wins, as in Tailscale's DERP
            self.link.close(CLOSE_SESSION_TAKEN, "session resumed by another connection")
        self.link = link
        link.send(Outbound("ready", payload={"session": self.id, "resumed": resumed}))
        if resumed:
            frames, lost = self.replay.take()
            ptys = [pty.describe() for pty in self.ptys.values()]
            sidecar = self.sidecar.state if self.sidecar is not None else "none"
            link.send(state_sync(self.id, ptys, sidecar, len(frames), lost))
            for frame in frames:
                link.send(frame, replayed=True)

    def detach(self, link: Link) -> None:
        link.close(1000, "")
        if self.link is link:
            self.link = None
            self.hold_ptys(False)  # while detached their output goes to the replay buffer
            self.start_linger()

    def start_linger(self) -> None:
        loop = asyncio.get_running_loop()
        self.linger = loop.call_later(self.relay.settings.session_linger_s, self.relay.end_session, self)

    async def close(self) -> None:
        for pty in self.ptys.values():
            pty.end()
        if self.sidecar is not None:
            await self.sidecar.stop()

    async def suspend(self) -> None:
        """The relay restarts: everything stays as it is, only the relay lets go of it."""
        if self.linger is not None:
            self.linger.cancel()
        for pty in self.ptys.values():
            pty.suspend()
        if self.sidecar is not None:
            await self.sidecar.suspend()

    def saved(self, with_replay: bool) -> dict[str, Any]:
        """What the next relay process needs to take this session over (relay/host.py)."""
        state: dict[str, Any] = {
            "id": self.id,
            "ptys": [pty.id for pty in self.ptys.values() if pty.alive],
            "sidecar": self.sidecar is not None,
        }
        if with_replay:
            frames, lost = self.replay.take()
            state["replay"] = [[f.type, f.session_id, f.payload] for f in frames]
            state["lost"] = lost
        return state


class Relay:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.limiter = FailureLimiter(settings.lockout_failures, settings.lockout_window_s)
        self.sessions: dict[str, Session] = {}
        self.connections: set[ServerConnection] = set()
        self.admitted: dict[ServerConnection, tuple[Session, bool]] = {}
        self.server: Server | None = None
        self.stopped = asyncio.Event()

    # -- admission: before the WebSocket upgrade ------------------------------------------------------

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Every connection attempt: the cap, the IP's lockout, the token; an HTTP refusal or None."""
        ip = str(connection.remote_address[0])
        with tracing.span("relay.admit", ip=ip) as span:  # no await inside: the span stack stays whole
            response = self._admit(connection, request, ip)
            span.set(**{"http.status": response.status_code if response is not None else 101})
            return response

    def _admit(self, connection: ServerConnection, request: Request, ip: str) -> Response | None:
        now = time.monotonic()
        if len(self.connections) >= self.settings.max_connections:
            log(f"{ip}: refused, {len(self.connections)} connections is the cap", journal.WARNING)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        locked_s = self.limiter.locked_for(ip, now)
        if locked_s > 0:
            response = connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "Too many failed attempts\n")
            response.headers["Retry-After"] = str(int(locked_s) + 1)
            return response
        if not token_matches(bearer_token(request.headers.get("Authorization")), self.settings.token_digest):
            self.limiter.failed(ip, now)
            self.auth_failed(ip, "no token" if "Authorization" not in request.headers else "wrong token")
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "Invalid token\n")
        wanted = request.headers.get(SESSION_HEADER) or parse_qs(urlsplit(request.path).query).get("session", [""])[0]
        session = self.sessions.get(wanted) if wanted else None
        resumed = session is not None
        if session is None:
            session = Session(self, secrets.token_hex(16))
            self.sessions[session.id] = session
            self.save_sessions()
        self.admitted[connection] = (session, resumed)
        self.connections.add(connection)
        asyncio.get_running_loop().create_task(self._forget(connection))
        return None

    async def _forget(self, connection: ServerConnection) -> None:
        await connection.wait_closed()
        self.connections.discard(connection)
        self.admitted.pop(connection, None)

    def auth_failed(self, ip: str, reason: str) -> None:
        locked = self.limiter.locked_for(ip, time.monotonic()) > 0
        log(f"{ip}: {reason}" + ("; locked out" if locked else ""), journal.WARNING)
        tracing.current().fail(f"{reason}" + ("; locked out" if locked else ""))

    # -- a controller's connection -------------------------------------------------------------------

    async def serve_connection(self, connection: ServerConnection) -> None:
        session, resumed = self.admitted.pop(connection)
        link = Link(connection, self.settings.client_queue_bytes, session)
        session.attach(link, resumed)
        log(f"{connection.remote_address[0]}: session {session.id[:8]} {'resumed' if resumed else 'started'}")
        # spans across awaits are ended by hand, with explicit parents: tracing's stack is per process
        span = tracing.span("relay.connection", ip=str(connection.remote_address[0]), session=session.id[:8])
        span.set(resumed=resumed)
        try:
            async for message in connection:
                try:
                    await self.traced_command(session, parse_command(message), span.traceparent)
                except FrameError as e:
                    link.send(error_frame(str(e), e.command_id))
        except ConnectionClosed:
            pass
        finally:
            session.detach(link)
            span.end()

    async def traced_command(self, session: Session, command: Command, connection: str | None) -> None:
        if command.type in UNTRACED_COMMANDS:
            await self.run_command(session, command)
            return
        span = tracing.span("relay.command", parent=connection, type=command.type, session=session.id[:8])
        try:
            await self.run_command(session, command)
        except FrameError as e:
            span.fail(str(e))
            raise
        finally:
            span.end()

    async def run_command(self, session: Session, command: Command) -> None:
        """Every controller command; a problem becomes an `error` frame naming the command."""
        emit = session.emit
        try:
            if command.type == "ping":
                emit(Outbound("pong"))
            elif command.type == "pty_create":
                await self.create_pty(session, command)
            elif command.type in ("pty_write", "pty_resize", "pty_close"):
                pty = session.ptys.get(payload_field(command, "id", str))
                if pty is None:
                    raise FrameError(f"{command.type}: no PTY {command.payload.get('id')!r}", command.id)
                if command.type == "pty_write":
                    pty.write(payload_field(command, "data", str))
                elif command.type == "pty_resize":
                    pty.resize(payload_field(command, "cols", int), payload_field(command, "rows", int))
                else:
                    pty.close()
            elif command.type in ("agent_query", "agent_stop"):
                self.to_sidecar(session, command)
            elif command.type == "sidecar_restart":
                if session.sidecar is None:
                    raise FrameError("this relay runs no sidecar", command.id)
                session.sidecar = await session.sidecar.restarted()
        except (OSError, ValueError) as e:
            if isinstance(e, FrameError):
                raise
            raise FrameError(f"{command.type}: {e}", command.id) from None

    async def create_pty(self, session: Session, command: Command) -> None:
        shell = payload_field(command, "shell", str, self.settings.default_shell)
        args = payload_field(command, "args", list, [])
        if not all(isinstance(a, str) for a in args):
            raise FrameError("pty_create: payload.args must be strings", command.id)
        cwd = payload_field(command, "cwd", str, "") or None
        cols, rows = payload_field(command, "cols", int, 80), payload_field(command, "rows", int, 24)
        pty_id = secrets.token_hex(8)
        host = self.settings.host
        if host is not None:
            pty = await spawn_unit_pty(host, session.id, pty_id, [shell, *args], cwd, cols, rows, session.emit)
        else:
            pty = spawn_child_pty(pty_id, [shell, *args], cwd, cols, rows, session.emit)
        session.ptys[pty_id] = pty
        session.emit(Outbound("pty_created", pty_id, {"commandId": command.id}))
        self.save_sessions()

    def to_sidecar(self, session: Session, command: Command) -> None:
        if session.sidecar is None:
            raise FrameError("this relay runs no sidecar", command.id)
        if command.type == "agent_query":
            options = command.payload if isinstance(command.payload, dict) else {}
            session.sidecar.send({**options, "type": "query"})
        else:
            session.sidecar.send({"type": "stop", "sessionId": payload_field(command, "sessionId", str)})

    def end_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            log(f"session {session.id[:8]} ended: no controller for {self.settings.session_linger_s:g} s")
            asyncio.get_running_loop().create_task(session.close())
            self.save_sessions()

    # -- sessions across a restart (--session-units) ------------------------------------------------

    def state_path(self) -> str | None:
        directory = self.settings.state_directory
        return os.path.join(directory, STATE_FILE) if self.settings.host is not None and directory else None

    def save_sessions(self, with_replay: bool = False) -> None:
        """The sessions' ids and terminals, written at each change (a crash keeps them too); on a
        restart also what each replay buffer holds."""
        path = self.state_path()
        if path is None:
            return
        state = {"sessions": [session.saved(with_replay) for session in self.sessions.values()]}
        try:
            atomic_write(Path(path), json.dumps(state, separators=(",", ":")), mode=0o600)
        except OSError as e:
            log(f"cannot save the sessions to {path}: {e}; a restart will end them", journal.ERR)

    def listening_socket(self, stored: dict[str, int]) -> socket.socket:
        """--session-units: the listening socket, kept in the fd store too, so that connections
        made while the relay restarts wait in its backlog instead of being refused; the stored one
        when it is bound as the settings say, else a new one (every address: one dual-stack socket)."""
        settings = self.settings
        fd = stored.pop(LISTEN_FD_NAME, None)
        if fd is not None:
            listener = socket.socket(fileno=fd)
            if listening_as(listener, settings.bind, settings.port):
                return listener
            listener.close()
            forget_fd(LISTEN_FD_NAME)
        listener = bind_listener(settings.bind, settings.port)
        store_fd(listener.fileno(), LISTEN_FD_NAME)
        return listener

    def restore_sessions(self, stored: dict[str, int]) -> None:
        """The sessions an earlier relay process left: their terminals' masters from the fd store,
        their programs and sidecars still running in their units."""
        host, path = self.settings.host, self.state_path()
        if host is None or path is None:
            return
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            entries = state["sessions"] if isinstance(state, dict) else []
        except FileNotFoundError:
            entries = []
        except (OSError, ValueError, KeyError) as e:
            log(f"{path}: unreadable ({e}); the earlier sessions are ended", journal.WARNING)
            entries = []
        for entry in entries:
            if not isinstance(entry, dict) or not SESSION_ID.fullmatch(str(entry.get("id"))):
                continue
            session = Session(self, entry["id"], with_sidecar=bool(entry.get("sidecar")))
            frames = [Outbound(t, sid, payload) for t, sid, payload in entry.get("replay", [])]
            session.replay.extend(frames)
            for kind, count in entry.get("lost", {}).items():
                session.replay.lost[kind] = session.replay.lost.get(kind, 0) + count
            for pty_id in entry.get("ptys", []):
                fd = stored.pop(pty_fd_name(session.id, pty_id), None)
                if fd is None:  # it ended while no relay ran (its pty_exit was sent before)
                    host.stop(pty_unit(session.id, pty_id))
                    continue
                session.ptys[pty_id] = adopt_unit_pty(host, session.id, pty_id, fd, session.emit)
            self.sessions[session.id] = session
            session.start_linger()
        for name, fd in stored.items():  # not in any session: nothing will read it again
            os.close(fd)
            forget_fd(name)
            if (ids := parse_pty_fd_name(name)) is not None:
                host.stop(pty_unit(*ids))
        if self.sessions:
            live = sum(len(s.ptys) for s in self.sessions.values())
            log(f"took over {len(self.sessions)} sessions ({live} terminals) from the previous relay process")

    # -- the daemon ------------------------------------------------------------------------------------

    def status(self) -> str:
        attached = sum(1 for s in self.sessions.values() if s.link is not None)
        return f"STATUS={len(self.connections)} clients, {len(self.sessions)} sessions ({attached} attached)"

    def reload_certificate(self) -> None:
        """SIGHUP: the certificate files again, for new connections; a bad pair keeps the old one."""
        if self.settings.tls is None:
            log("SIGHUP: no certificate to reload (--insecure)", journal.WARNING)
            return
        notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            log(f"SIGHUP: serving {self.settings.tls.reload()}")
        except TLSError as e:
            log(f"SIGHUP: {e}; still serving the previous certificate", journal.ERR)
        notify("READY=1", self.status())

    async def _heartbeat(self) -> None:
        ping_s = watchdog_interval_s()
        while True:
            notify(self.status(), *(["WATCHDOG=1"] if ping_s else []))
            await asyncio.sleep(min(ping_s or STATUS_EVERY_S, STATUS_EVERY_S))

    async def run(self, on_listening: Any = None) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        stored = passed_fds(dict(os.environ), os.getpid())  # the fd store's, after a restart
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        where: dict[str, Any] = {"host": settings.bind, "port": settings.port}
        if settings.host is not None:
            where = {"sock": self.listening_socket(stored)}
        async with serve(
            self.serve_connection,
            **where,
            ssl=settings.tls.context if settings.tls is not None else None,
            process_request=self.admit,
            compression=None,  # 50 KiB less per connection, no compression bombs
            max_size=settings.max_frame_bytes,
            max_queue=4,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            server_header="agor-relay",
        ) as server:
            self.server = server
            self.restore_sessions(stored)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stopped.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload_certificate)
            heartbeat = loop.create_task(self._heartbeat())
            scheme = "wss" if settings.tls is not None else "ws"
            ports = sorted({s.getsockname()[1] for s in server.sockets})
            log(f"listening on {scheme}://{settings.bind or '*'}:{','.join(map(str, ports))}")
            notify("READY=1", self.status())
            if on_listening is not None:
                on_listening(ports[0])
            await self.stopped.wait()
            notify("STOPPING=1")
            heartbeat.cancel()
            if settings.host is not None and settings.host.stopping_for_restart():
                await self.stop_for_restart(server)
            else:
                server.close(code=1001, reason="relay stopping")
                await asyncio.gather(*(session.close() for session in self.sessions.values()), return_exceptions=True)
                if (path := self.state_path()) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    async def stop_for_restart(self, server: Server) -> None:
        """systemd restarts the relay: controllers are told to come back (1012, service restart),
        sessions are left running and saved with what the controllers have not received yet."""
        for session in self.sessions.values():  # first: no output may reach a closing connection
            await session.suspend()
        server.close(code=1012, reason="relay restarting; reconnect with your session to resume it")
        await server.wait_closed()  # what each connection had queued is in its session's replay now
        self.save_sessions(with_replay=True)
        log(f"restarting: {len(self.sessions)} sessions kept for the next relay process")
