"""agor-sidecar.socket on real user managers: agor talks to its supervised sidecar (issue 16).

The test connects as root through the lab namespace (/proc/PID/root/run/user/UID/...), which
reaches the same socket inode a client of the user reaches at $XDG_RUNTIME_DIR/agor/sidecar.sock.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

from agor_systemd.lab.testbed import OPT_ROOT

from .support import UNIT, agor_units, health, install_sidecar, wait_for, wait_health

AGENT_LINE_BYTES = 200


def socket_path(mgr) -> str:
    return str(mgr.namespace.path(mgr.runtime_dir / "agor" / "sidecar.sock"))


class Client:
    """A line client of the sidecar's socket."""

    def __init__(self, mgr, timeout: float = 15) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path(mgr))
        self.file = self.sock.makefile("rb")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def line(self) -> bytes:
        """The next line; b"" at EOF."""
        return self.file.readline()

    def message(self) -> dict:
        line = self.line()
        assert line, "EOF where a line was expected"
        return json.loads(line)

    def until(self, predicate) -> dict:
        while True:
            message = self.message()
            if predicate(message):
                return message

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def running_pid(mgr) -> int:
    return int(mgr.systemctl("show", "-P", "MainPID", UNIT).stdout.strip())


def test_query_gets_the_answer_and_the_socket_is_private(user_manager, fake_sidecar_path):
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["echo"])
    wait_health(user_manager, "healthy", 20)
    # the socket is the launcher's: the (sandboxed) sidecar gets neither the fd nor LISTEN_*
    pid = sidecar.starts()[-1]["pid"]
    assert b"LISTEN_" not in Path(f"/proc/{pid}/environ").read_bytes()
    fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not [target for target in fds.values() if target.startswith("socket:")], fds
    assert fds["0"].startswith("pipe:")  # its stdin is the bridge's pipe
    info = os.stat(socket_path(user_manager))
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == user_manager.uid
    client = Client(user_manager)
    assert client.message() == {"type": "ready"}  # kept for the first client: nothing is lost
    client.send('{"type":"query","prompt":"hi"}')
    answer = client.message()
    assert answer["type"] == "answer" and answer["to"] == '{"type":"query","prompt":"hi"}'
    status = user_manager.systemctl("show", "-P", "StatusText", UNIT).stdout
    assert "clients 1" in status
    assert health(user_manager).health.get("clients") == 1
    client.close()


def test_crash_gives_eof_and_the_next_connection_waits_for_the_restart(user_manager, fake_sidecar_path):
    """A crash: one line saying so, then EOF, as agor gets it from a runner's stdout. Connections
    made during the backoff (1 s here) are queued by systemd's socket, never refused, and reach the
    restarted sidecar."""
    install_sidecar(user_manager, fake_sidecar_path, ["echo"], base_s=1)
    wait_health(user_manager, "healthy", 20)
    client = Client(user_manager)
    assert client.message() == {"type": "ready"}
    first_pid = running_pid(user_manager)
    client.send("crash")
    told = client.message()
    assert told == {
        "type": "supervisor",
        "state": "restarting",
        "restart": 1,
        "attempts": 5,
        "last_error": told["last_error"],
        "exit_code": told["exit_code"],
    }
    assert told["last_error"] == f"exited with status {told['exit_code']}"
    assert client.line() == b""  # EOF
    client.close()
    crashed = time.monotonic()
    attempts = []
    while time.monotonic() - crashed < 0.8:  # inside the 1 s backoff: every connect is accepted
        waiting = Client(user_manager)
        attempts.append(waiting)
        time.sleep(0.1)
    assert attempts[0].message() == {"type": "ready"}  # the first gets the new sidecar's backlog
    last = attempts[-1]
    last.send("after the restart")
    answer = last.until(lambda m: m.get("type") == "answer")
    assert answer["pid"] != first_pid
    for waiting in attempts:
        waiting.close()


def test_output_while_nobody_is_connected_arrives_on_connect(user_manager, fake_sidecar_path):
    install_sidecar(user_manager, fake_sidecar_path, ["emit:100"])
    wait_health(user_manager, "healthy", 20)
    wait_for("buffered", lambda: health(user_manager).health.get("buffering_lines") == 101, 10)
    client = Client(user_manager)
    assert client.message() == {"type": "ready"}
    numbers = [client.message()["n"] for _ in range(100)]
    assert numbers == list(range(1, 101))  # oldest first, none lost
    client.close()


def test_overflow_is_reported_first(user_manager, fake_sidecar_path):
    """[socket] buffer_mib = 0.0625 (64 KiB): 2000 lines of 200 bytes overflow it; the client gets
    one notice with the count, then the newest lines, in order."""
    config = user_manager.write_file("sidecar-data/socket.toml", "[socket]\nbuffer_mib = 0.0625\n")
    install_sidecar(user_manager, fake_sidecar_path, ["emit:2000"], install_args=[f"--config={config}"])
    wait_health(user_manager, "healthy", 20)
    wait_for("buffered", lambda: health(user_manager).health.get("buffering_lines", 0) > 0, 10)
    time.sleep(0.5)  # all 2000 written
    client = Client(user_manager)
    notice = client.message()
    assert notice["type"] == "bridge" and notice["event"] == "dropped" and notice["reason"] == "no client"
    kept = 65536 // AGENT_LINE_BYTES
    numbers = [client.message()["n"] for _ in range(kept)]
    assert numbers == list(range(2001 - kept, 2001))
    assert notice["lines"] == 2001 - kept  # the ready line and the oldest agent lines
    client.close()


def test_a_stalled_client_stalls_neither_the_sidecar_nor_the_others(user_manager, fake_sidecar_path):
    """One client stops reading; 10,000 lines (2 MB, twice its queue of 1 MiB) at 2,000 lines/s
    later the other client has every line, the sidecar still answers, and the stalled one is
    told how many lines it missed."""
    config = user_manager.write_file("sidecar-data/socket.toml", "[socket]\nclient_queue_mib = 1\n")
    install_sidecar(user_manager, fake_sidecar_path, ["echo"], install_args=[f"--config={config}"])
    wait_health(user_manager, "healthy", 20)
    stalled = Client(user_manager)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = Client(user_manager)  # the backlog (the ready line) went to the first client
    wait_for("two clients", lambda: health(user_manager).health.get("clients") == 2, 10)
    reader.send("pace 10000 2000")
    assert [reader.message()["n"] for _ in range(10000)] == list(range(1, 10001))
    reader.send("still there?")
    assert reader.until(lambda m: m.get("type") == "answer")["to"] == "still there?"
    # the stalled client reads now: a prefix, then the notice, then what comes after
    messages = []
    while not messages or messages[-1].get("type") != "bridge":
        messages.append(stalled.message())
    assert messages[0] == {"type": "ready"}
    notice = messages[-1]
    assert notice["event"] == "dropped" and notice["reason"] == "slow client"
    agent = [m["n"] for m in messages if m.get("type") == "agent"]
    assert agent == list(range(1, len(agent) + 1))
    assert len(agent) + notice["lines"] == 10000 + 1  # and the answer to "still there?"
    reader.send("and now?")
    assert stalled.message()["to"] == "and now?"
    stalled.close()
    reader.close()


def test_an_app_restart_loses_nothing_and_kills_no_agent(user_manager, fake_sidecar_path):
    """The desktop app goes away for 10 s while agents keep talking: same sidecar afterwards, and
    every line written meanwhile arrives on reconnect, in order."""
    install_sidecar(user_manager, fake_sidecar_path, ["tick:0.05"])
    wait_health(user_manager, "healthy", 20)
    app = Client(user_manager)
    assert app.message() == {"type": "ready"}
    pid = running_pid(user_manager)
    seen = [app.message()["n"] for _ in range(10)]
    app.close()
    time.sleep(10)
    app = Client(user_manager)
    after = [app.message()["n"] for _ in range(200)]
    assert seen + after == list(range(1, 211))
    assert running_pid(user_manager) == pid
    app.close()


def test_after_give_up_a_client_learns_it_and_starts_nothing(user_manager, fake_sidecar_path):
    """attempts = 1: two crashes and the sidecar gives up. A connecting client then gets one
    line naming `failed` and the last error, then EOF, and the sidecar is not started again,
    however often clients come;
    `agor-units restart` is the way back."""
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["exit:3", "exit:3", "echo"], attempts=1)
    wait_health(user_manager, "failed", 20)
    assert len(sidecar.starts()) == 2
    for _ in range(8):  # more than StartLimitBurst= (attempts + 1): the answer clears the limiter
        client = Client(user_manager)
        told = client.message()
        assert told["state"] == "failed" and told["last_error"] == "exited with status 3"
        assert client.line() == b""
        client.close()
    attach = user_manager.run([str(OPT_ROOT / "venv" / "bin" / "agor-units"), "attach"], input="", timeout=30)
    assert attach.returncode == 4 and attach.stdout == ""
    assert "-- the sidecar gave up: exited with status 3; run `agor-units restart`" in attach.stderr
    time.sleep(1)
    assert len(sidecar.starts()) == 2
    failed = health(user_manager).health
    assert failed["status"] == "failed" and failed["attempts"] == 1 and failed["last_error"] == "exited with status 3"
    agor_units(user_manager, "restart", check=True)
    wait_health(user_manager, "healthy", 20)
    client = Client(user_manager)
    client.send("back")
    assert client.until(lambda m: m.get("type") == "answer")["to"] == "back"
    client.close()


def test_attach_sends_lines_and_prints_the_output_until_eof(user_manager, fake_sidecar_path):
    install_sidecar(user_manager, fake_sidecar_path, ["echo"])
    wait_health(user_manager, "healthy", 20)
    attach = user_manager.run(
        [str(OPT_ROOT / "venv" / "bin" / "agor-units"), "attach", "--json"], input="hello\ncrash\n", timeout=30
    )
    assert attach.returncode == 0, attach.stderr
    lines = [json.loads(line) for line in attach.stdout.splitlines()]
    assert lines[0] == {"type": "ready"} and lines[1]["to"] == "hello" and len(lines) == 3
    assert lines[2]["type"] == "supervisor" and lines[2]["state"] == "restarting"
    assert attach.stderr == ""  # --json: nothing added
    said = user_manager.run([str(OPT_ROOT / "venv" / "bin" / "agor-units"), "attach"], input="crash\n", timeout=30)
    assert said.returncode == 0 and "-- the sidecar ended (exited with status" in said.stderr, said.stderr
    assert "restart 2 of 5 follows" in said.stderr  # its second crash in this test


def test_a_client_connected_at_the_give_up_is_told_before_its_eof(user_manager, fake_sidecar_path):
    install_sidecar(user_manager, fake_sidecar_path, ["echo"], attempts=1, base_s=0.2)
    for _ in range(2):  # the first crash is restarted, the second is the give-up
        wait_health(user_manager, "healthy", 20)
        client = Client(user_manager)
        assert client.message() == {"type": "ready"}
        client.send("crash")
        last = client.line()
        client.close()
    told = json.loads(last)
    assert told["state"] == "failed" and told["last_error"] == "exited with status 3"
    wait_health(user_manager, "failed", 10)
