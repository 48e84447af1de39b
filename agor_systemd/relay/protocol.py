"""agor's relay wire protocol and the relay's decisions, without I/O (Sans-I/O, like websockets' core).

Frames are JSON text. Controller → relay: ``{"id", "type", "payload"}``; relay → controller:
``{"type", "sessionId"?, "payload"?}`` (agor-facts §5.4). Everything here is a pure function of its
inputs (the clock is passed in), so the rules — what a frame means, who is locked out, what a slow
reader's queue keeps, what a reconnecting controller is replayed — are tested without sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from agor_systemd.errors import AgorError

DEFAULT_PORT = 9750  # agor's

# controller → relay
COMMANDS = (
    "ping",
    "pty_create",
    "pty_write",
    "pty_resize",
    "pty_close",
    "agent_query",
    "agent_stop",
    "sidecar_restart",
)
# relay → controller; state_sync is ours (agor's controller handles it, agor's relay never sends it)
EVENTS = (
    "ready",
    "pong",
    "pty_created",
    "pty_data",
    "pty_exit",
    "sidecar_message",
    "sidecar_exited",
    "error",
    "state_sync",
)

# the header a reconnecting controller names its session with (also accepted: ?session=ID)
SESSION_HEADER = "X-Agor-Session"

# WebSocket close codes
CLOSE_TRY_AGAIN_LATER = 1013  # a slow reader: reconnect, state_sync replays what it missed
CLOSE_SESSION_TAKEN = 4001  # another connection resumed this session


@dataclass(frozen=True)
class Command:
    """One controller frame: `id` is echoed in replies (pty_created's commandId, error's commandId)."""

    id: str | None
    type: str
    payload: Any


class FrameError(ValueError):
    """A frame the relay answers with an `error` frame (and keeps serving)."""

    def __init__(self, message: str, command_id: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id


def parse_command(text: str | bytes) -> Command:
    """A controller frame, or FrameError naming what is wrong with it."""
    if isinstance(text, bytes):
        raise FrameError("binary frames are not part of the protocol; send JSON text")
    try:
        data = json.loads(text)
    except ValueError:
        raise FrameError("not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("a frame must be a JSON object")
    command_id = data.get("id")
    if command_id is not None and not isinstance(command_id, str | int):
        raise FrameError("`id` must be a string or a number")
    command_id = None if command_id is None else str(command_id)
    kind = data.get("type")
    if not isinstance(kind, str):
        raise FrameError("`type` is missing", command_id)
    if kind not in COMMANDS:
        raise FrameError(f"unknown type {kind[:64]!r} (known: {', '.join(COMMANDS)})", command_id)
    return Command(command_id, kind, data.get("payload"))


def payload_field(command: Command, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """`command.payload[name]` of type `kind`; missing → `default` (None: required)."""
    payload = command.payload if isinstance(command.payload, dict) else {}
    value = payload.get(name, default)
    if value is None:
        raise FrameError(f"{command.type}: payload.{name} is missing", command.id)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FrameError(f"{command.type}: payload.{name} has the wrong type", command.id)
    return value


@dataclass
class Outbound:
    """One relay → controller frame, kept as data until it is sent (pty_data can be coalesced)."""

    type: str
    session_id: str | None = None
    payload: Any = None
    _text: str | None = field(default=None, compare=False, repr=False)  # encoded once

    def text(self) -> str:
        if self._text is None or self.type == "pty_data":  # coalescing changes pty_data's payload
            frame: dict[str, Any] = {"type": self.type}
            if self.session_id is not None:
                frame["sessionId"] = self.session_id
            if self.payload is not None:
                frame["payload"] = self.payload
            self._text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
        return self._text

    def size(self) -> int:
        """What the frame costs in a queue, close enough: its data for pty_data, else its text."""
        if self.type == "pty_data" and isinstance(self.payload, str):
            return len(self.payload) + 64
        return len(self.text())


def error_frame(message: str, command_id: str | None = None) -> Outbound:
    return Outbound("error", payload={"commandId": command_id, "message": message})


# -- authentication --------------------------------------------------------------------------------


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def token_matches(presented: str | None, expected_digest: bytes) -> bool:
    """Constant time, and the digests have one length, so not even the token's length leaks."""
    presented_digest = token_digest(presented or "")
    return hmac.compare_digest(presented_digest, expected_digest) and presented is not None


class FailureLimiter:
    """Authentication failures per client IP (never IP and port: agor's key is bypassed by a new
    source port): `max_failures` within `window_s` lock that IP out, right token or not, until the
    oldest of them leaves the window. Memory is bounded: at most `max_failures` times per IP and
    `max_ips` IPs (the IP failing longest ago is forgotten first)."""

    def __init__(self, max_failures: int = 10, window_s: float = 300.0, max_ips: int = 65536) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_ips = max_ips
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, ip: str, now: float) -> deque[float]:
        times = self._failures.get(ip)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[ip]
        return times

    def locked_for(self, ip: str, now: float) -> float:
        """Seconds this IP stays locked out (0: not locked)."""
        times = self._recent(ip, now)
        if len(times) < self.max_failures:
            return 0.0
        return times[0] + self.window_s - now

    def failed(self, ip: str, now: float) -> None:
        times = self._recent(ip, now)
        if ip not in self._failures:
            self._failures[ip] = times = deque(maxlen=self.max_failures)
            if len(self._failures) > self.max_ips:
                self._failures.popitem(last=False)
        times.append(now)
        self._failures.move_to_end(ip)


# -- a slow reader's queue and a session's replay buffer ----------------------------------------------


class OutQueue:
    """Frames waiting for one connection's writer, bounded in bytes.

    Consecutive output of one PTY is coalesced into one frame. A frame that would take the queue
    past `limit_bytes` is not dropped: `push` returns False and the connection is closed with 1013;
    everything unsent goes back to the session (`drain`), which replays it on reconnect."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._frames: deque[Outbound] = deque()

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: Outbound) -> bool:
        """Queue `frame`; False when the queue is over its limit with it (the reader is too slow)."""
        last = self._frames[-1] if self._frames else None
        if (
            frame.type == "pty_data"
            and last is not None
            and last.type == "pty_data"
            and last.session_id == frame.session_id
            and isinstance(last.payload, str)
            and isinstance(frame.payload, str)
        ):
            last.payload += frame.payload
            self.bytes += len(frame.payload)
        else:
            self._frames.append(frame)
            self.bytes += frame.size()
        return self.bytes <= self.limit_bytes

    def pop(self) -> Outbound | None:
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self.bytes -= frame.size()
        return frame

    def drain(self) -> list[Outbound]:
        frames = list(self._frames)
        self._frames.clear()
        self.bytes = 0
        return frames


@dataclass
class ReplayBuffer:
    """What a session produced while no controller was attached (and what a closed connection had
    not sent yet), replayed after state_sync. Bounded: past `limit_bytes` the oldest frames go, and
    each loss is counted by type and reported in the next state_sync — never silently."""

    limit_bytes: int
    bytes: int = 0
    frames: deque[Outbound] = field(default_factory=deque)
    lost: dict[str, int] = field(default_factory=dict)

    def extend(self, frames: Iterable[Outbound]) -> None:
        for frame in frames:
            self.frames.append(frame)
            self.bytes += frame.size()
        while self.bytes > self.limit_bytes and self.frames:
            gone = self.frames.popleft()
            self.bytes -= gone.size()
            self.lost[gone.type] = self.lost.get(gone.type, 0) + 1

    def take(self) -> tuple[list[Outbound], dict[str, int]]:
        """(frames to replay, frames lost by type), and the buffer is empty again."""
        frames, lost = list(self.frames), self.lost
        self.frames, self.bytes, self.lost = deque(), 0, {}
        return frames, lost


def state_sync(session: str, ptys: list[dict[str, Any]], sidecar: str, replayed: int, lost: dict[str, int]) -> Outbound:
    """The first frame after `ready` on a resumed session: what is alive, and what follows."""
    return Outbound(
        "state_sync",
        payload={"session": session, "ptys": ptys, "sidecar": sidecar, "replayed": replayed, "lost": lost},
    )


# -- the sidecar's restart schedule ----------------------------------------------------------------


def sidecar_restart_delay_s(restarts: int, base_s: float, cap_s: float, attempts: int) -> float | None:
    """Delay before the sidecar's restart number `restarts` (1-based) — [restart]'s schedule, the
    same as agor-sidecar.service's — or None once the budget is spent (the relay gives up)."""
    if restarts > attempts:
        return None
    return min(base_s * 2.0 ** min(restarts - 1, 1023), cap_s)


def relay_address(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a ws:// or wss:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise AgorError(f"{url!r} is not a relay URL like wss://HOST:{DEFAULT_PORT}")
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORT
