"""Readiness, watchdog and STATUS= under a real systemd user manager, on every build here."""

from __future__ import annotations

import json
import time

from .support import (
    LOG_ID,
    UNIT,
    health,
    install_sidecar,
    wait_for,
    wait_health,
)

FAST = ["--watchdog-s=2"]


def test_sigstopped_sidecar_is_caught_by_the_watchdog(user_manager, fake_sidecar_path):
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["stop-self:0.5"], attempts=1, install_args=FAST)
    failed = wait_health(user_manager, "failed", timeout=15)
    assert failed.health == {"status": "failed", "attempts": 1, "last_error": "watchdog timeout"}
    assert user_manager.unit_property(UNIT, "Result") == "watchdog"
    starts = sidecar.start_times()
    assert len(starts) == 2
    # hung at start + 0.5 s; the launcher sees the T state within 0.25 s and triggers the watchdog,
    # so the restart (after the 0.2 s delay) comes well within WatchdogSec (2 s) + 0.5 s of the hang
    detection = starts[1] - (starts[0] + 0.5)
    assert 0.2 <= detection <= 2.5, detection
    lines = user_manager.journal_lines(UNIT, identifier=LOG_ID)
    assert any("is hung: stopped (T state)" in line for line in lines), lines[-10:]


def test_busy_loop_without_output_is_a_hang(user_manager, fake_sidecar_path):
    sidecar = install_sidecar(
        user_manager, fake_sidecar_path, ["spin:0.5"], attempts=1, install_args=[*FAST, "--activity-timeout-s=1"]
    )
    failed = wait_health(user_manager, "failed", timeout=25)
    assert failed.health["last_error"] == "watchdog timeout"
    assert len(sidecar.starts()) == 2
    assert any("no output for 1 s" in line for line in user_manager.journal_lines(UNIT, identifier=LOG_ID))


def test_failing_probe_is_a_hang(user_manager, fake_sidecar_path):
    flag = user_manager.write_file("alive", "")
    install_sidecar(
        user_manager,
        fake_sidecar_path,
        ["hang"],
        attempts=0,
        install_args=[*FAST, f"--probe=exec:test -e {flag}", "--probe-timeout-s=1"],
    )
    wait_health(user_manager, "healthy", timeout=5)
    time.sleep(1.5)
    assert health(user_manager).health["status"] == "healthy"  # the probe passes: pings go on
    flag.unlink()
    failed = wait_health(user_manager, "failed", timeout=10)
    assert failed.health == {"status": "failed", "attempts": 0, "last_error": "watchdog timeout"}
    assert any("probe exited with status 1" in line for line in user_manager.journal_lines(UNIT, identifier=LOG_ID))


def test_never_ready_fails_the_attempt(user_manager, fake_sidecar_path):
    sidecar = install_sidecar(
        user_manager, fake_sidecar_path, ["never-ready"], attempts=1, install_args=["--ready-timeout-s=1"]
    )
    wait_for("first start", lambda: sidecar.starts(), timeout=5)
    status = user_manager.systemctl("status", UNIT).stdout
    assert 'Status: "waiting for readiness (line)' in status, status
    assert health(user_manager).health["status"] in ("starting", "restarting")
    failed = wait_health(user_manager, "failed", timeout=10)
    assert failed.health == {"status": "failed", "attempts": 1, "last_error": "not ready within 1 s"}
    assert len(sidecar.starts()) == 2


def test_ready_line_gates_readiness(user_manager, fake_sidecar_path):
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["late-ready:1.5"])
    wait_for("first start", lambda: sidecar.starts(), timeout=5)
    assert user_manager.unit_property(UNIT, "ActiveState") == "activating"
    assert health(user_manager).health == {"status": "starting"}
    wait_health(user_manager, "healthy", timeout=5)
    ready_after = time.clock_gettime(time.CLOCK_MONOTONIC) - sidecar.start_times()[0]
    assert ready_after >= 1.5
    status = user_manager.systemctl("status", UNIT).stdout
    pid = sidecar.starts()[0]["pid"]
    # with agor-sidecar.socket the text goes on: "; no client, buffering 1 lines" (test_socket.py)
    assert f'Status: "ready; pid {pid}; up ' in status and "attempt 0/5; sandbox full" in status, status


def test_socket_readiness(user_manager, fake_sidecar_path):
    sock = user_manager.write_file("sidecar-data/.keep", "").parent / "sidecar.sock"  # writable in the sandbox
    sock.unlink(missing_ok=True)
    sidecar = install_sidecar(
        user_manager, fake_sidecar_path, [f"socket:{sock}"], install_args=[f"--ready=socket:{sock}"]
    )
    wait_for("first start", lambda: sidecar.starts(), timeout=5)
    assert user_manager.unit_property(UNIT, "ActiveState") == "activating"
    wait_health(user_manager, "healthy", timeout=5)
    assert sock.is_socket()


def test_sidecar_output_reaches_the_journal_with_priorities(user_manager, fake_sidecar_path):
    install_sidecar(user_manager, fake_sidecar_path, ["log"])
    wait_health(user_manager, "healthy", timeout=5)
    expected = {
        "plain stdout line": 6,
        "stdout line marked as an error": 3,
        "plain stderr line": 4,
        "stderr line marked as debug": 7,
        '{"type":"ready"}': 6,
    }

    def records() -> dict[str, int]:
        user_manager.namespace.sync_journal()
        out = user_manager.journalctl("--user", "-u", UNIT, "-o", "json").stdout
        found = {}
        for line in out.splitlines():
            entry = json.loads(line)
            if entry.get("MESSAGE") in expected and entry.get("SYSLOG_IDENTIFIER") == "agor-sidecar":
                found[entry["MESSAGE"]] = int(entry["PRIORITY"])
        return found if len(found) == len(expected) else {}

    assert wait_for("all records in the journal", records, timeout=5) == expected


def test_every_journal_record_keeps_its_priority(user_manager, fake_sidecar_path):
    """Lines longer than journald's LineMax (which counts the <N> prefix), <8>, a NUL byte."""

    def entries() -> list[dict]:
        user_manager.namespace.sync_journal()
        out = user_manager.journalctl("--user", "-t", LOG_ID, "-o", "json", "--all").stdout
        return [json.loads(line) for line in out.splitlines()]

    seen = len(entries())
    install_sidecar(user_manager, fake_sidecar_path, ["log-edges"])
    wait_health(user_manager, "healthy", timeout=5)
    others = {"<8>eight", "before NUL", "after NUL"}

    def records() -> list[tuple[str, int]]:
        found = [
            (entry["MESSAGE"], int(entry["PRIORITY"]))
            for entry in entries()[seen:]
            if (isinstance(entry.get("MESSAGE"), str) and entry["MESSAGE"][:1] in ("x", "y"))
            or entry.get("MESSAGE") in others
        ]
        complete = sum(len(m) for m, _ in found if m[0] in "xy") >= 130000 and {m for m, _ in found} >= others
        return found if complete else []

    found = wait_for("all records in the journal", records, timeout=10)
    assert sorted((m, p) for m, p in found if m in others) == [("<8>eight", 4), ("after NUL", 4), ("before NUL", 4)]
    for char, length, priority in (("x", 70000, 3), ("y", 60000, 4)):
        parts = [(m, p) for m, p in found if m[0] == char]
        assert "".join(m for m, _ in parts) == char * length, [len(m) for m, _ in parts]
        assert {p for _, p in parts} == {priority}, [(len(m), p) for m, p in parts]


def test_watchdog_interval_is_the_units(user_manager, fake_sidecar_path):
    install_sidecar(user_manager, fake_sidecar_path, ["hang"], install_args=["--watchdog-s=7"])
    wait_health(user_manager, "healthy", timeout=5)
    assert user_manager.unit_property(UNIT, "WatchdogUSec") == "7s"
    assert user_manager.unit_property(UNIT, "WatchdogTimestampMonotonic") != "0"  # pinged since READY
