"""connect() and the attach command's notes, against a socket of the test's own."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from agor_systemd.cli import attach_note
from agor_systemd.sidecar.bridge import dropped_notice
from agor_systemd.sidecar.client import LineStream, SocketUnavailable, connect, socket_path
from agor_systemd.sidecar.launcher import failed_line, restarting_line


def test_connect_sends_whole_lines_and_reads_until_eof(tmp_path):
    path = tmp_path / "sidecar.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received = []

    def sidecar() -> None:
        peer, _ = server.accept()
        with peer, peer.makefile("rb") as lines:
            received.append(lines.readline())
            peer.sendall(b'{"type":"ready"}\n{"type":"answer"}\n')

    thread = threading.Thread(target=sidecar)
    thread.start()
    with connect(path, timeout=5) as stream:
        stream.send('{"type":"query"}')
        assert list(stream) == [b'{"type":"ready"}', b'{"type":"answer"}']
        assert stream.readline() is None
    thread.join()
    assert received == [b'{"type":"query"}\n']
    server.close()


def test_send_refuses_a_line_with_a_newline_inside(tmp_path):
    a, b = socket.socketpair()
    with LineStream(a) as stream, pytest.raises(ValueError):
        stream.send(b"one\ntwo")
    b.close()


def test_nothing_listening_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(SocketUnavailable) as e:
        connect(tmp_path / "missing.sock")
    assert "systemctl --user start agor-sidecar.socket" in str(e.value) and "\n" not in str(e.value)


def test_socket_path_follows_xdg_runtime_dir(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert str(socket_path()) == "/run/user/1234/agor/sidecar.sock"
    assert str(socket_path(system=True)) == "/run/agor/sidecar.sock"


def test_attach_says_the_bridge_and_supervisor_lines_in_words():
    assert attach_note(dropped_notice(12, "no client").rstrip()) == "-- 12 lines dropped (no client)"
    failed = b'{"type": "supervisor", "state": "failed", "attempts": 5, "last_error": "exited with status 3"}'
    assert attach_note(failed) == "-- the sidecar gave up: exited with status 3; run `agor-units restart`"
    restarting = restarting_line("killed by signal 9 (KILL)", 2, 5, -9)
    assert json.loads(restarting) == {
        "type": "supervisor",
        "state": "restarting",
        "restart": 2,
        "attempts": 5,
        "last_error": "killed by signal 9 (KILL)",
        "exit_code": -9,
    }
    assert attach_note(restarting.rstrip()) == (
        "-- the sidecar ended (killed by signal 9 (KILL)); restart 2 of 5 follows: attach again"
    )
    assert json.loads(failed_line("exited with status 3", 5, 3))["exit_code"] == 3
    assert "exit_code" not in json.loads(failed_line("exited with status 3", 5))  # a later client's answer
    assert attach_note(b'{"type":"agent","text":"bridge"}') is None
    assert attach_note(b"not json, bridge supervisor") is None
