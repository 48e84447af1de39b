"""The launcher's parts that need no systemd: its decisions (pure functions of its state), journal
records, draining, how it exits, the forwarder."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agor_systemd.giveup import GAVE_UP_STATUS
from agor_systemd.journal import ERR, INFO, WARNING
from agor_systemd.sidecar.health import health_from_properties, last_error
from agor_systemd.sidecar.launcher import (
    LINE_MAX,
    READY_LINE,
    Exit,
    OutputStream,
    Supervisor,
    budget_reset_via,
    cause_of_death,
    cgroup_procs_file,
    is_ready_line,
    journal_records,
    liveness_problem,
    next_wakeup,
    poll_timeout_ms,
    readiness_step,
    ready_status,
    restart_delay_usec,
    signal_action,
    split_priority,
    start_failure,
    verdict,
)
from agor_systemd.sidecar.protocol import CLD_DUMPED, CLD_EXITED, CLD_KILLED, LauncherOptions

REPO = Path(__file__).resolve().parent.parent

# --- decisions: pure functions of the supervisor's state ------------------------------------------

SCHEDULE = (1.0, 2.0, 4.0, 8.0, 16.0)


@pytest.mark.parametrize(
    ("schedule", "attempt", "expected"),
    [
        (SCHEDULE, 0, None),  # a fresh start does not wait
        (SCHEDULE, 1, 1_000_000),
        (SCHEDULE, 5, 16_000_000),
        (SCHEDULE, 9, 16_000_000),  # past the end: the last delay
        ((0.25,), 3, 250_000),
        ((), 2, None),  # no schedule: native backoff, systemd waits
    ],
)
def test_fallback_restart_delay(schedule, attempt, expected):
    assert restart_delay_usec(schedule, attempt) == expected


@pytest.mark.parametrize(
    ("line", "ready"),
    [
        (READY_LINE, True),
        (b'{ "type" : "ready" }', True),
        (b'{"type": "ready", "port": 8123}', True),  # spelt differently: parsed
        (b'{"status": "ready"}', False),
        (b'{"type": "starting", "next": "ready"}', False),
        (b'"ready"', False),  # JSON, but not an object
        (b'ready: {"type":"ready"', False),  # not JSON
        (b"ready", False),
        (b"", False),
    ],
)
def test_the_ready_line(line, ready):
    assert is_ready_line(line) is ready


def test_agors_own_ready_line_costs_no_json_import():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from agor_systemd.sidecar.launcher import is_ready_line; "
        "assert is_ready_line(b'{\"type\":\"ready\"}'); print('json' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(REPO)], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "False\n", "")


@pytest.mark.parametrize(
    ("now", "ready_mode", "step"),
    [
        (1.0, "line", None),  # a line comes on stdout by itself: nothing to poll
        (1.0, "socket:/run/x.sock", "poll"),
        (0.5, "tcp:8123", None),  # the next poll is not due yet
        (10.0, "line", "give up"),
        (10.0, "tcp:8123", "give up"),  # the timeout wins over a due poll
    ],
)
def test_readiness_step(now, ready_mode, step):
    assert readiness_step(now, ready_deadline=10.0, next_ready_poll=1.0, ready_mode=ready_mode) == step


@pytest.mark.parametrize(
    ("state", "silent_s", "activity_timeout_s", "probe_failures", "problem"),
    [
        ("S", 0.0, 0.0, 0, None),
        ("R", 3600.0, 0.0, 0, None),  # no activity timeout: silence is fine
        ("T", 0.0, 0.0, 0, "stopped (T state)"),  # SIGSTOP
        ("t", 0.0, 0.0, 0, "stopped (T state)"),  # stopped by a debugger
        ("S", 2.0, 2.0, 0, None),  # exactly the timeout is not yet too long
        ("S", 2.5, 2.0, 0, "no output for 2 s"),
        ("S", 0.3, 0.25, 0, "no output for 0.25 s"),
        ("S", 0.0, 0.0, 1, None),  # one failed probe may be a hiccup
        ("S", 0.0, 0.0, 2, "probe exited with status 3"),
        ("T", 9.0, 2.0, 5, "stopped (T state)"),  # the state says most
        ("", 0.0, 0.0, 0, None),  # gone: the pidfd will say so
    ],
)
def test_liveness_problem(state, silent_s, activity_timeout_s, probe_failures, problem):
    now = 1000.0
    found = liveness_problem(
        state, now, now - silent_s, activity_timeout_s, probe_failures, "probe exited with status 3"
    )
    assert found == problem


def wakeup(**changes) -> float:
    """next_wakeup for a sidecar that is ready, watched and reporting, with these changes."""
    state = {
        "stable_at": 300.0,
        "waiting_for_ready": False,
        "ready_mode": "line",
        "ready_deadline": 10.0,
        "next_ready_poll": 0.05,
        "reporting": True,
        "next_status": 40.0,
        "watching": True,
        "next_ping": 31.0,
        "next_check": 30.25,
    }
    return next_wakeup(**{**state, **changes})


def test_next_wakeup_is_the_earliest_running_timer():
    assert wakeup() == 30.25  # the liveness check
    assert wakeup(next_check=31.5) == 31.0  # the ping
    assert wakeup(watching=False) == 40.0  # hung or no watchdog: the STATUS= refresh
    assert wakeup(watching=False, reporting=False) == 300.0  # the stability window
    assert wakeup(watching=False, reporting=False, stable_at=float("inf")) == float("inf")


def test_next_wakeup_while_waiting_for_readiness():
    waiting = {"waiting_for_ready": True, "watching": False, "reporting": False}
    assert wakeup(**waiting) == 10.0  # a ready line needs no poll: only the timeout
    assert wakeup(**waiting, ready_mode="socket:/run/x.sock") == 0.05  # the next connect
    assert wakeup(**waiting, ready_mode="tcp:8123", next_ready_poll=12.0) == 10.0
    assert wakeup(**waiting, stable_at=5.0) == 5.0
    assert wakeup(waiting_for_ready=False, watching=False, reporting=False) == 300.0  # given up or ready


@pytest.mark.parametrize(
    ("wakeup_at", "timeout_ms"),
    [
        (float("inf"), -1),  # nothing to wake for: wait for an event
        (99.0, 0),  # overdue
        (100.0, 1),  # never wake up a moment early and spin
        (100.25, 251),
        (101.0, 1001),
    ],
)
def test_poll_timeout_ms(wakeup_at, timeout_ms):
    assert poll_timeout_ms(wakeup_at, now=100.0) == timeout_ms


@pytest.mark.parametrize(
    ("signum", "hung", "systemd_doing", "action"),
    [
        (signal.SIGHUP, None, None, "pass on"),
        (signal.SIGHUP, "stopped (T state)", None, "pass on"),
        (signal.SIGTERM, None, None, "stop and pass on"),  # systemctl stop, KillMode=mixed
        (signal.SIGINT, None, None, "stop and pass on"),
        (signal.SIGTERM, None, "stop-sigterm", "stop"),  # KillMode=control-group: the sidecar has its own
        (signal.SIGTERM, "stopped (T state)", None, "watchdog"),  # the answer to our WATCHDOG=trigger
        (signal.SIGTERM, None, "stop-watchdog", "watchdog"),  # systemd's own watchdog timeout
        (signal.SIGINT, "stopped (T state)", None, "stop and pass on"),  # never the WatchdogSignal=
    ],
)
def test_signal_action(signum, hung, systemd_doing, action):
    assert signal_action(signum, hung, systemd_doing) == action


@pytest.mark.parametrize(
    ("attempt", "reset_via", "via"),
    [(0, "dbus", None), (0, "notify", None), (3, "dbus", "dbus"), (1, "notify", "notify")],
)
def test_budget_reset_only_after_restarts(attempt, reset_via, via):
    assert budget_reset_via(attempt, reset_via) == via


DENIAL = "permission denied: /srv/x — outside the sandbox"


@pytest.mark.parametrize(
    ("code", "status", "state", "expected"),
    [
        (CLD_EXITED, 3, {}, "exited with status 3"),
        (CLD_KILLED, signal.SIGKILL, {}, "killed by SIGKILL"),
        (CLD_DUMPED, signal.SIGSEGV, {}, "killed by SIGSEGV (core dumped)"),
        (CLD_EXITED, 1, {"denial": DENIAL}, f"exited with status 1; {DENIAL}"),
        (CLD_KILLED, signal.SIGKILL, {"watchdog_fired": True}, "watchdog timeout"),
        (
            CLD_KILLED,
            signal.SIGKILL,
            {"watchdog_fired": True, "hung": "no output for 2 s"},
            "watchdog timeout (no output for 2 s)",
        ),
        (CLD_KILLED, signal.SIGTERM, {"not_ready": True}, "not ready within 2.5 s"),
        (CLD_KILLED, signal.SIGKILL, {"not_ready": True, "watchdog_fired": True}, "watchdog timeout"),
    ],
)
def test_cause_of_death(code, status, state, expected):
    given = {"watchdog_fired": False, "hung": None, "not_ready": False, "denial": None, **state}
    assert cause_of_death(code, status, ready_timeout_s=2.5, **given) == expected


def decide(attempt: int = 1, attempts: int = 5, **state) -> Exit:
    return verdict(
        "exited with status 3",
        attempt,
        attempts,
        **{"stopping": False, "watchdog_fired": False, "not_ready": False, **state},
    )


def test_a_stop_exits_0_whatever_the_sidecar_did():
    stopped = Exit("STATUS=", "sidecar exited with status 3 after a stop request", INFO, 0, after_stop=True)
    assert decide(stopping=True) == stopped
    assert decide(attempt=5, stopping=True) == stopped  # not a give-up: the unit ends inactive
    assert decide(stopping=True, not_ready=True) == stopped


def test_the_last_attempt_gives_up():
    gave_up = Exit(
        "STATUS=gave up after 5 restarts; sidecar crashed: exited with status 3",
        "sidecar exited with status 3; giving up after 5 restarts",
        ERR,
        GAVE_UP_STATUS,
    )
    assert decide(attempt=5) == gave_up
    assert decide(attempt=7) == gave_up  # the budget is spent however far past it
    assert decide(attempt=5, watchdog_fired=True) == gave_up
    assert decide(attempt=5, stopping=True, watchdog_fired=True) == gave_up  # a watchdog kill is no stop
    assert decide(attempt=0, attempts=0).exit_status == GAVE_UP_STATUS  # no restarts allowed at all


def test_a_crash_before_the_last_attempt_lets_systemd_restart():
    crashed = Exit(
        "STATUS=sidecar crashed: exited with status 3",
        "sidecar exited with status 3; restart 3/5 follows",
        WARNING,
        None,
    )
    assert decide(attempt=2) == crashed  # exit_status None: die the way the sidecar did
    assert decide(attempt=2, watchdog_fired=True) == Exit(
        crashed.status_line, crashed.record, WARNING, 1
    )  # the launcher's own SIGKILL is not the sidecar's death
    assert decide(attempt=0, not_ready=True).exit_status == 1
    assert decide(attempt=4, stopping=True, watchdog_fired=True).exit_status == 1


def test_health_reads_the_cause_back_from_status():
    for end in (decide(attempt=2), decide(attempt=5), start_failure("working directory /p: gone", 0, 5)):
        text = end.status_line.removeprefix("STATUS=")
        assert last_error({"StatusText": text}) in ("exited with status 3", "working directory /p: gone")


@pytest.mark.parametrize(
    ("attempt", "attempts", "expected"),
    [
        (0, 5, Exit("STATUS=sidecar crashed: cause", "cause; restart 1/5 follows", ERR, 1)),
        (4, 5, Exit("STATUS=sidecar crashed: cause", "cause; restart 5/5 follows", ERR, 1)),
        (
            5,
            5,
            Exit(
                "STATUS=gave up after 5 restarts; sidecar crashed: cause",
                "cause; giving up after 5 restarts",
                ERR,
                GAVE_UP_STATUS,
            ),
        ),
        (
            0,
            0,
            Exit(
                "STATUS=gave up after 0 restarts; sidecar crashed: cause",
                "cause; giving up after 0 restarts",
                ERR,
                GAVE_UP_STATUS,
            ),
        ),
    ],
)
def test_a_start_that_cannot_spawn_counts_like_a_crash(attempt, attempts, expected):
    assert start_failure("cause", attempt, attempts) == expected


def test_ready_status_carries_what_health_reads():
    text = ready_status(1234, 125.0, 2, 5, "sandbox partial")
    assert text == "STATUS=ready; pid 1234; up 2m; attempt 2/5; sandbox partial"
    props = {"ActiveState": "active", "SubState": "running", "StatusText": text.removeprefix("STATUS=")}
    assert health_from_properties(props, 0) == {"status": "healthy", "sandbox": "partial"}


@pytest.mark.parametrize(
    ("up_s", "text"), [(0.9, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h00m"), (90061, "25h01m")]
)
def test_up_time_in_status(up_s, text):
    assert ready_status(1, up_s, 0, 5, "sandbox off") == f"STATUS=ready; pid 1; up {text}; attempt 0/5; sandbox off"


def assigned_attributes(cls_name: str) -> set[str]:
    """Every `self.NAME = ...` in the class's methods."""
    tree = ast.parse((REPO / "agor_systemd" / "sidecar" / "launcher.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    return {
        target.attr
        for node in ast.walk(cls)
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }


def test_the_supervisor_is_complete_after_init():
    """No attribute first appears in a later method or is set from outside: the constructor has them all."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        options = LauncherOptions("x.service", 5, 300.0, ("/bin/true",))
        supervisor = Supervisor(options, 4321, -1, (out_r, err_r), 100.0, sandbox=None, bus=None, attempt=2)
        assert assigned_attributes("Supervisor") <= set(vars(supervisor))
        assert not supervisor.ready and supervisor.waiting_for_ready()
        # safe at any time (it used to raise AttributeError before READY: no ready_at yet)
        assert supervisor.status_text() == "STATUS=ready; pid 4321; up 0s; attempt 2/5; sandbox off"
        assert list(supervisor.streams) == [out_r, err_r]  # stdout's pipe first: hand_over_output relies on it
    finally:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"<3>disk full", (b"<3>", b"disk full")),
        (b"<0>", (b"<0>", b"")),
        (b"<7>debug", (b"<7>", b"debug")),
        (b"<8>not a priority", (b"<4>", b"<8>not a priority")),  # journald accepts <0>..<7> only
        (b"<9>", (b"<4>", b"<9>")),
        (b"<03>two digits", (b"<4>", b"<03>two digits")),
        (b"<3", (b"<4>", b"<3")),
        (b"plain", (b"<4>", b"plain")),
        (b"", (b"<4>", b"")),
    ],
)
def test_split_priority(line, expected):
    assert split_priority(line, b"<4>") == expected


def test_records_fit_line_max_with_their_prefix():
    text = b"x" * (3 * LINE_MAX)
    records = journal_records(b"<3>", text)
    assert all(r.startswith(b"<3>") and len(r) <= LINE_MAX - 1 for r in records)
    assert b"".join(r[3:] for r in records) == text
    assert len(records) == 4
    assert journal_records(b"<6>", b"") == [b"<6>"]
    assert journal_records(b"<6>", b"a" * (LINE_MAX - 4)) == [b"<6>" + b"a" * (LINE_MAX - 4)]


def forwarded(chunks: list[bytes], capfd, priority: int = 4) -> list[bytes]:
    """What an OutputStream writes to the journal (fd 1) for these reads, as records."""
    lines: list[bytes] = []
    stream = OutputStream(-1, priority, lambda _stream, line: lines.append(line), is_stdout=False)
    for chunk in chunks:
        stream.feed(chunk)
    stream.flush()
    out = capfd.readouterr().out.encode("utf-8", "surrogateescape")
    return out.split(b"\n")[:-1]


def test_every_record_of_a_long_line_keeps_its_priority(capfd):
    # a line longer than LineMax, arriving in pieces, with and without its own priority
    own = b"<3>" + b"x" * 70000 + b"\n"
    plain = b"y" * 60000 + b"\n"
    data = own + plain
    records = forwarded([data[i : i + 4096] for i in range(0, len(data), 4096)], capfd)
    assert all(len(r) <= LINE_MAX - 1 for r in records)
    xs = [r for r in records if r[3:4] == b"x"]
    ys = [r for r in records if r[3:4] == b"y"]
    assert {r[:3] for r in xs} == {b"<3>"} and b"".join(r[3:] for r in xs) == b"x" * 70000
    assert {r[:3] for r in ys} == {b"<4>"} and b"".join(r[3:] for r in ys) == b"y" * 60000
    assert len(xs) + len(ys) == len(records) == 4


def test_nul_bytes_and_bad_prefixes(capfd):
    assert forwarded([b"before\0after\n<8>eight\n<5>fine\nno newline"], capfd) == [
        b"<4>before",
        b"<4>after",
        b"<4><8>eight",
        b"<5>fine",
        b"<4>no newline",
    ]


def test_drain_takes_what_is_there_and_does_not_wait_for_writers(capfd):
    """A descendant still holds the pipe and keeps writing: drain returns with what was there."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"last words\npartial")
    stream = OutputStream(read_fd, 4, lambda *_: None, is_stdout=False)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (stream.drain_available(), done.set()), daemon=True)
    worker.start()
    assert done.wait(5), "drain waited for the writer"
    assert capfd.readouterr().out == "<4>last words\n<4>partial\n"
    assert stream.open  # not at end of file: the writer is still there
    os.close(write_fd)
    assert not stream.read() and not stream.open
    os.close(read_fd)


EXITS = [
    ((1, 7), 7),
    ((1, 0), 0),
    ((1, 250), 1),  # the sidecar's own 250 must not look like the launcher giving up
    ((2, signal.SIGKILL), -signal.SIGKILL),  # the OOM killer, kill -9: no handler can be installed
    ((2, signal.SIGTERM), -signal.SIGTERM),
    ((3, signal.SIGSEGV), -signal.SIGSEGV),  # "core dumped" cannot be re-created, the signal can
]


@pytest.mark.parametrize(("death", "returncode"), EXITS, ids=[f"{c}-{s}" for (c, s), _ in EXITS])
def test_exit_like_reproduces_the_sidecars_death(death, returncode):
    code, status = death
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from agor_systemd.sidecar.launcher import exit_like; exit_like({code}, {status})",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == returncode, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("proc_self_cgroup", "unit", "expected"),
    [
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/agor-sidecar.service\n",
            "agor-sidecar.service",
            "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/agor-sidecar.service/cgroup.procs",
        ),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-agor\\x2drelay\\x2dsidecar.slice/"
            "agor-relay-sidecar@0a1b.service\n",
            "agor-relay-sidecar@0a1b.service",
            "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/app-agor\\x2drelay\\x2dsidecar.slice/"
            "agor-relay-sidecar@0a1b.service/cgroup.procs",
        ),
        # hybrid: systemd tracks units in the legacy name=systemd hierarchy
        (
            "12:pids:/user.slice\n1:name=systemd:/user.slice/u.service/agor-sidecar.service\n0::/user.slice/u.service/x\n",
            "agor-sidecar.service",
            "/sys/fs/cgroup/systemd/user.slice/u.service/agor-sidecar.service/cgroup.procs",
        ),
        ("12:pids:/\n", "agor-sidecar.service", None),
        # started by a relay run by hand: the cgroup is the relay's (a login session's), not the unit's
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "agor-relay-sidecar", None),
        ("0::/system.slice/agor-relay.service\n", "agor-relay-sidecar", None),
    ],
)
def test_cgroup_procs_file(proc_self_cgroup, unit, expected):
    assert cgroup_procs_file(proc_self_cgroup, unit) == expected


def test_a_launcher_outside_its_unit_names_the_missing_program(tmp_path):
    """A relay run by hand starts launchers in its own cgroup: no unit of that name to ask systemd
    about, so the attempt count stays the relay's and the one-line error is the real cause."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(REPO / "agor_systemd" / "_launch.py"), "--unit", "agor-relay-sidecar"]
        + ["--attempts", "5", "--stability-window", "300", "--", str(tmp_path / "no-such-runner")],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")},
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"<3>agor-launch: cannot start {tmp_path / 'no-such-runner'}: No such file or directory; restart 1/5 follows"
    ]


def test_the_output_forwarder_outlives_sigterm_and_ends_when_the_writers_are_gone():
    """What takes the pipes over after a crash: it forwards with priorities until end of file."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    journal_r, journal_w = os.pipe()
    pid = os.posix_spawn(
        sys.executable,
        [sys.executable, "-I", "-S", str(REPO / "agor_systemd" / "_launch.py"), "--forward-output"],
        dict(os.environ),
        file_actions=[
            (os.POSIX_SPAWN_DUP2, journal_w, 1),
            (os.POSIX_SPAWN_DUP2, out_r, 3),
            (os.POSIX_SPAWN_DUP2, err_r, 4),
        ],
    )
    for fd in (out_r, err_r, journal_w):
        os.close(fd)
    os.write(out_w, b"agent: flushing\n")
    time.sleep(0.5)  # let it set up its signal dispositions
    os.kill(pid, signal.SIGTERM)  # systemd's, to everyone in the unit after a crash
    os.write(err_w, b"<3>agent: could not flush\nlast words")
    os.close(err_w)
    time.sleep(0.2)
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # a writer is left: it keeps forwarding
    os.close(out_w)
    with os.fdopen(journal_r, "rb") as journal:
        out = journal.read()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert out.splitlines() == [b"<6>agent: flushing", b"<3>agent: could not flush", b"<4>last words"]
