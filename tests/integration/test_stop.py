"""A stop on a real systemd user manager: everyone in the unit gets SIGTERM and time to finish,
the unit ends `inactive` whatever the sidecar's exit status, and no stale STATUS= stays behind."""

from __future__ import annotations

import time

from .support import (
    LOG_ID,
    UNIT,
    agor_units,
    health,
    install_sidecar,
    wait_for,
    wait_health,
)

# the agent's flush takes 0.3 s; a loaded 2-core CI box gets the rest
STOP_MAX_S = 5.0


def test_stop_gives_the_agents_sigterm_and_time_to_flush(user_manager, fake_sidecar_path):
    """Two agents trap SIGTERM and take 0.3 s to flush: one still writes to the sidecar's stdout,
    one has its own output. Both finish; the first one's last line reaches the journal."""
    flag = user_manager.write_file("sidecar-data/.keep", "").parent / "agents-flushed"
    flag.unlink(missing_ok=True)
    seen = len(user_manager.journal_lines(UNIT, identifier=LOG_ID))
    install_sidecar(user_manager, fake_sidecar_path, [f"agents:{flag}"])
    wait_for(
        "the agents", lambda: "agents: working" in user_manager.journal_lines(UNIT, identifier=LOG_ID)[seen:], timeout=5
    )
    started = time.monotonic()
    user_manager.systemctl("stop", UNIT, check=True, timeout=120)
    stop_s = time.monotonic() - started
    print(f"stop with two SIGTERM-trapping agents took {stop_s:.3f} s")
    assert flag.exists() and sorted(flag.read_text().splitlines()) == ["1 TERM", "2 TERM"], (
        "an agent got no SIGTERM, or no time to flush"
    )
    assert "agent 1: flushed after SIGTERM" in user_manager.journal_lines(UNIT, identifier=LOG_ID)[seen:]
    assert 0.3 <= stop_s <= STOP_MAX_S, stop_s
    assert user_manager.unit_property(UNIT, "ActiveState") == "inactive"
    assert user_manager.unit_property(UNIT, "Result") == "success"


def test_the_sidecar_gets_one_sigterm_on_a_stop(user_manager, fake_sidecar_path):
    """systemd signals everyone in the unit; the launcher must not send the sidecar a second one
    (a Node sidecar with process.once('SIGTERM', …) would die of it mid-shutdown)."""
    counted = user_manager.write_file("sidecar-data/.keep", "").parent / "sigterms"
    counted.unlink(missing_ok=True)
    install_sidecar(user_manager, fake_sidecar_path, [f"count-term:{counted}"])
    wait_health(user_manager, "healthy", timeout=5)
    user_manager.systemctl("stop", UNIT, check=True)
    assert counted.read_text() == "TERM\n"


def test_sigterm_to_the_launcher_alone_is_forwarded(user_manager, fake_sidecar_path):
    """`kill $MAINPID`: only the launcher gets it, so it passes it on; as for any unrequested
    exit of the main process, systemd restarts the unit."""
    counted = user_manager.write_file("sidecar-data/.keep", "").parent / "sigterms"
    counted.unlink(missing_ok=True)
    sidecar = install_sidecar(user_manager, fake_sidecar_path, [f"count-term:{counted}", "hang"])
    wait_health(user_manager, "healthy", timeout=5)
    user_manager.systemctl("kill", "--kill-whom=main", "--signal=TERM", UNIT, check=True)
    wait_for("the restart", lambda: len(sidecar.starts()) == 2, timeout=10)
    assert counted.read_text() == "TERM\n"


def test_nonzero_exit_on_sigterm_is_a_clean_stop(user_manager, fake_sidecar_path):
    """A sidecar exiting 7 on SIGTERM (a JVM's 143, exit(1) handlers): stop and restart never fail."""
    seen = len(user_manager.journal_lines(UNIT))
    seen_own = len(user_manager.journal_lines(UNIT, identifier=LOG_ID))
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["term-exit:7"])
    wait_health(user_manager, "healthy", timeout=5)
    user_manager.systemctl("restart", UNIT, check=True)
    wait_health(user_manager, "healthy", timeout=5)
    user_manager.systemctl("stop", UNIT, check=True)
    lines = user_manager.journal_lines(UNIT)[seen:]
    assert not [line for line in lines if "Failed with result" in line], lines[-10:]
    assert user_manager.unit_property(UNIT, "ActiveState") == "inactive"
    assert user_manager.unit_property(UNIT, "Result") == "success"
    assert agor_units(user_manager, "health", "--json").returncode == 5  # stopped
    assert health(user_manager).health == {"status": "stopped"}
    assert len(sidecar.starts()) == 2  # install + restart; a stop is not a crash
    own = user_manager.journal_lines(UNIT, identifier=LOG_ID)[seen_own:]
    assert sum("exited with status 7 after a stop request" in line for line in own) == 2, own[-10:]


def keep_loaded(user_manager) -> None:
    """As on a desktop, let default.target's Wants= hold the unit (it learns of `enable` at a reload):
    a unit nothing references is unloaded once stopped, which would hide a stale StatusText."""
    user_manager.systemctl("daemon-reload", check=True)


def test_stop_leaves_no_stale_status(user_manager, fake_sidecar_path):
    install_sidecar(user_manager, fake_sidecar_path, ["hang"])
    keep_loaded(user_manager)
    wait_health(user_manager, "healthy", timeout=5)
    assert user_manager.unit_property(UNIT, "StatusText").startswith("ready; pid ")
    invocation = user_manager.unit_property(UNIT, "InvocationID")
    user_manager.systemctl("stop", UNIT, check=True)
    assert user_manager.unit_property(UNIT, "InvocationID") == invocation  # still the run that was stopped
    assert user_manager.unit_property(UNIT, "StatusText") == ""
    assert "Status:" not in user_manager.systemctl("status", UNIT).stdout


def test_stop_during_the_launchers_wait_leaves_no_stale_status(user_manager, fake_sidecar_path):
    """base 2, cap 5: 2, 4, 5 s is no schedule systemd can express, so the launcher waits (any version)."""
    seen = len(user_manager.journal_lines(UNIT))
    install_sidecar(user_manager, fake_sidecar_path, ["exit:3", "hang"], base_s=2, cap_s=5, attempts=3)
    keep_loaded(user_manager)
    wait_for(
        "the launcher's wait",
        lambda: "before restart 1/3" in user_manager.unit_property(UNIT, "StatusText"),
        timeout=10,
    )
    invocation = user_manager.unit_property(UNIT, "InvocationID")
    user_manager.systemctl("stop", UNIT, check=True)
    journal = user_manager.journal_lines(UNIT)[seen:]
    assert user_manager.unit_property(UNIT, "InvocationID") == invocation, journal
    assert user_manager.unit_property(UNIT, "ActiveState") == "inactive", journal
    assert user_manager.unit_property(UNIT, "StatusText") == "", journal
