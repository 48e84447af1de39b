"""The sidecar under a real systemd user manager, on every systemd build available here.

Each measured gap between starts must be at least its scheduled delay and late by at most
LATE_MAX_S: systemd arms its restart timer with 250 ms accuracy (native mode), and the
launcher adds its own start-up.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from agor_systemd.config import RestartPolicy
from agor_systemd.lab.testbed import cgroup_layout
from agor_systemd.sidecar.backoff import schedule

from .support import (
    LOG_ID,
    UNIT,
    agor_units,
    gaps,
    health,
    install_sidecar,
    wait_for,
    wait_health,
)

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
        waits = [
            s
            for s in samples
            if s.health.get("status") == "restarting"
            and s.health.get("attempt") == k
            and s.health["next_retry_s"] > 0.3
        ]
        assert waits, f"no 'restarting attempt {k}' reading during the {delays[k - 1]}s wait"
        for s in waits:
            predicted_low = s.before + s.health["next_retry_s"]
            predicted_high = s.after + s.health["next_retry_s"]
            actual = starts[k]
            assert predicted_low - LATE_MAX_S <= actual <= predicted_high + LATE_MAX_S, (
                f"attempt {k}: predicted restart in [{predicted_low:.3f}, {predicted_high:.3f}], "
                f"happened at {actual:.3f}"
            )

    time.sleep(1.5)
    assert len(sidecar.starts()) == 6, "systemd restarted the sidecar after giving up"
    status = user_manager.systemctl("status", UNIT)
    assert "gave up after 5 restarts; sidecar crashed: exited with status 3" in status.stdout

    agor_units(user_manager, "restart", check=True)
    wait_health(user_manager, "healthy", timeout=5)
    assert len(sidecar.starts()) == 7
    assert user_manager.unit_property(UNIT, "NRestarts") == "0"


# behaviour, health's last_error, systemd's record of the launcher's exit (ExecMainCode/Status as
# "Main process exited, code=…, status=…"): the launcher exits the way the sidecar did, except
# that it cannot re-create a core dump
CRASHES = [
    ("exit:3", "exited with status 3", "code=exited, status=3/NOTIMPLEMENTED"),
    ("exit:0", "exited with status 0", "code=exited, status=0/SUCCESS (success)"),
    ("signal:KILL", "killed by SIGKILL", "code=killed, status=9/KILL"),
    ("signal:TERM", "killed by SIGTERM", "code=killed, status=15/TERM (success)"),
    ("dump", "killed by SIGSEGV (core dumped)", "code=killed, status=11/SEGV"),
]


@pytest.mark.parametrize(("behaviour", "cause", "record"), CRASHES, ids=[c[0] for c in CRASHES])
def test_every_unrequested_exit_is_a_crash(user_manager, fake_sidecar_path, behaviour, cause, record):
    """Non-zero exit, exit 0, signals and core dumps all restart, then give up with the cause named."""
    workdir = user_manager.write_file("crash-dir/.keep", "").parent
    seen = len(user_manager.journal_lines(UNIT))
    user_manager.systemctl("log-level", "debug", check=True)  # clean exits are logged at debug only
    try:
        sidecar = install_sidecar(
            user_manager,
            fake_sidecar_path,
            [behaviour],
            base_s=0.2,
            attempts=2,
            install_args=[f"--working-directory={workdir}", f"--read-write-path={workdir}"],
        )
        failed = wait_health(user_manager, "failed", timeout=10)
    finally:
        user_manager.systemctl("log-level", "info", check=True)
    assert failed.health == {"status": "failed", "attempts": 2, "last_error": cause}
    assert_gaps(sidecar.start_times(), [0.2, 0.4])
    # ExecMainCode/ExecMainStatus of each crash as systemd recorded them (a property read would
    # only show the last run's, the give-up status 250)
    exits = [
        line.split("Main process exited, ", 1)[1].rstrip(".")
        for line in user_manager.journal_lines(UNIT)[seen:]
        if "Main process exited, " in line
    ]
    assert exits == [record, record, "code=exited, status=250/n/a"], exits
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


def test_crash_is_noticed_while_a_descendant_floods_the_pipe(user_manager, fake_sidecar_path):
    """The sidecar dies while `yes`, its child, keeps writing to the inherited stdout: restart at once."""
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["flood-exit:0.5", "hang"], attempts=1)
    wait_for("the restart", lambda: len(sidecar.starts()) == 2, timeout=10)
    # later than a quiet crash's restart: until the exit, the launcher forwards `yes` as fast as
    # journald takes it, on a machine that `yes` and journald keep busy
    late = gaps(sidecar.start_times())[0] - 0.5 - 0.2
    print(f"restart after the crash: {late:.3f} s late")
    assert late <= 2.0, late
    wait_health(user_manager, "healthy", timeout=5)
    lines = user_manager.journal_lines(UNIT, identifier=LOG_ID)
    assert any("sidecar exited with status 3; restart 1/1 follows" in line for line in lines), lines[-5:]


def systemd_in_container() -> bool:
    return subprocess.run(["systemd-detect-virt", "--container", "--quiet"], check=False).returncode == 0


def test_agents_of_a_crashed_sidecar_get_sigterm_and_their_output_is_kept(user_manager, fake_sidecar_path):
    """The launcher exits at once on the crash; systemd sends the agents SIGTERM and waits for them
    before the restart, and the agent still printing while it flushes does not die of SIGPIPE."""
    if cgroup_layout().hybrid and systemd_in_container():
        pytest.skip(
            "systemd waits for what is left of a unit after its main process only on the unified "
            "cgroup hierarchy or outside a container (unit_kill_context); here it SIGKILLs them at once"
        )
    flag = user_manager.write_file("sidecar-data/.keep", "").parent / "agents-flushed"
    flag.unlink(missing_ok=True)
    seen = len(user_manager.journal_lines(UNIT, identifier=LOG_ID))
    sidecar = install_sidecar(user_manager, fake_sidecar_path, [f"agents-crash:{flag}", "hang"], attempts=1)
    wait_for("the restart", lambda: len(sidecar.starts()) == 2, timeout=10)
    assert flag.exists() and sorted(flag.read_text().splitlines()) == ["1 TERM", "2 TERM"]
    lines = user_manager.journal_lines(UNIT, identifier=LOG_ID)[seen:]
    assert "agent 1: flushed after SIGTERM" in lines, lines[-10:]
    wait_health(user_manager, "healthy", timeout=5)


def test_a_run_counts_as_stable_only_from_ready(user_manager, fake_sidecar_path):
    """ready_timeout_s (2.5 s) longer than the window (1 s): a never-ready sidecar still gives up."""
    sidecar = install_sidecar(
        user_manager, fake_sidecar_path, ["never-ready"], attempts=1, window_s=1, install_args=["--ready-timeout-s=2.5"]
    )
    failed = wait_health(user_manager, "failed", timeout=15)
    assert failed.health == {"status": "failed", "attempts": 1, "last_error": "not ready within 2.5 s"}
    time.sleep(1.0)
    assert len(sidecar.starts()) == 2


def test_budget_refill_survives_a_manager_reexec(user_manager, fake_sidecar_path):
    """`systemctl --user daemon-reexec` (what upgrades do) inside the window: the budget is still refilled."""
    if not user_manager.build.is_host:
        pytest.skip(
            "daemon-reexec runs the compiled-in /lib/systemd/systemd, which would replace this "
            f"private systemd {user_manager.version} with the host's build"
        )
    plan = ["exit:3", "run:3.5", "exit:3", "exit:3", "hang"]
    seen = len(user_manager.journal_lines(UNIT, identifier=LOG_ID))
    sidecar = install_sidecar(user_manager, fake_sidecar_path, plan, base_s=0.2, attempts=2, window_s=2)
    wait_for("the long run", lambda: len(sidecar.starts()) == 2, timeout=5)
    time.sleep(0.5)
    reexec = user_manager.run([str(user_manager.build.systemctl), "--user", "daemon-reexec"], build_tools=True)
    assert reexec.returncode == 0, reexec.stderr
    # refilled at 2 s: the crash at 3.5 s is restart 1/2 again, so 2 more starts, then give-up
    failed = wait_health(user_manager, "failed", timeout=15)
    assert failed.health == {"status": "failed", "attempts": 2, "last_error": "exited with status 3"}
    assert len(sidecar.starts()) == 4
    lines = user_manager.journal_lines(UNIT, identifier=LOG_ID)[seen:]
    assert any("restart budget reset" in line for line in lines), lines[-10:]


def test_crash_right_after_start_and_health_while_starting(user_manager, fake_sidecar_path):
    """A sidecar dying within milliseconds still gets the exact schedule; health says restarting."""
    sidecar = install_sidecar(user_manager, fake_sidecar_path, ["exit:7"] * 3 + ["hang"], base_s=0.3)
    wait_for("4 starts", lambda: len(sidecar.starts()) == 4, timeout=10)
    wait_health(user_manager, "healthy", timeout=5)
    starts = sidecar.start_times()
    assert_gaps(starts, [0.3, 0.6, 1.2])
    wait_for("NRestarts=3", lambda: user_manager.unit_property(UNIT, "NRestarts") == "3", timeout=2)
