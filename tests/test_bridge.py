"""The bridge's Sans-I/O core: line framing, the backlog, per-client queues, overflow notices; and
its I/O on real sockets and pipes."""

from __future__ import annotations

import json
import os
import select
import socket

from agor_systemd.sidecar.bridge import Bridge, Outbox, SocketBridge, dropped_notice, listen_fd, split_lines
from agor_systemd.sidecar.health import socket_clients


def drain(bridge: Bridge, client: int) -> list[bytes]:
    """Everything queued for `client`, written as if the socket took it all."""
    out = b""
    while bridge.clients[client].outbox:
        chunk = bridge.clients[client].outbox.pending()
        bridge.clients[client].wrote(len(chunk))
        out += chunk
    return out.splitlines(keepends=True)


def test_split_lines_keeps_the_unfinished_rest():
    assert split_lines(b"", b"a\nb") == ([b"a\n"], b"b")
    assert split_lines(b"b", b"c") == ([], b"bc")
    assert split_lines(b"bc", b"\n\nd\n") == ([b"bc\n", b"\n", b"d\n"], b"")


def test_output_goes_to_every_client_whole_lines_only():
    bridge = Bridge()
    bridge.connect(1)
    bridge.connect(2)
    bridge.sidecar_output(b'{"a":1}\n{"b"')
    bridge.sidecar_output(b":2}\n")
    assert drain(bridge, 1) == drain(bridge, 2) == [b'{"a":1}\n', b'{"b":2}\n']


def test_input_lines_of_clients_are_never_interleaved():
    bridge = Bridge()
    bridge.connect(1)
    bridge.connect(2)
    bridge.client_input(1, b"from one, first ha")
    bridge.client_input(2, b"from two\n")
    bridge.client_input(1, b"lf\n")
    assert list(bridge.stdin.lines) == [b"from two\n", b"from one, first half\n"]


def test_an_unfinished_input_line_of_a_client_that_leaves_is_dropped():
    bridge = Bridge()
    bridge.connect(1)
    bridge.client_input(1, b"half a li")
    bridge.disconnect(1)
    assert not bridge.stdin


def test_backlog_while_nobody_is_connected_arrives_oldest_first():
    bridge = Bridge()
    for n in range(5):
        bridge.sidecar_output(b"line %d\n" % n)
    assert bridge.summary() == "no client, buffering 5 lines"
    bridge.connect(7)
    assert drain(bridge, 7) == [b"line %d\n" % n for n in range(5)]
    assert bridge.summary() == "clients 1"
    bridge.connect(8)  # the backlog went to the first client only
    assert drain(bridge, 8) == []


def test_backlog_overflow_drops_the_oldest_and_says_how_many_first():
    bridge = Bridge(backlog_bytes=100)
    for n in range(30):
        bridge.sidecar_output(b"line %02d\n" % n)  # 8 bytes each: 12 fit
    bridge.connect(1)
    lines = drain(bridge, 1)
    assert json.loads(lines[0]) == {"type": "bridge", "event": "dropped", "lines": 18, "reason": "no client"}
    assert lines[1:] == [b"line %02d\n" % n for n in range(18, 30)]


def test_a_line_longer_than_the_backlog_is_kept_alone():
    bridge = Bridge(backlog_bytes=10)
    bridge.sidecar_output(b"short\n" + b"x" * 50 + b"\n")
    bridge.connect(1)
    assert drain(bridge, 1) == [dropped_notice(1, "no client"), b"x" * 50 + b"\n"]


def test_a_slow_client_loses_lines_alone_and_is_told_once_it_has_caught_up():
    bridge = Bridge(client_queue_bytes=100)
    bridge.connect(1)  # reads
    bridge.connect(2)  # stalls
    for n in range(40):
        bridge.sidecar_output(b"line %02d\n" % n)  # 8 bytes each
        drain(bridge, 1)
    assert bridge.clients[2].outbox.queued <= 100
    kept = [line for line in bridge.clients[2].outbox.lines]
    assert kept == [b"line %02d\n" % n for n in range(12)]
    bridge.sidecar_output(b"line 40\n")  # still full: dropped too
    lines = drain(bridge, 2)  # it reads: half the queue is free again
    assert lines == kept + [dropped_notice(29, "slow client")]
    bridge.sidecar_output(b"line 41\n")
    assert drain(bridge, 2) == [b"line 41\n"]


def test_the_notice_comes_only_once_half_the_queue_is_free():
    bridge = Bridge(client_queue_bytes=80)
    bridge.connect(1)
    for n in range(12):
        bridge.sidecar_output(b"line %02d\n" % n)  # 10 fit, 2 dropped
    client = bridge.clients[1]
    client.wrote(8)  # one line taken: room for a notice, but not half the queue
    bridge.sidecar_output(b"line 12\n")
    assert b"bridge" not in b"".join(client.outbox.lines)
    client.wrote(32)  # half taken
    assert list(client.outbox.lines)[-1] == dropped_notice(3, "slow client")


def test_a_partly_written_line_is_finished_first():
    box = Outbox(1000)
    box.put(b"abcdef\n")
    box.put(b"gh\n")
    box.wrote(3)
    assert box.pending() == b"def\ngh\n"
    box.wrote(5)
    assert box.pending() == b"h\n" and box.queued == 3


def test_the_sidecars_exit_ends_every_client_after_its_queue_and_a_last_unfinished_line():
    bridge = Bridge()
    bridge.connect(1)
    bridge.sidecar_output(b"whole\nno newline")
    bridge.sidecar_ended()
    assert bridge.clients[1].closing
    assert drain(bridge, 1) == [b"whole\n", b"no newline\n"]
    assert not bridge.wants_input()


def test_input_stops_being_read_while_the_sidecars_stdin_is_full():
    bridge = Bridge(stdin_queue_bytes=10)
    bridge.connect(1)
    assert bridge.wants_input()
    bridge.client_input(1, b"0123456789\n")
    assert not bridge.wants_input()
    bridge.stdin.wrote(11)
    assert bridge.wants_input()


def test_lines_are_written_as_they_come_and_polled_for_only_when_a_socket_is_full(tmp_path):
    """Each message would otherwise cost two more wakeups of the launcher (poll for POLLOUT, write)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sidecar.sock"))
    listener.listen()
    stdin_r, stdin_w = os.pipe()
    os.set_blocking(stdin_r, False)  # nothing there: BlockingIOError, not a hang
    poller = select.poll()
    bridge = SocketBridge(listener.detach(), stdin_w, poller, Bridge(), on_change=lambda: None)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "sidecar.sock"))
    client.settimeout(0.1)
    bridge.handle(bridge.listener.fileno(), select.POLLIN)
    [fd] = bridge.core.clients

    client.sendall(b'{"type":"query"}\n')
    bridge.handle(fd, select.POLLIN)
    assert os.read(stdin_r, 100) == b'{"type":"query"}\n'  # in the same call, no POLLOUT round
    assert not bridge.interest.get(stdin_w, 0) & select.POLLOUT

    bridge.sidecar_output(b'{"type":"answer"}\n')
    assert client.recv(100) == b'{"type":"answer"}\n'
    assert not bridge.interest[fd] & select.POLLOUT

    # a client that does not read: what its socket cannot take waits, polled for
    lines = [b"%06d" % n + b"x" * 1000 + b"\n" for n in range(2000)]
    bridge.sidecar_output(b"".join(lines))
    assert bridge.interest[fd] & select.POLLOUT and bridge.core.clients[fd].outbox
    client.setblocking(False)
    received = b""
    while len(received) < sum(map(len, lines)):
        try:
            received += client.recv(1 << 20)
        except BlockingIOError:
            for ready, events in poller.poll(1000):
                bridge.handle(ready, events)
    assert received.splitlines(keepends=True) == lines
    assert not bridge.interest[fd] & select.POLLOUT


def test_listen_fd_wants_our_pid_and_the_name():
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "other:sidecar"}
    assert listen_fd(env, 42) == 4
    assert listen_fd(env, 43) is None  # inherited, not ours
    assert listen_fd({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, 42) == 3  # systemd without names
    assert listen_fd({"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}, 42) is None
    assert listen_fd({}, 42) is None


def test_health_reads_the_bridge_from_status():
    assert socket_clients("ready; pid 5; up 1m; attempt 0/5; sandbox full; clients 2") == {"clients": 2}
    assert socket_clients("ready; pid 5; sandbox off; no client, buffering 12 lines") == {
        "clients": 0,
        "buffering_lines": 12,
    }
    assert socket_clients("ready; pid 5; sandbox off") == {}
