"""The sidecar's stdio on agor-sidecar.socket: whole lines between its clients and the sidecar.

The launcher gets the listening socket from systemd (socket activation, fd name `sidecar`) and
bridges every client connection to the sidecar's stdin and stdout (docs/socket.md):

* output to all: every line the sidecar writes to stdout goes to every connected client;
* input from any: every whole line a client writes goes to the sidecar's stdin; lines of
  different clients are never interleaved mid-line, a client's unfinished last line is dropped;
* nobody connected: stdout lines are kept in a backlog of `backlog_bytes` and delivered to the
  next client, oldest first; lines pushed out of it are counted, and that client first gets one
  notice line `{"type":"bridge","event":"dropped","lines":N,"reason":"no client"}`;
* a slow client: its queue holds `client_queue_bytes`; lines beyond that are dropped for it
  alone, and once it has taken half its queue it gets the same notice with "reason":"slow
  client", then the lines that came after;
* the sidecar's exit: clients get what was queued for them, then EOF.

`Bridge` is the Sans-I/O core (pure: bytes in, bytes out, tested without sockets);
`SocketBridge` is the thin I/O around it, driven by the launcher's poll loop. Imported by the
launcher only when systemd passed a socket, and kept import-light (C modules only).
"""

from __future__ import annotations

import errno
import os
import select
from _collections import deque  # the C type: `collections` itself imports a dozen modules

from agor_systemd.notify import listen_fds
from agor_systemd.sidecar.protocol import BUFFER_BYTES, CLIENT_QUEUE_BYTES

FD_NAME = "sidecar"  # the socket unit's FileDescriptorName=
LISTEN_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
STDIN_QUEUE_BYTES = 1024 * 1024  # beyond this, clients are not read until the sidecar reads its stdin
WRITE_CHUNK = 65536
CLOSE_FLUSH_S = 1.0  # at the sidecar's exit: how long clients get to take what is queued for them


def listen_fd(environ: dict[str, str], pid: int) -> int | None:
    """The fd of the socket named FD_NAME that systemd passed to process `pid`, else None; a single
    socket without a name is it too."""
    passed = listen_fds(environ, pid)
    for name, fd in passed:
        if name == FD_NAME:
            return fd
    return passed[0][1] if len(passed) == 1 and passed[0][0] == "" else None


def dropped_notice(lines: int, reason: str) -> bytes:
    return b'{"type":"bridge","event":"dropped","lines":%d,"reason":"%s"}\n' % (lines, reason.encode())


def split_lines(partial: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """(whole lines each ending in b"\\n", the unfinished rest) of `partial` + `data`."""
    if b"\n" not in data:
        return [], partial + data
    data = partial + data
    end = data.rfind(b"\n") + 1
    return [line + b"\n" for line in data[: end - 1].split(b"\n")], data[end:]


class Outbox:
    """Whole lines waiting to be written to one fd, `limit` bytes at most; a partly written
    first line is finished before anything else goes out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: deque = deque()
        self.queued = 0  # bytes in `lines`, including the part of the first already written
        self.offset = 0  # bytes of lines[0] already written

    def put(self, line: bytes, force: bool = False) -> bool:
        """Queue `line`; False (not queued) when it would exceed the limit. A lone line always fits."""
        if not force and self.lines and self.queued + len(line) > self.limit:
            return False
        self.lines.append(line)
        self.queued += len(line)
        return True

    def pending(self, max_bytes: int = WRITE_CHUNK) -> bytes:
        chunk, size = [], 0
        for line in self.lines:
            chunk.append(line)
            size += len(line)
            if size >= max_bytes:
                break
        return b"".join(chunk)[self.offset :]

    def wrote(self, count: int) -> None:
        count += self.offset
        while self.lines and count >= len(self.lines[0]):
            line = self.lines.popleft()
            count -= len(line)
            self.queued -= len(line)
        self.offset = count

    def __bool__(self) -> bool:
        return bool(self.lines)


class Client:
    def __init__(self, queue_bytes: int) -> None:
        self.outbox = Outbox(queue_bytes)
        self.partial_input = b""
        self.dropped = 0  # lines not queued for it since its queue was last full
        self.closing = False  # EOF once the outbox is empty

    def send(self, line: bytes) -> None:
        self.catch_up()
        if self.dropped or not self.outbox.put(line):
            self.dropped += 1

    def wrote(self, count: int) -> None:
        self.outbox.wrote(count)
        self.catch_up()

    def catch_up(self) -> None:
        """Once it has taken half its queue, tell it how many lines it missed, before anything
        newer (half, not a line's room: else it would get a notice every few lines)."""
        if self.dropped and self.outbox.queued <= self.outbox.limit // 2:
            self.outbox.put(dropped_notice(self.dropped, "slow client"), force=True)
            self.dropped = 0


class Bridge:
    """The Sans-I/O core: the launcher feeds it bytes and events, and writes what it hands out."""

    def __init__(
        self,
        backlog_bytes: int = BUFFER_BYTES,
        client_queue_bytes: int = CLIENT_QUEUE_BYTES,
        stdin_queue_bytes: int = STDIN_QUEUE_BYTES,
    ) -> None:
        self.client_queue_bytes = client_queue_bytes
        self.backlog = Outbox(backlog_bytes)  # only ever filled while no client is connected
        self.backlog_dropped = 0
        self.stdin = Outbox(stdin_queue_bytes)
        self.clients: dict[int, Client] = {}
        self.partial_output = b""
        self.ended = False

    # -- the sidecar's side ----------------------------------------------------------------------

    def sidecar_output(self, data: bytes) -> None:
        lines, self.partial_output = split_lines(self.partial_output, data)
        for line in lines:
            self.deliver(line)

    def sidecar_ended(self) -> None:
        """Its stdout is closed (or it exited): a last unfinished line still goes out, then EOF."""
        if self.partial_output:
            self.deliver(self.partial_output + b"\n")
            self.partial_output = b""
        self.ended = True
        for client in self.clients.values():
            client.closing = True

    def deliver(self, line: bytes) -> None:
        if not self.clients:
            self.backlog.put(line, force=True)
            while self.backlog.queued > self.backlog.limit and len(self.backlog.lines) > 1:
                self.backlog.queued -= len(self.backlog.lines.popleft())
                self.backlog_dropped += 1
            return
        for client in self.clients.values():
            client.send(line)

    # -- the clients' side -----------------------------------------------------------------------

    def connect(self, client_id: int) -> None:
        """A new client: it gets the backlog first (after the dropped-lines notice, if any)."""
        client = Client(self.client_queue_bytes)
        if self.backlog_dropped:
            client.outbox.put(dropped_notice(self.backlog_dropped, "no client"), force=True)
        for line in self.backlog.lines:
            client.outbox.put(line, force=True)
        self.backlog, self.backlog_dropped = Outbox(self.backlog.limit), 0
        client.closing = self.ended
        self.clients[client_id] = client

    def client_input(self, client_id: int, data: bytes) -> None:
        client = self.clients[client_id]
        lines, client.partial_input = split_lines(client.partial_input, data)
        for line in lines:
            self.stdin.put(line, force=True)  # the bound is kept by not reading clients (wants_input)

    def disconnect(self, client_id: int) -> None:
        self.clients.pop(client_id, None)

    def wants_input(self) -> bool:
        return not self.ended and self.stdin.queued < self.stdin.limit

    # -- what STATUS= and health show ------------------------------------------------------------

    def summary(self) -> str:
        """'clients 2' or 'no client, buffering 12 lines' (health parses it back from STATUS=)."""
        if self.clients:
            return f"clients {len(self.clients)}"
        return f"no client, buffering {len(self.backlog.lines)} lines"


class SocketBridge:
    """The I/O: accepts on systemd's socket, reads and writes the clients and the sidecar's stdin,
    all non-blocking, on the launcher's poller."""

    def __init__(self, listen: int, stdin_fd: int, poller, core: Bridge, on_change) -> None:
        import _socket  # import cost: the C module, <1 ms; `socket` would import enum (~5 ms)

        self.listener = _socket.socket(fileno=listen)
        self.listener.setblocking(False)
        self.stdin_fd = stdin_fd
        os.set_blocking(stdin_fd, False)
        self.poller = poller
        self.core = core
        self.on_change = on_change  # called when a client comes or goes
        self.interest: dict[int, int] = {}
        self.watch(listen, select.POLLIN)

    def watch(self, fd: int, events: int) -> None:
        if self.interest.get(fd) == events:
            return
        if fd in self.interest:
            self.poller.modify(fd, events) if events else self.poller.unregister(fd)
        elif events:
            self.poller.register(fd, events)
        if events:
            self.interest[fd] = events
        else:
            self.interest.pop(fd, None)

    def owns(self, fd: int) -> bool:
        return fd in self.interest

    def handle(self, fd: int, events: int) -> None:
        if fd == self.listener.fileno():
            self.accept()
        elif fd == self.stdin_fd:
            self.write_stdin()
        elif fd in self.core.clients:
            if events & select.POLLOUT:
                self.write_client(fd)
            if fd in self.core.clients and events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self.read_client(fd)
        self.refresh()

    def accept(self) -> None:
        while True:
            try:
                fd, _ = self.listener._accept()  # type: ignore[attr-defined]  # socket.accept's C half: a plain fd, no socket object
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    return  # the connection stays queued (EMFILE) or is gone; the next poll retries
                raise
            os.set_blocking(fd, False)
            self.core.connect(fd)
            self.on_change()

    def read_client(self, fd: int) -> None:
        try:
            data = os.read(fd, WRITE_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.core.client_input(fd, data)
            if self.core.stdin:
                self.write_stdin()  # now: polling for POLLOUT first costs a wakeup per line
        else:
            self.close_client(fd)  # it hung up (a half-close too: the bridge has no use for one)

    def write_client(self, fd: int) -> None:
        client = self.core.clients[fd]
        try:
            client.wrote(os.write(fd, client.outbox.pending()))
        except BlockingIOError:
            return
        except OSError:  # EPIPE, ECONNRESET: it is gone
            self.close_client(fd)

    def write_stdin(self) -> None:
        try:
            self.core.stdin.wrote(os.write(self.stdin_fd, self.core.stdin.pending()))
        except BlockingIOError:
            pass
        except OSError:  # the sidecar closed its stdin or exited: input has nowhere to go
            self.core.stdin = Outbox(self.core.stdin.limit)

    def close_client(self, fd: int) -> None:
        self.watch(fd, 0)
        self.core.disconnect(fd)
        os.close(fd)
        self.on_change()

    def refresh(self) -> None:
        """Poll for what can make progress: output to clients that have some, input while the
        sidecar's stdin queue has room, the sidecar's stdin while input is queued."""
        reading = select.POLLIN if self.core.wants_input() else 0
        for fd, client in list(self.core.clients.items()):
            if client.closing and not client.outbox:
                self.close_client(fd)
                continue
            self.watch(fd, (select.POLLOUT if client.outbox else 0) | reading | select.POLLHUP)
        self.watch(self.stdin_fd, select.POLLOUT if self.core.stdin else 0)

    def sidecar_output(self, data: bytes) -> None:
        """Written to the clients at once; a client whose socket is full is polled for POLLOUT."""
        self.core.sidecar_output(data)
        for fd, client in list(self.core.clients.items()):
            if client.outbox:
                self.write_client(fd)
        self.refresh()

    def finish(self, last_line: bytes | None = None) -> None:
        """The sidecar exited: give every client what is queued for it (and `last_line`), for up to
        CLOSE_FLUSH_S, then EOF. Connections not yet accepted stay queued for the next launcher."""
        import time  # import cost: none, the launcher has it loaded

        self.core.sidecar_ended()
        if last_line is not None:
            for client in self.core.clients.values():
                client.outbox.put(last_line, force=True)
        # a poller of the clients alone: the sidecar's pidfd and ended pipes would wake it at once
        self.poller, self.interest = select.poll(), {}
        self.core.stdin = Outbox(self.core.stdin.limit)  # nobody reads it any more
        deadline = time.monotonic() + CLOSE_FLUSH_S
        self.refresh()
        while self.core.clients and (remaining := deadline - time.monotonic()) > 0:
            for fd, events in self.poller.poll(int(remaining * 1000) + 1):
                if fd in self.core.clients:
                    self.handle(fd, events)
        for fd in list(self.core.clients):
            self.close_client(fd)


def respond_and_close(listen: int, line: bytes) -> int:
    """The given-up sidecar's answer: every queued connection gets `line`, then EOF; the count."""
    import _socket  # import cost: the C module, <1 ms

    listener = _socket.socket(fileno=listen)
    listener.setblocking(False)
    answered = 0
    while True:
        try:
            fd, _ = listener._accept()  # type: ignore[attr-defined]  # as above: a plain fd
        except (BlockingIOError, InterruptedError):
            return answered
        try:
            os.set_blocking(fd, True)
            os.write(fd, line)
        except OSError:
            pass  # gone already
        finally:
            os.close(fd)
        answered += 1


def connection_pending(listen: int) -> bool:
    """Whether a client is waiting on the socket: a socket-triggered start, not a user's restart."""
    poller = select.poll()
    poller.register(listen, select.POLLIN)
    return bool(poller.poll(0))
