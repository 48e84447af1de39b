"""The sidecar under a real systemd user manager, on every systemd build available here.

Each measured gap between starts must be at least its scheduled delay and late by at most
LATE_MAX_S: systemd arms its restart timer with 250 ms accuracy (native mode), and the
launcher adds its own start-up.
"""

from __future__ import annotations

import time

import pytest

from agor_systemd.backoff import RestartPolicy, schedule

from .support import UNIT, agor_units, gaps, health, install_sidecar, wait_for, wait_health

LATE_MAX_S = 0.4


def assert_gaps(times: list[float], delays: list[float], runtimes: list[float] | None = None) -> None:
    runtimes = runtimes or [0.0] * len(delays)
    print("lateness (s):", [round(g - r - d, 3) for g, d, r in zip(gaps(times), delays, runtimes)])
    for k, (gap, delay, ran) in enumerate(zip(gaps(times), delays, runtimes), start=1):
        late = gap - ran - delay
        assert late >= -0.005, f"restart {k} came {-late:.3f}s early (gap {gap:.3f}s, delay {delay}s)"
        assert late <= LATE_MAX_S, f"restart {k} was {late:.3f}s late (gap {gap:.3f}s, delay {delay}s)"


def test_full_schedule_give_up_and_manual_restart(user_manager, fake_sidecar_path):
    """Defaults: restarts after 1, 2, 4, 8, 16 s; failed at once after the 6th crash; manual restart."""
    delays = schedule(RestartPolicy())
    assert delays == [1, 2, 4, 8, 16]
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["exit:3"] * 6 + ["hang"], base_s=1)

    samples = []
    failed = None
    deadline = time.monotonic() + sum(delays) + 15
    while time.monotonic() < deadline:
        sample = health(user_manager)
        samples.append(sample)
        if sample.health["status"] == "failed":
            failed = sample
            break
        time.sleep(0.15)
    assert failed is not None, f"never failed; last health {samples[-1].health}"
    starts = sidecar.start_times()
    assert len(starts) == 6, f"expected 6 starts before give-up, got {len(starts)}"
    assert_gaps(starts, delays)
    # failed at once: systemd's own timestamp of the failure follows the 6th start (which crashed
    # within milliseconds) by far less than any delay
    failed_at = int(user_manager.unit_property(UNIT, "InactiveEnterTimestampMonotonic")) / 1e6
    assert 0 < failed_at - starts[-1] < 0.5, failed_at - starts[-1]
    assert failed.health == {"status": "failed", "attempts": 5, "last_error": "exited with status 3"}

    # during every wait, health named the attempt and predicted the restart it preceded
    for k in range(1, 6):
        waits = [s for s in samples if s.health.get("status") == "restarting" and s.health.get("attempt") == k
                 and s.health["next_retry_s"] > 0.3]
        assert waits, f"no 'restarting attempt {k}' reading during the {delays[k - 1]}s wait"
        for s in waits:
            predicted_low = s.before + s.health["next_retry_s"]
            predicted_high = s.after + s.health["next_retry_s"]
            actual = starts[k]
            assert predicted_low - LATE_MAX_S <= actual <= predicted_high + LATE_MAX_S, (
                f"attempt {k}: predicted restart in [{predicted_low:.3f}, {predicted_high:.3f}], "
                f"happened at {actual:.3f}")

    time.sleep(1.5)
    assert len(sidecar.starts()) == 6, "systemd restarted the sidecar after giving up"
    status = user_manager.systemctl("status", UNIT)
    assert "gave up after 5 restarts; sidecar crashed: exited with status 3" in status.stdout

    agor_units(user_manager, "restart", check=True)
    wait_health(user_manager, "healthy", timeout=5)
    assert len(sidecar.starts()) == 7
    assert user_manager.unit_property(UNIT, "NRestarts") == "0"


CRASHES = [
    ("exit:3", "exited with status 3"),
    ("exit:0", "exited with status 0"),
    ("signal:KILL", "killed by SIGKILL"),
    ("signal:TERM", "killed by SIGTERM"),
    ("dump", "killed by SIGSEGV (core dumped)"),
]


@pytest.mark.parametrize(("behaviour", "cause"), CRASHES, ids=[c[0] for c in CRASHES])
def test_every_unrequested_exit_is_a_crash(user_manager, fake_sidecar_path, behaviour, cause):
    """Non-zero exit, exit 0, signals and core dumps all restart, then give up with the cause named."""
    workdir = user_manager.write_file("crash-dir/.keep", "").parent
    sidecar = install_sidecar(user_manager, fake_sidecar_path, [behaviour], base_s=0.2, attempts=2,
                              install_args=[f"--working-directory={workdir}", f"--read-write-path={workdir}"])
    failed = wait_health(user_manager, "failed", timeout=10)
    assert failed.health == {"status": "failed", "attempts": 2, "last_error": cause}
    assert_gaps(sidecar.start_times(), [0.2, 0.4])
    for core in workdir.glob("core*"):
        core.unlink()


def test_stability_window_refills_the_budget(user_manager, fake_sidecar_path):
    """After running longer than the window, the next crash starts again at the first delay, with 5 more."""
    plan = ["exit:3", "exit:3", "run:2.5"] + ["exit:3"] * 5
    sidecar = install_sidecar(user_manager, fake_sidecar_path, plan, base_s=0.2, window_s=2)
    wait_health(user_manager, "failed", timeout=25)
    starts = sidecar.start_times()
    assert len(starts) == 8, f"expected 3 starts + 5 after the reset, got {len(starts)}"
    # before the long run: 0.2, 0.4; the run lasted 2.5 s; then a fresh budget: 0.2 ... 3.2
    assert_gaps(starts, [0.2, 0.4, 0.2, 0.4, 0.8, 1.6, 3.2], runtimes=[0, 0, 2.5, 0, 0, 0, 0])
    final = health(user_manager).health
    assert final == {"status": "failed", "attempts": 5, "last_error": "exited with status 3"}


def test_stop_is_not_a_crash(user_manager, fake_sidecar_path):
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["hang"])
    wait_health(user_manager, "healthy", timeout=5)
    user_manager.systemctl("stop", UNIT, check=True)
    assert health(user_manager).health == {"status": "stopped"}
    time.sleep(1.0)
    assert len(sidecar.starts()) == 1
    assert user_manager.unit_property(UNIT, "NRestarts") == "0"
    assert health(user_manager).health == {"status": "stopped"}


def test_crash_right_after_start_and_health_while_starting(user_manager, fake_sidecar_path):
    """A sidecar dying within milliseconds still gets the exact schedule; health says restarting."""
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["exit:7"] * 3 + ["hang"], base_s=0.3)
    wait_for("4 starts", lambda: len(sidecar.starts()) == 4, timeout=10)
    wait_health(user_manager, "healthy", timeout=5)
    starts = sidecar.start_times()
    assert_gaps(starts, [0.3, 0.6, 1.2])
    wait_for("NRestarts=3", lambda: user_manager.unit_property(UNIT, "NRestarts") == "3", timeout=2)
