"""btmsg's and agor-relay's spans at a real OTLP/HTTP receiver (docs/telemetry.md): sends, dead letters,
heartbeats that redeliver, sweep results; relay admissions, auth failures, connections, commands.
Tracing off, `btmsg heartbeat` loads nothing of OpenTelemetry."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agor_systemd.lab.otlp_receiver import Receiver
from tests.relay_support import controller, next_frame, start_relay

REPO = Path(__file__).resolve().parent.parent
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def btmsg(data: Path, *args: str, env: dict[str, str], agent: str = "mgr") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agor_systemd.btmsg", *args],
        env={**env, "AGOR_DATA_DIR": str(data), "BTMSG_AGENT_ID": agent, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGOR_OTLP", "TRACEPARENT", "OTEL_"))}
    return {**env, **extra}


def test_btmsg_spans_dead_letters_redelivery_and_the_sweep(tmp_path, receiver):
    off = clean_env()
    for args in (("register", "mgr", "M", "manager", "g"), ("register", "dev", "D", "project", "g")):
        assert btmsg(tmp_path, *args, env=off).returncode == 0
    assert btmsg(tmp_path, "allow", "mgr", "dev", "-b", env=off).returncode == 0
    on = clean_env(AGOR_OTLP_ENDPOINT=receiver.endpoint, AGOR_OTLP_FLUSH_TIMEOUT_S="10")

    sent = btmsg(tmp_path, "send", "dev", "hello", env={**on, "TRACEPARENT": f"00-{TRACE}-{PARENT}-01"})
    assert sent.returncode == 3
    spans = receiver.wait_for(lambda spans: any(s.name == "btmsg.send" for s in spans))
    root = next(s for s in spans if s.parent_id == PARENT)
    assert (root.name, root.service, root.trace_id, root.attributes["exit.status"]) == ("btmsg send", "btmsg", TRACE, 3)
    send = next(s for s in spans if s.name == "btmsg.send")
    assert send.parent_id == root.span_id and send.attributes["delivered"] is False
    [(event, attributes)] = send.events
    assert event == "dead_letter" and attributes["reason"] == "stale" and attributes["recipient"] == "dev"

    assert btmsg(tmp_path, "heartbeat", env=on, agent="dev").returncode == 0
    spans = receiver.wait_for(lambda spans: any(s.name == "btmsg.heartbeat" for s in spans))
    heartbeat = next(s for s in spans if s.name == "btmsg.heartbeat")
    assert heartbeat.attributes["redelivered"] == 1
    assert [e for e, _ in heartbeat.events] == ["dead_letter_redelivered"]
    assert next(s for s in spans if s.span_id == heartbeat.parent_id).name == "btmsg heartbeat"

    assert btmsg(tmp_path, "sweep", env=on).returncode == 0
    spans = receiver.wait_for(lambda spans: any(s.name == "btmsg.sweep" for s in spans))
    sweep = next(s for s in spans if s.name == "btmsg.sweep")
    assert sweep.attributes["agents"] == 2 and sweep.attributes["agents.healthy"] == 1
    assert sweep.attributes["agents.stale"] == 1 and sweep.attributes["needs_attention"] is False


def test_btmsg_heartbeat_off_loads_nothing_of_opentelemetry(tmp_path):
    assert btmsg(tmp_path, "register", "dev", "D", "project", "g", env=clean_env()).returncode == 0
    code = (
        "import sys; from agor_systemd.btmsg import cli; cli.main(['heartbeat']); "
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'agor_systemd.otlp', 'threading'))))"
    )
    env = clean_env(AGOR_DATA_DIR=str(tmp_path), BTMSG_AGENT_ID="dev", AGOR_OTLP_ENDPOINT="")
    cp = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert cp.stdout.strip() == "[]", cp.stderr


def test_relay_spans_admissions_auth_failures_connections_and_commands(tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("AGOR_OTLP_ENDPOINT", receiver.endpoint)
    relay = start_relay(tmp_path / "relay", "--max-connections", "8", sidecar=False)
    try:

        async def scenario() -> None:
            try:
                await controller(relay, token="wrong")
            except Exception:
                pass
            connection = await controller(relay)
            await next_frame(connection, "ready")
            await connection.send('{"id": "c1", "type": "pty_create", "payload": {"shell": "/bin/sh"}}')
            await next_frame(connection, "pty_created")
            await connection.send('{"id": "c2", "type": "agent_query", "payload": {}}')
            await next_frame(connection, "error")  # this relay runs no sidecar
            await connection.close()

        asyncio.run(scenario())
        spans = receiver.wait_for(lambda spans: any(s.name == "relay.connection" for s in spans), timeout=15)
    finally:
        relay.stop()
    admits = [s for s in spans if s.name == "relay.admit"]
    assert sorted(s.attributes["http.status"] for s in admits) == [101, 401]
    refused = next(s for s in admits if s.attributes["http.status"] == 401)
    assert refused.status == 2 and refused.status_message == "wrong token"
    connection = next(s for s in spans if s.name == "relay.connection")
    commands = {s.attributes["type"]: s for s in spans if s.name == "relay.command"}
    assert set(commands) == {"pty_create", "agent_query"}
    assert all(s.parent_id == connection.span_id and s.trace_id == connection.trace_id for s in commands.values())
    assert commands["agent_query"].status == 2 and "no sidecar" in commands["agent_query"].status_message
    assert {s.service for s in spans} == {"agor-relay"}
