"""Traces from real programs to a real OTLP/HTTP receiver (agor_systemd.lab.otlp_receiver).

A crash loop of a real unit — crash, restart, crash, give-up, `agor-units restart` — arrives as
one trace id, rooted in the `agor-units install` that began it, the manual restart linked; the
launcher's journal lines of that run are found by `journalctl --user TRACE_ID=<id>`; and 200
invocations of agor-units each deliver their spans.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from agor_systemd.lab.otlp_receiver import Receiver
from agor_systemd.lab.testbed import OPT_ROOT
from agor_systemd.walcheck import OUTCOMES, SEVERITY

from .support import LOG_ID, UNIT, agor_units, install_sidecar, wait_health

ATTEMPTS = 2  # restarts before the give-up: 3 starts crash


@pytest.fixture
def units_toml(user_manager) -> Iterator[Callable[[str], object]]:
    """Write the test user's units.toml; removed afterwards (the user, and later tests, live on)."""
    path = user_manager.home / ".config/agor/units.toml"
    yield lambda text: user_manager.write_file(".config/agor/units.toml", text)
    path.unlink(missing_ok=True)


def exit_status_of(outcomes: list[str]) -> int:
    statuses = [OUTCOMES[o] for o in outcomes]
    return next((s for s in SEVERITY if s in statuses), 0)


def test_a_crash_loop_give_up_and_manual_restart_are_one_trace(user_manager, fake_sidecar_path, units_toml):
    with Receiver() as receiver:
        env = {"AGOR_OTLP_ENDPOINT": receiver.endpoint, "AGOR_OTLP_FLUSH_TIMEOUT_S": "5"}
        # the default flush timeout (0.25 s) is for a collector that is down; on a loaded test
        # machine the SDK alone may take longer to load, and this test counts spans, not time
        units_toml("[telemetry]\nflush_timeout_s = 5\n")
        sidecar = install_sidecar(
            user_manager,
            fake_sidecar_path,
            ["exit:3"] * (ATTEMPTS + 1) + ["hang"],
            attempts=ATTEMPTS,
            install_args=[f"--otlp-endpoint={receiver.endpoint}"],
            env=env,
        )
        wait_health(user_manager, "failed", timeout=20)
        agor_units(user_manager, "restart", check=True, env=env)
        wait_health(user_manager, "healthy", timeout=10)

        def complete(spans) -> bool:  # the 4th attempt is running: only its sidecar.start span is sent
            names = [s.name for s in spans]
            return names.count("sidecar.attempt") >= ATTEMPTS + 1 and names.count("sidecar.start") >= ATTEMPTS + 2

        spans = receiver.wait_for(complete, timeout=15)
        by_name: dict[str, list] = {}
        for s in spans:
            by_name.setdefault(s.name, []).append(s)
        install = next(s for s in by_name["agor-units install"])
        restart = next(s for s in by_name["agor-units restart"])
        attempts = sorted(by_name["sidecar.attempt"], key=lambda s: s.start_ns)
        assert len(attempts) == ATTEMPTS + 1, [s.attributes for s in attempts]

        # one trace: every attempt, wait and start is a child of the install's span
        run = [*attempts, *by_name["sidecar.restart_wait"], *by_name["sidecar.start"]]
        assert {s.trace_id for s in run} == {install.trace_id}
        assert {s.parent_id for s in [*attempts, *by_name["sidecar.restart_wait"]]} == {install.span_id}
        assert restart.trace_id != install.trace_id  # the restart is a command of its own ...

        # ... which the attempt after the give-up links to
        assert [a.attributes["start"] for a in attempts] == ["start"] + ["restart"] * ATTEMPTS
        assert all(s.service == "agor-launch" and s.resource["systemd.unit"] == UNIT for s in attempts)
        for k, attempt in enumerate(attempts):
            assert attempt.attributes["attempt"] == k
            assert attempt.status == 2 and attempt.status_message == "exited with status 3"
            assert ("crash", {"cause": "exited with status 3"}) in attempt.events
        assert [e for e, _ in attempts[-1].events].count("give_up") == 1
        assert attempts[-1].attributes["gave_up"] is True
        assert len(by_name["sidecar.restart_wait"]) == ATTEMPTS

        # the manual restart's attempt is still running: the sidecar got TRACEPARENT naming it
        starts = sidecar.starts()
        assert len(starts) == ATTEMPTS + 2
        running = starts[-1]["env"]["TRACEPARENT"].split("-")
        assert running[1] == install.trace_id
        manual = [s for s in by_name["sidecar.start"] if s.parent_id == running[2]]
        assert manual, "the manual restart's sidecar.start span is missing"
        crashed = [start["env"]["TRACEPARENT"].split("-")[2] for start in starts[: ATTEMPTS + 1]]
        assert crashed == [a.span_id for a in attempts]

        # its span arrives when it ends: stop it, then find the link to the restart command
        agor_units(user_manager, "uninstall", check=True, env=env)
        spans = receiver.wait_for(lambda s: sum(x.name == "sidecar.attempt" for x in s) == ATTEMPTS + 2, timeout=10)
        last = max((s for s in spans if s.name == "sidecar.attempt"), key=lambda s: s.start_ns)
        assert last.trace_id == install.trace_id and last.span_id == running[2]
        assert last.attributes["start"] == "manual restart"
        assert last.links == [(restart.trace_id, restart.span_id)]
        assert [e for e, _ in last.events][-1] == "stop"

    # the journal: the launcher's lines of this run carry its trace id
    user_manager.namespace.sync_journal()
    cp = user_manager.journalctl("--user", f"TRACE_ID={install.trace_id}", "-o", "json", timeout=30)
    entries = [json.loads(line) for line in cp.stdout.splitlines() if line.strip()]
    messages = [e["MESSAGE"] for e in entries]
    assert all(e["SYSLOG_IDENTIFIER"] == LOG_ID for e in entries)
    assert {e["SPAN_ID"] for e in entries} <= {s.span_id for s in attempts} | {last.span_id}
    assert sum("restart 1/2 follows" in m for m in messages) == 1, messages
    assert sum("giving up after 2 restarts" in m for m in messages) == 1, messages
    assert any("after a stop request" in m for m in messages), messages
    assert all(e["PRIORITY"] in "34567" for e in entries)


def test_two_hundred_cli_invocations_deliver_every_span(tmp_path, project_venv):
    """Each `agor-units log` sends two spans: the command's and the agor.log span with the record."""
    runs = 200
    with Receiver() as receiver:
        env = {
            **os.environ,
            "AGOR_OTLP_ENDPOINT": receiver.endpoint,
            # the default 0.25 s is for a collector that is down; a test machine under load may
            # need longer to load the SDK, and this test counts spans, not time
            "AGOR_OTLP_FLUSH_TIMEOUT_S": "10",
            "XDG_CONFIG_HOME": str(tmp_path),
        }
        program = str(OPT_ROOT / "venv" / "bin" / "agor-units")

        def invoke(n: int) -> subprocess.CompletedProcess[str]:
            argv = [program, "log", "info", "agent-started", f"n={n}", "provider=claude"]
            return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

        # one at a time: the other pytest worker runs timing-sensitive restart tests on 2 cores
        done = [invoke(n) for n in range(runs)]
        assert [cp.returncode for cp in done] == [0] * runs, [cp.stderr for cp in done if cp.returncode]
        # nothing on stderr but the record itself where no journald listens (its fallback)
        fallback = [f"agor: agent-started n={n} provider=claude\n" for n in range(runs)]
        assert [cp.stderr for cp in done if cp.stderr] in ([], fallback)
        spans = receiver.wait_for(lambda s: len(s) >= 2 * runs, timeout=10)

    commands = [s for s in spans if s.name == "agor-units log"]
    logs = [s for s in spans if s.name == "agor.log"]
    assert len(commands) == runs and len(logs) == runs and len(spans) == 2 * runs
    assert all(s.service == "agor-units" and s.attributes == {"command": "log", "exit.status": 0} for s in commands)
    assert sorted(int(s.events[0][1]["n"]) for s in logs) == list(range(runs))
    parents = {s.span_id: s for s in commands}
    for log in logs:
        assert parents[log.parent_id].trace_id == log.trace_id
        assert log.events == [("agent-started", {"level": "info", "n": log.events[0][1]["n"], "provider": "claude"})]
    assert set(receiver.paths) == {"/v1/traces"}


def test_walcheck_run_by_its_unit_traces_each_database(user_manager, units_toml):
    """The timer's service carries the endpoint (Environment=), a span per database arrives."""
    with Receiver() as receiver:
        units_toml(f'[telemetry]\notlp_endpoint = "{receiver.endpoint}"\nflush_timeout_s = 5\n')
        agor_units(user_manager, "install", "--", "/bin/sleep", "infinity", check=True)
        user_manager.systemctl("start", "agor-walcheck.service", timeout=60)
        spans = receiver.wait_for(lambda s: sum(x.name == "walcheck.checkpoint" for x in s) >= 2, timeout=15)
        agor_units(user_manager, "uninstall", check=True)
    checks = [s for s in spans if s.name == "walcheck.checkpoint"]
    root = next(s for s in spans if s.name == "agor-walcheck")
    assert sorted(s.attributes["database"] for s in checks) == [
        f"{user_manager.home}/.local/share/agor/btmsg.db",
        f"{user_manager.home}/.local/share/agor/sessions.db",
    ]
    assert all(s.parent_id == root.span_id and s.attributes["outcome"] in OUTCOMES for s in checks)
    # the program's span has its exit status, which the outcomes decide
    assert root.attributes["exit.status"] == exit_status_of([s.attributes["outcome"] for s in checks])
    assert (root.status == 2) == (root.attributes["exit.status"] != 0)
    assert len(root.resource["systemd.invocation_id"]) == 32  # run by systemd: journalctl _SYSTEMD_INVOCATION_ID=


def test_a_watchdog_trigger_is_an_event_of_its_attempt(user_manager, fake_sidecar_path, units_toml):
    with Receiver() as receiver:
        units_toml("[telemetry]\nflush_timeout_s = 5\n")
        install_sidecar(
            user_manager,
            fake_sidecar_path,
            ["stop-self:0.5", "hang"],
            install_args=[f"--otlp-endpoint={receiver.endpoint}", "--watchdog-s=1"],
        )
        spans = receiver.wait_for(lambda s: any(x.name == "sidecar.attempt" for x in s), timeout=15)
        wait_health(user_manager, "healthy", timeout=10)
    (hung,) = [s for s in spans if s.name == "sidecar.attempt"]
    events = [name for name, _ in hung.events]
    assert events == ["ready", "watchdog.trigger", "watchdog.timeout", "crash"], hung.events
    assert dict(hung.events)["watchdog.trigger"] == {"reason": "stopped (T state)"}
    assert hung.status_message == "watchdog timeout (stopped (T state))"


def test_the_log_bridge_writes_to_the_journal_with_priorities_and_trace_ids(user_manager):
    with Receiver() as receiver:
        env = {"AGOR_OTLP_ENDPOINT": receiver.endpoint, "AGOR_OTLP_FLUSH_TIMEOUT_S": "5"}
        agor_units(user_manager, "log", "warn", "context-pressure", "sessionId=s1", "percent=91", check=True, env=env)
        records = [
            '{"level": "info", "event": "agent-started", "attrs": {"sessionId": "s2", "provider": "claude"}}',
            "{broken",
            '{"level": "error", "event": "sidecar-crash", "attrs": {"restartAttempts": 3}}',
        ]
        cp = user_manager.run(
            [str(OPT_ROOT / "venv" / "bin" / "agor-units"), "log", "--stream"], input="\n".join(records) + "\n", env=env
        )
        assert cp.returncode == 0 and cp.stderr.startswith("agor-units: log: line 2: not JSON"), cp.stderr
        spans = receiver.wait_for(lambda s: sum(x.name == "agor.log" for x in s) >= 2, timeout=10)
    user_manager.namespace.sync_journal()
    journal = user_manager.journalctl("--user", "-t", "agor", "-o", "json", timeout=30)
    entries = [json.loads(line) for line in journal.stdout.splitlines() if line.strip()][-3:]
    assert [(e["PRIORITY"], e["AGOR_EVENT"], e["MESSAGE"]) for e in entries] == [
        ("4", "context-pressure", "context-pressure sessionId=s1 percent=91"),
        ("6", "agent-started", "agent-started sessionId=s2 provider=claude"),
        ("3", "sidecar-crash", "sidecar-crash restartAttempts=3"),
    ]
    logs = {s.span_id: s for s in spans if s.name == "agor.log"}
    assert {e["SPAN_ID"] for e in entries} == set(logs)
    assert sorted(name for s in logs.values() for name, _ in s.events) == [
        "agent-started",
        "context-pressure",
        "sidecar-crash",
    ]
