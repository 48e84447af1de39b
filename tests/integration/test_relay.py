"""agor-relay.service under real user managers (252 and 254): the token as a systemd credential,
never in the unit, the command lines, `systemctl show` or the journal; a controller's session with
its sidecar under the launcher inside the unit; reload and restart."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from pathlib import Path

from agor_systemd.lab.testbed import OPT_ROOT
from agor_systemd.relay.client import connect, peer_certificate
from agor_systemd.relay.tls import certificate_pin, der_of_pem

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

    # a restart: the relay is back at once; sessions lived in the old process (a new one starts)
    mgr.systemctl("restart", UNIT, check=True)
    mgr.wait_property(UNIT, "ActiveState", "active", timeout=20)
    known.unlink()
    again = asyncio.run(session_round_trip(url, token, known, session=result["ready"]["payload"]["session"]))
    assert again["ready"]["payload"]["resumed"] is False and again["echo"]["payload"]["type"] == "echo"


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
