"""agor-relay.service under real user managers (252 and 254): the token as a systemd credential,
never in the unit, the command lines, `systemctl show` or the journal; a controller's session with
its sidecar as an instance of agor-relay-sidecar@.service; reload; a session that outlives a restart."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from agor_systemd.lab.testbed import OPT_ROOT
from agor_systemd.relay.client import connect, peer_certificate
from agor_systemd.relay.tls import certificate_pin, der_of_pem
from agor_systemd.sandbox import landlock

from .support import agor_units, wait_for

UNIT = "agor-relay.service"
AGOR_RELAY = str(OPT_ROOT / "venv" / "bin" / "agor-relay")
PYTHON = str(OPT_ROOT / "venv" / "bin" / "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_relay(mgr, echo_sidecar: Path) -> tuple[str, int]:
    token = secrets.token_urlsafe(24)
    port = free_port()
    command = json.dumps([PYTHON, str(echo_sidecar)])
    mgr.write_file(
        ".config/agor/units.toml",
        f'[sidecar]\ncommand = {command}\n\n[relay]\nenabled = true\nport = {port}\nbind = "127.0.0.1"\n',
    )
    mgr.write_file(".config/agor/relay-token", token + "\n", mode=0o600)
    mgr.run([AGOR_RELAY, "cert", "--host", "127.0.0.1", "--force"], check=True)
    agor_units(mgr, "install", "--now", check=True)
    mgr.wait_property(UNIT, "ActiveState", "active", timeout=20)
    return token, port


async def session_round_trip(url: str, token: str, known_hosts: Path, session: str | None = None) -> dict:
    connection = await connect(url, token, known_hosts=known_hosts, session=session)
    try:
        frames = [json.loads(await connection.recv())]  # ready
        await connection.send(json.dumps({"id": "1", "type": "agent_query", "payload": {"prompt": "hi"}}))
        async with asyncio.timeout(20):
            while not (frames[-1]["type"] == "sidecar_message" and frames[-1]["payload"]["type"] == "echo"):
                frames.append(json.loads(await connection.recv()))
    finally:
        await connection.close()
    return {
        "ready": frames[0],
        "echo": frames[-1],
        "sidecar_pid": next(f["payload"]["pid"] for f in frames if f["type"] == "sidecar_message"),
    }


def unit_pids(mgr) -> list[int]:
    cgroup = mgr.unit_property(UNIT, "ControlGroup")
    procs = Path("/sys/fs/cgroup/unified" + cgroup, "cgroup.procs")
    if not procs.exists():
        procs = Path("/sys/fs/cgroup/systemd" + cgroup, "cgroup.procs")
    return [int(pid) for pid in procs.read_text().split()]


def test_the_relay_unit_serves_with_the_token_as_a_credential(user_manager, echo_sidecar_path, tmp_path):
    mgr = user_manager
    token, port = install_relay(mgr, echo_sidecar_path)
    url = f"wss://127.0.0.1:{port}"
    known = tmp_path / "known_hosts"
    result = asyncio.run(session_round_trip(url, token, known))
    assert result["ready"]["payload"]["resumed"] is False
    assert result["echo"]["payload"] == {"type": "echo", "message": {"prompt": "hi", "type": "query"}}

    # the token: only in the credential, nowhere a local user or the journal could read it
    main_pid = int(mgr.unit_property(UNIT, "MainPID"))
    environ = Path(f"/proc/{main_pid}/environ").read_bytes().split(b"\0")
    credentials = next(v for v in environ if v.startswith(b"CREDENTIALS_DIRECTORY=")).split(b"=", 1)[1].decode()
    assert mgr.namespace.path(Path(credentials) / "relay-token").read_text().strip() == token
    for pid in unit_pids(mgr):
        assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
        assert token.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), pid
    assert b"CREDENTIALS_DIRECTORY" not in Path(f"/proc/{result['sidecar_pid']}/environ").read_bytes()
    assert token not in mgr.systemctl("show", UNIT).stdout
    assert token not in (mgr.unit_dir / UNIT).read_text()
    status = mgr.unit_property(UNIT, "StatusText")
    assert "clients" in status and "sessions" in status, status
    journal = "\n".join(mgr.journal_lines(UNIT, identifier="agor-relay"))
    assert "listening on wss://127.0.0.1" in journal and token not in journal
    # the project's hardening, and the relay's own Landlock domain where the kernel has Landlock
    assert mgr.unit_property(UNIT, "ProtectSystem") == "strict" and mgr.unit_property(UNIT, "NoNewPrivileges") == "yes"
    assert ("confined (Landlock ABI" if landlock.abi_version() > 0 else "not confined") in journal

    # a wrong token: 401, and the journal names the IP, never the token tried
    assert asyncio.run(refused(url, "not-" + token, known)) == "401"
    wait_for(
        "the failure in the journal",
        lambda: "127.0.0.1: wrong token" in "\n".join(mgr.journal_lines(UNIT, identifier="agor-relay")),
        10,
    )

    # systemctl reload: a new certificate for new connections
    mgr.run([AGOR_RELAY, "cert", "--host", "127.0.0.1", "--force"], check=True)
    mgr.systemctl("reload", UNIT, check=True)
    new_pin = certificate_pin(der_of_pem((mgr.home / ".config/agor/relay-cert.pem").read_bytes()))
    wait_for(
        "the new certificate", lambda: certificate_pin(asyncio.run(peer_certificate("127.0.0.1", port))) == new_pin, 10
    )

    # a session's sidecar is a unit of its own, an instance of agor-relay-sidecar@.service
    sidecar = f"agor-relay-sidecar@{result['ready']['payload']['session']}.service"
    assert mgr.unit_property(sidecar, "ActiveState") == "active"
    assert result["sidecar_pid"] not in unit_pids(mgr)


class Knocker(threading.Thread):
    """Connects to the relay's port again and again, counting connects accepted and refused."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.accepted, self.refused, self.timed_out, self.done = port, 0, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                self.accepted += 1
            except ConnectionRefusedError:
                self.refused += 1
            except TimeoutError:
                self.timed_out += 1
            time.sleep(0.05)

    def __enter__(self) -> Knocker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # and a moment after the restart job is done
        self.done.set()
        self.join()


class Controller:
    """A controller's connection, as agor's: frames in, frames out, wait for one that matches."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.frames: list[dict] = []

    @classmethod
    async def open(cls, url: str, token: str, known: Path, session: str | None = None) -> Controller:
        return cls(await connect(url, token, known_hosts=known, session=session))

    async def send(self, kind: str, payload: dict | None = None, command_id: str = "c") -> None:
        await self.connection.send(json.dumps({"id": command_id, "type": kind, "payload": payload or {}}))

    async def until(self, matches, timeout: float = 20) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.connection.recv())
                self.frames.append(frame)
                if matches(frame):
                    return frame


def terminal_output(frames: list[dict], pty: str) -> str:
    return "".join(f["payload"] for f in frames if f["type"] == "pty_data" and f.get("sessionId") == pty)


def test_a_session_outlives_a_restart_of_the_relay(user_manager, echo_sidecar_path, tmp_path):
    """`systemctl --user restart agor-relay` with a terminal and a sidecar at work: no connect is
    refused meanwhile (the listening socket waits in the fd store), the controller is told to come
    back (1012), reconnects with its session and gets state_sync, the output its
    terminal wrote meanwhile, the same shell and the same sidecar; a stop ends the session."""
    mgr = user_manager
    token, port = install_relay(mgr, echo_sidecar_path)
    url, known = f"wss://127.0.0.1:{port}", tmp_path / "known_hosts"
    project = mgr.home / "projects" / "demo"
    mgr.run(["mkdir", "-p", str(project)], check=True)

    async def before() -> tuple[str, str]:
        c = await Controller.open(url, token, known)
        session = (await c.until(lambda f: f["type"] == "ready"))["payload"]["session"]
        await c.send("pty_create", {"shell": "/bin/bash", "args": ["--norc", "--noprofile", "-i"], "cwd": str(project)})
        pty = (await c.until(lambda f: f["type"] == "pty_created"))["sessionId"]
        await c.until(lambda f: "$ " in terminal_output(c.frames, pty))  # the prompt: bash reads input now
        await c.send("pty_write", {"id": pty, "data": "pwd; echo before-$((1+1))\n"})
        await c.until(lambda f: "before-2" in terminal_output(c.frames, pty))
        assert str(project) in terminal_output(c.frames, pty)
        await c.send("agent_query", {"prompt": "hi"})
        await c.until(lambda f: f["type"] == "sidecar_message" and f["payload"]["type"] == "echo")
        # output that comes while no relay runs
        await c.send("pty_write", {"id": pty, "data": "sleep 2; echo away-$((2+2))\n"})
        await c.until(lambda f: "away-$((2+2))" in terminal_output(c.frames, pty))  # the terminal's echo
        with Knocker(port) as knocks:  # TCP connects all through the restart
            mgr.systemctl("restart", UNIT, check=True)
        assert knocks.refused == knocks.timed_out == 0 and knocks.accepted > 5, vars(knocks)
        with pytest.raises(ConnectionClosed) as closed:
            await c.until(lambda f: False)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        return session, pty

    session, pty = asyncio.run(before())
    terminal, sidecar = f"agor-relay-pty-{session}-{pty}.service", f"agor-relay-sidecar@{session}.service"
    shell_pid, launcher_pid = mgr.unit_property(terminal, "MainPID"), mgr.unit_property(sidecar, "MainPID")
    mgr.wait_property(UNIT, "ActiveState", "active", timeout=20)
    journal = "\n".join(mgr.journal_lines(UNIT, identifier="agor-relay"))
    assert "restarting: 1 sessions kept" in journal and "took over 1 sessions (1 terminals)" in journal

    terminal = f"agor-relay-pty-{session}-{pty}.service"
    sidecar = f"agor-relay-sidecar@{session}.service"

    async def after() -> list[dict]:
        await asyncio.sleep(2.5)  # `away` is written while the controller is away
        c = await Controller.open(url, token, known, session=session)
        ready = await c.until(lambda f: f["type"] == "ready")
        assert ready["payload"] == {"session": session, "resumed": True}
        sync = await c.until(lambda f: f["type"] == "state_sync")
        assert sync["payload"]["ptys"] == [{"id": pty, "pid": int(shell_pid), "alive": True, "exitCode": None}]
        assert sync["payload"]["sidecar"] in ("running", "starting")
        await c.until(lambda f: "away-4" in terminal_output(c.frames, pty), timeout=10)
        await c.send("pty_write", {"id": pty, "data": "echo after-$((3+3))\n"})
        await c.until(lambda f: "after-6" in terminal_output(c.frames, pty))
        await c.send("agent_query", {"prompt": "again"})
        echo = await c.until(lambda f: f["type"] == "sidecar_message" and f["payload"]["type"] == "echo")
        assert echo["payload"]["message"]["prompt"] == "again"
        # a crash of the sidecar: systemd restarts it on its schedule, the relay reports it
        await c.send("agent_query", {"prompt": "crash"})
        exited = await c.until(lambda f: f["type"] == "sidecar_exited")
        assert exited["payload"] == {"exitCode": 3, "restart": 1, "retryInS": 1.0}
        await c.send("agent_query", {"prompt": "back"})
        await c.until(
            lambda f: f["type"] == "sidecar_message" and f["payload"].get("message", {}).get("prompt") == "back"
        )
        # the shell's own exit status, read from systemd
        await c.send("pty_write", {"id": pty, "data": "exit 7\n"})
        end = await c.until(lambda f: f["type"] == "pty_exit")
        await c.connection.close()
        return [end]

    (end,) = asyncio.run(after())
    assert end == {"type": "pty_exit", "sessionId": pty, "payload": {"exitCode": 7}}
    assert mgr.unit_property(sidecar, "MainPID") != launcher_pid  # restarted after the crash
    wait_for("the terminal's unit gone", lambda: mgr.unit_property(terminal, "LoadState") == "not-found", 10)

    # a stop (not a restart) ends the sessions: their sidecar units stop too
    mgr.systemctl("stop", UNIT, check=True)
    wait_for("the sidecar stopped", lambda: mgr.unit_property(sidecar, "ActiveState") == "inactive", 10)
    assert "sessions kept" not in "\n".join(mgr.journal_lines(UNIT, identifier="agor-relay")).split("took over")[-1]


async def refused(url: str, token: str, known: Path) -> str:
    try:
        connection = await connect(url, token, known_hosts=known)
    except Exception as e:  # Refused: "... refused with HTTP 401 Invalid token"
        return str(e).split("HTTP ")[1].split()[0]
    await connection.close()
    return "101"


def test_install_without_a_token_file_says_how_to_make_one(user_manager, echo_sidecar_path):
    mgr = user_manager
    command = json.dumps([PYTHON, str(echo_sidecar_path)])
    mgr.write_file(".config/agor/units.toml", f"[sidecar]\ncommand = {command}\n\n[relay]\nenabled = true\n")
    (mgr.home / ".config/agor/relay-token").unlink(missing_ok=True)
    cp = agor_units(mgr, "install")
    assert cp.returncode == 1 and "relay-token does not exist: make it with `head -c 32 /dev/urandom" in cp.stderr
    assert not (mgr.unit_dir / UNIT).exists()
