"""health_from_properties: systemd unit properties (as bus.Systemd.unit_properties returns them) → health.

The property dicts mimic a GetAll of org.freedesktop.systemd1.Unit + .Service after bus._text():
str keys, str/int values, ExecStart as a list of (path, argv, ignore, start_rt, start_mono,
exit_rt, exit_mono, pid, code, status) tuples.
"""

from __future__ import annotations

import pytest

from agor_systemd.config import RestartPolicy
from agor_systemd.sidecar.backoff import schedule
from agor_systemd.sidecar.health import (
    RESULT_TEXT,
    NotInstalled,
    health_from_properties,
    last_error,
    launcher_options,
)
from agor_systemd.sidecar.protocol import (
    SIDECAR_UNIT,
    LauncherOptions,
    launcher_arguments,
)

SEC = 1_000_000
NOW = 5_000 * SEC  # CLOCK_MONOTONIC "now" in µs
LAUNCHER = ["/usr/bin/python3", "-I", "-m", "agor_systemd.sidecar.launcher"]
SIDECAR = ("/usr/bin/node", "/home/u/run.mjs")


def exec_start(wait_schedule: tuple[float, ...] | None = None, attempts: int = 5) -> list[tuple]:
    args = launcher_arguments(LauncherOptions(SIDECAR_UNIT, attempts, 300.0, SIDECAR, wait_schedule))
    return [(LAUNCHER[0], [*LAUNCHER, *args], False, 0, 0, 0, 0, 0, 0, 0)]


NATIVE_EXEC = exec_start()
FALLBACK_SCHEDULE = tuple(schedule(RestartPolicy()))
FALLBACK_EXEC = exec_start(FALLBACK_SCHEDULE)


def props(active: str, sub: str, *, n_restarts: int = 0, native: bool = True, **extra) -> dict:
    values = {
        "Id": SIDECAR_UNIT,
        "LoadState": "loaded",
        "ActiveState": active,
        "SubState": sub,
        "NRestarts": n_restarts,
        "Result": "success",
        "ExecMainCode": 0,
        "ExecMainStatus": 0,
        "StatusText": "",
        "StateChangeTimestampMonotonic": NOW - 10 * SEC,
        "InactiveEnterTimestampMonotonic": NOW - 20 * SEC,
        "RestartUSec": 1 * SEC if native else 0,
        "ExecStart": NATIVE_EXEC if native else FALLBACK_EXEC,
    }
    if native:
        values["RestartUSecNext"] = 1 * SEC  # systemd ≥ 254 only
    values.update(extra)
    return values


def health(values: dict, now: int = NOW) -> dict:
    return health_from_properties(values, now)


# --- running, starting, stopped -----------------------------------------------------------------


@pytest.mark.parametrize("sub", ["running", "reload", "exited"])
def test_active_is_healthy(sub):
    assert health(props("active", sub, n_restarts=3)) == {"status": "healthy"}


def test_reloading_is_healthy():
    assert health(props("reloading", "reload")) == {"status": "healthy"}


@pytest.mark.parametrize("native", [True, False])
def test_first_start_is_starting(native):
    assert health(props("activating", "start", native=native)) == {"status": "starting"}


STOP_JOB = (7, "/org/freedesktop/systemd1/job/7")


@pytest.mark.parametrize(
    "active, sub, job",
    [
        ("inactive", "dead", (0, "/")),
        ("deactivating", "stop-sigterm", STOP_JOB),
        ("deactivating", "final-sigterm", STOP_JOB),
        ("deactivating", "stop-post", STOP_JOB),
    ],
)
def test_not_running_is_stopped(active, sub, job):
    assert health(props(active, sub, n_restarts=2, Job=job)) == {"status": "stopped"}


# --- deactivating with nobody's job: a crash on its way to a restart ----------------------------


@pytest.mark.parametrize(
    "sub, result",
    [
        ("stop-watchdog", "watchdog"),
        ("stop-sigterm", "exit-code"),
        ("final-sigkill", "signal"),
        ("stop-post", "success"),
    ],
)
@pytest.mark.parametrize("job", [(0, "/"), None])
def test_deactivating_without_a_job_is_a_restart_in_progress(sub, result, job):
    values = props(
        "deactivating",
        sub,
        n_restarts=2,
        Result=result,
        ExecMainCode=1,
        ExecMainStatus=3,
        RestartUSecNext=4 * SEC,
        **({} if job is None else {"Job": job}),
    )
    assert health(values) == {"status": "restarting", "attempt": 3, "next_retry_s": 4.0}


@pytest.mark.parametrize("k", [0, 1, 4, 7])
def test_deactivating_towards_a_fallback_restart_names_the_coming_delay(k):
    values = props(
        "deactivating", "stop-sigterm", n_restarts=k, native=False, Result="signal", ExecMainCode=2, ExecMainStatus=9
    )
    expected = FALLBACK_SCHEDULE[min(k + 1, len(FALLBACK_SCHEDULE)) - 1]
    assert health(values) == {"status": "restarting", "attempt": k + 1, "next_retry_s": expected}


def test_deactivating_after_the_launcher_gave_up_is_failed():
    values = props(
        "deactivating",
        "stop-sigterm",
        n_restarts=5,
        Result="exit-code",
        ExecMainCode=1,
        ExecMainStatus=250,
        StatusText="gave up after 5 restarts; sidecar crashed: exited with status 3",
    )
    assert health(values) == {"status": "failed", "attempts": 5, "last_error": "exited with status 3"}


# --- restarting: native (systemd ≥ 254 holds the unit in auto-restart) -------------------------


def test_native_holdoff():
    # crashed twice before: restart 3 is due 4 s after the state change, which was 1.5 s ago
    values = props(
        "activating",
        "auto-restart",
        n_restarts=2,
        StateChangeTimestampMonotonic=NOW - 1_500_000,
        RestartUSecNext=4 * SEC,
    )
    assert health(values) == {"status": "restarting", "attempt": 3, "next_retry_s": 2.5}


def test_native_holdoff_next_retry_is_rounded_to_milliseconds():
    values = props(
        "activating", "auto-restart", n_restarts=0, StateChangeTimestampMonotonic=NOW - 123_456, RestartUSecNext=1 * SEC
    )
    assert health(values) == {"status": "restarting", "attempt": 1, "next_retry_s": 0.877}


def test_native_holdoff_overdue_is_zero_not_negative():
    values = props(
        "activating",
        "auto-restart",
        n_restarts=4,
        StateChangeTimestampMonotonic=NOW - 20 * SEC,
        RestartUSecNext=16 * SEC,
    )
    assert health(values) == {"status": "restarting", "attempt": 5, "next_retry_s": 0.0}


def test_holdoff_without_restart_usec_next_uses_restart_usec():
    # systemd < 254 has no RestartUSecNext
    values = props(
        "activating", "auto-restart", n_restarts=1, StateChangeTimestampMonotonic=NOW - 100_000, RestartUSec=300_000
    )
    del values["RestartUSecNext"]
    assert health(values) == {"status": "restarting", "attempt": 2, "next_retry_s": 0.2}


@pytest.mark.parametrize(
    "active, sub", [("failed", "failed-before-auto-restart"), ("inactive", "dead-before-auto-restart")]
)
def test_transient_state_before_auto_restart_is_restarting(active, sub):
    # systemd ≥ 254 passes through these right before auto-restart; the holdoff has not begun yet
    values = props(
        active, sub, n_restarts=1, RestartUSecNext=2 * SEC, Result="exit-code", ExecMainCode=1, ExecMainStatus=3
    )
    assert health(values) == {"status": "restarting", "attempt": 2, "next_retry_s": 2.0}


def test_restart_job_queued():
    # auto-restart-queued (v254+): NRestarts was already bumped for this restart
    values = props("activating", "auto-restart-queued", n_restarts=3)
    assert health(values) == {"status": "restarting", "attempt": 3, "next_retry_s": 0.0}


def test_native_restart_starting():
    # attempt 2 is being started: no wait left
    assert health(props("activating", "start", n_restarts=2)) == {
        "status": "restarting",
        "attempt": 2,
        "next_retry_s": 0.0,
    }


# --- restarting: fallback (the launcher waits inside `activating`) -----------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_fallback_wait_follows_the_schedule(k):
    crashed = NOW - 500_000  # the crash was half a second ago
    values = props("activating", "start", n_restarts=k, native=False, InactiveEnterTimestampMonotonic=crashed)
    expected = round(FALLBACK_SCHEDULE[k - 1] - 0.5, 3)
    assert health(values) == {"status": "restarting", "attempt": k, "next_retry_s": expected}


def test_fallback_wait_past_the_schedule_uses_the_last_delay():
    values = props("activating", "start", n_restarts=9, native=False, InactiveEnterTimestampMonotonic=NOW)
    assert health(values) == {"status": "restarting", "attempt": 9, "next_retry_s": 16.0}


def test_fallback_wait_over_is_zero():
    values = props("activating", "start", n_restarts=2, native=False, InactiveEnterTimestampMonotonic=NOW - 60 * SEC)
    assert health(values)["next_retry_s"] == 0.0


def test_fallback_reads_a_sub_second_schedule_from_exec_start():
    values = props(
        "activating",
        "start",
        n_restarts=3,
        native=False,
        ExecStart=exec_start((0.2, 0.4, 0.8)),
        InactiveEnterTimestampMonotonic=NOW - 100_000,
    )
    assert health(values) == {"status": "restarting", "attempt": 3, "next_retry_s": 0.7}


def test_restarting_without_a_readable_launcher_argv_has_no_wait():
    values = props(
        "activating",
        "start",
        n_restarts=2,
        ExecStart=[("/usr/bin/node", ["/usr/bin/node"], False, 0, 0, 0, 0, 0, 0, 0)],
    )
    assert health(values) == {"status": "restarting", "attempt": 2, "next_retry_s": 0.0}


# --- failed ---------------------------------------------------------------------------------------


def gave_up(**extra) -> dict:
    """After the 5th restart's crash the launcher exits 250 (RestartPreventExitStatus)."""
    values = dict(
        n_restarts=5,
        Result="exit-code",
        ExecMainCode=1,
        ExecMainStatus=250,
        StatusText="gave up after 5 restarts; sidecar crashed: killed by SIGSEGV (core dumped)",
    )
    values.update(extra)
    return props("failed", "failed", **values)


def test_gave_up_reports_the_sidecars_crash():
    assert health(gave_up()) == {"status": "failed", "attempts": 5, "last_error": "killed by SIGSEGV (core dumped)"}


def test_gave_up_in_fallback_mode_is_the_same():
    assert health(gave_up(native=False)) == health(gave_up())


def test_systemds_verdict_on_the_run_wins_over_the_crash_mark():
    # a watchdog kill: the launcher's STATUS= may still describe an earlier crash
    values = gave_up(Result="watchdog", StatusText="sidecar crashed: exited with status 3")
    assert health(values)["last_error"] == "watchdog timeout"


def test_crash_mark_wins_over_the_start_limit():
    values = gave_up(Result="start-limit-hit", StatusText="sidecar crashed: exited with status 3")
    assert health(values)["last_error"] == "exited with status 3"


@pytest.mark.parametrize(
    "code, status, text",
    [
        (1, 1, "exited with status 1"),
        (2, 15, "killed by SIGTERM"),
        (3, 6, "killed by SIGABRT (core dumped)"),
    ],
)
def test_failed_without_status_text_uses_exec_main(code, status, text):
    values = props(
        "failed",
        "failed",
        n_restarts=2,
        Result="exit-code" if code == 1 else "signal",
        ExecMainCode=code,
        ExecMainStatus=status,
    )
    assert health(values) == {"status": "failed", "attempts": 2, "last_error": text}


def test_status_text_without_crash_mark_is_not_an_error():
    values = props(
        "failed",
        "failed",
        Result="exit-code",
        ExecMainCode=1,
        ExecMainStatus=2,
        StatusText="running; pid 42; attempt 0/5",
    )
    assert health(values)["last_error"] == "exited with status 2"


@pytest.mark.parametrize("result", sorted(RESULT_TEXT))
def test_failed_results_have_readable_text(result):
    values = props("failed", "failed", n_restarts=1, Result=result, ExecMainCode=2, ExecMainStatus=9)
    assert health(values)["last_error"] == RESULT_TEXT[result]


def test_start_limit_hit_does_not_count_the_refused_start():
    values = props(
        "failed",
        "failed",
        n_restarts=6,
        Result="start-limit-hit",
        ExecMainCode=1,
        ExecMainStatus=1,
        StatusText="sidecar crashed: exited with status 1",
    )
    assert health(values) == {"status": "failed", "attempts": 5, "last_error": "exited with status 1"}


def test_start_limit_hit_without_restarts_is_zero_attempts():
    values = props("failed", "failed", n_restarts=0, Result="start-limit-hit")
    assert health(values) == {"status": "failed", "attempts": 0, "last_error": "start request repeated too quickly"}


def test_failed_with_nothing_known():
    assert last_error({"Result": "", "ExecMainCode": 0}) == "unknown"
    assert last_error({"Result": "exec-weird", "ExecMainCode": 0}) == "exec-weird"


# --- not installed ------------------------------------------------------------------------------


@pytest.mark.parametrize("load_state", ["not-found", "masked"])
def test_unknown_unit_raises_not_installed(load_state):
    values = props("inactive", "dead", LoadState=load_state)
    with pytest.raises(NotInstalled, match=rf"^agor-sidecar\.service is {load_state}; run `agor-units install`$"):
        health(values)


def test_not_found_but_still_running_is_reported():
    # a unit file removed under a running unit: systemd keeps the unit, health keeps reporting it
    assert health(props("active", "running", LoadState="not-found")) == {"status": "healthy"}


# --- reading the launcher's options back --------------------------------------------------------


def test_launcher_options_from_exec_start():
    opts = launcher_options(props("activating", "start", native=False))
    assert opts == LauncherOptions(SIDECAR_UNIT, 5, 300.0, SIDECAR, FALLBACK_SCHEDULE)


def test_launcher_options_without_exec_start():
    assert launcher_options({}) is None
    assert launcher_options({"ExecStart": []}) is None


def test_launcher_options_with_garbled_arguments():
    garbled = [
        (
            "/usr/bin/python3",
            ["/usr/bin/python3", "-m", "agor_systemd.sidecar.launcher", "--bogus"],
            False,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        )
    ]
    assert launcher_options({"ExecStart": garbled}) is None


def test_a_given_up_sidecar_answering_a_client_keeps_its_attempts():
    """A connection to agor-sidecar.socket after the give-up starts the launcher afresh (NRestarts
    0); it answers the client and fails again with the count in STATUS= (docs/socket.md)."""
    state = health(
        props(
            "failed",
            "failed",
            n_restarts=0,
            Result="exit-code",
            ExecMainCode=1,
            ExecMainStatus=250,
            StatusText="gave up after 5 restarts; sidecar crashed: exited with status 3",
        )
    )
    assert state == {"status": "failed", "attempts": 5, "last_error": "exited with status 3"}


def test_healthy_with_the_socket_says_clients_and_buffering():
    text = "ready; pid 9; up 1m; attempt 0/5; sandbox full; no client, buffering 3 lines"
    state = health(props("active", "running", StatusText=text))
    assert state == {"status": "healthy", "sandbox": "full", "clients": 0, "buffering_lines": 3}
