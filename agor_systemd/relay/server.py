"""agor-relay's server: websockets (asyncio) with the decisions of relay.protocol.

Where things happen, one method each (for logs today, tracing later): `Relay.admit` (every
connection attempt: cap, lockout, token), `Relay.auth_failed`, `Relay.serve_connection` (a
controller's connection from `ready` to close), `Relay.run_command` (every controller command).
"""

from __future__ import annotations

import asyncio
import http
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from agor_systemd import journal, tracing
from agor_systemd.notify import notify, watchdog_interval_s
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
from agor_systemd.relay.sessions import Pty, Sidecar, SidecarSpec, log
from agor_systemd.relay.tls import ReloadableContext, TLSError

MIB = 1024 * 1024
STATUS_EVERY_S = 5.0


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
    """A controller's PTYs and sidecar; they outlive its connection for `session_linger_s`."""

    def __init__(self, relay: Relay, session_id: str) -> None:
        self.relay, self.id = relay, session_id
        self.ptys: dict[str, Pty] = {}
        self.link: Link | None = None
        self.replay = ReplayBuffer(relay.settings.replay_bytes)
        self.linger: asyncio.TimerHandle | None = None
        self.ptys_held = False
        spec = relay.settings.sidecar
        self.sidecar = Sidecar(spec, self.emit) if spec is not None else None

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
            loop = asyncio.get_running_loop()
            self.linger = loop.call_later(self.relay.settings.session_linger_s, self.relay.end_session, self)

    async def close(self) -> None:
        for pty in self.ptys.values():
            pty.close()
        if self.sidecar is not None:
            await self.sidecar.stop()


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
            session = Session(self, secrets.token_urlsafe(18))
            self.sessions[session.id] = session
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
                self.create_pty(session, command)
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
                await session.sidecar.stop()
                session.sidecar = Sidecar(session.sidecar.spec, session.emit)
        except (OSError, ValueError) as e:
            if isinstance(e, FrameError):
                raise
            raise FrameError(f"{command.type}: {e}", command.id) from None

    def create_pty(self, session: Session, command: Command) -> None:
        shell = payload_field(command, "shell", str, self.settings.default_shell)
        args = payload_field(command, "args", list, [])
        if not all(isinstance(a, str) for a in args):
            raise FrameError("pty_create: payload.args must be strings", command.id)
        cwd = payload_field(command, "cwd", str, "") or None
        cols, rows = payload_field(command, "cols", int, 80), payload_field(command, "rows", int, 24)
        pty_id = secrets.token_hex(8)
        session.ptys[pty_id] = Pty(pty_id, [shell, *args], cwd, cols, rows, session.emit)
        session.emit(Outbound("pty_created", pty_id, {"commandId": command.id}))

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
        async with serve(
            self.serve_connection,
            settings.bind,
            settings.port,
            ssl=settings.tls.context if settings.tls is not None else None,
            process_request=self.admit,
            compression=None,  # 50 KiB less per connection, no compression bombs
            max_size=settings.max_frame_bytes,
            max_queue=4,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            server_header="agor-relay",
        ) as server:
            self.server = server
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
            server.close(code=1001, reason="relay stopping")
            await asyncio.gather(*(session.close() for session in self.sessions.values()), return_exceptions=True)
