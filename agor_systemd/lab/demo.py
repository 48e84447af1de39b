"""`agor-units demo`: supervision shown live on a throw-away ``systemd --user``.

Runs as root on a machine without a user session: :mod:`agor_systemd.lab.testbed` starts a private mount
namespace with its own journald and a real, unprivileged user manager for a demo user. The demo
installs the units (as that user, with the ordinary `agor-units install --now`) for a sidecar
that crashes 0.3 s after every start while ``~/demo/broken`` exists, prints the timeline read
from `agor-units health --json` (crash, countdown, restart, ..., give-up), then fixes the sidecar,
presses the manual-restart button (`agor-units restart`), shows systemd's own journal and status,
uninstalls and stops everything. Every wait is bounded; lab problems are one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agor_systemd.config import RestartPolicy
from agor_systemd.console import run_main
from agor_systemd.errors import AgorError
from agor_systemd.lab.testbed import (
    OPT_ROOT,
    LabError,
    LabNamespace,
    SystemdBuild,
    UserManager,
    available_builds,
    claim_name,
    host_build,
)
from agor_systemd.sidecar.backoff import schedule
from agor_systemd.sidecar.protocol import SIDECAR_UNIT

Echo = Callable[[str], None]

#: Demo user names, tried in order: each running demo holds a lock on its name, so parallel
#: demos (or a demo next to a still-running one) never share a home directory.
DEMO_USERS = ("agor-demo", "agor-demo2", "agor-demo3", "agor-demo4", "agor-demo5", "agor-demo6")
VENV_AGOR_UNITS = OPT_ROOT / "venv" / "bin" / "agor-units"
FLAG = "demo/broken"  # relative to the demo user's home
CONFIG = ".config/agor/units.toml"
POLL_S = 0.2  # health is read about this often (start to start)
CRASH_AFTER_S = 0.3  # demo_sidecar's lifetime while broken (plus the launcher's start-up)
HEALTH_ERRORS_TOLERATED = 3  # consecutive failed `health` calls before the demo gives up
JOURNAL_LINES = 15


class DemoError(AgorError, RuntimeError):
    """Why the demo cannot go on, as one line."""


class Interrupted(BaseException):
    """SIGTERM: clean up like after Ctrl-C."""


def error(echo: Echo, message: str) -> None:
    echo(f"agor-units: error: {message}")


# ------------------------------------------------------------------------------------------------
# checks before anything is started
# ------------------------------------------------------------------------------------------------


def interpreter_problem(executable: str) -> str | None:
    """Why the demo user could not run `executable` (every directory above it and the file itself
    need o+x), or None."""
    fix = "run scripts/setup.sh and use /opt/agor-systemd/venv/bin/agor-units"
    if not executable:
        return f"cannot tell which Python runs the demo (sys.executable is empty); {fix}"
    paths = dict.fromkeys([Path(os.path.abspath(executable)), Path(os.path.realpath(executable))])
    for path in paths:
        for step in (*reversed(path.parents), path):  # every directory must be searchable, the file executable
            try:
                mode = os.stat(step).st_mode
            except OSError as e:
                return f"cannot check {step}: {e.strerror}; {fix}"
            if not mode & stat.S_IXOTH:
                what = "executable" if step == path else "searchable"
                return (
                    f"the demo user cannot run {executable}: {step} is not {what} by other users "
                    f"(mode {stat.S_IMODE(mode):o}); {fix}"
                )
    return None


def describe_build(build: SystemdBuild) -> str:
    where = "the host's" if build.is_host else str(build.prefix)
    return f"{build.version} ({build.full_version or '?'}, {where})"


def pick_build(wanted: str | None) -> SystemdBuild:
    if wanted is None:
        return host_build()
    key = wanted.strip().removeprefix("systemd").strip()
    builds = available_builds()
    for build in builds:
        if key in (str(build.version), build.full_version):
            return build
    available = ", ".join(describe_build(b) for b in builds) or "none"
    raise DemoError(
        f"no systemd {wanted} build on this machine; available: {available} (scripts/setup.sh extracts 254)"
    )


def lock_directory() -> Path:
    run_lock = Path("/run/lock")
    return run_lock if run_lock.is_dir() and os.access(run_lock, os.W_OK) else Path(tempfile.gettempdir())


def claim_demo_user() -> tuple[str, IO[str]]:
    """A demo user name nobody else's demo is using right now, and the lock that holds it."""
    claimed = claim_name(DEMO_USERS, lock_directory(), prefix="agor-units-demo-")
    if claimed:
        return claimed
    raise DemoError(f"{len(DEMO_USERS)} demos are already running on this machine; try again when one is done")


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


class Timeline:
    """Lines numbered with seconds since install. On a terminal, countdowns overwrite themselves;
    otherwise a countdown line is printed at most once a second, so logs stay readable."""

    def __init__(self, echo: Echo, live: bool) -> None:
        self.echo = echo
        self.live = live
        self.t0 = time.monotonic()
        self._pending = False  # a live countdown is on the screen without a newline

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _clear(self) -> None:
        if self._pending:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
            self._pending = False

    def say(self, text: str) -> None:
        self._clear()
        self.echo(text)

    def event(self, label: str, text: str) -> None:
        self.say(f"{self.elapsed():7.1f}s  {label:<9} {text}".rstrip())

    def countdown(self, text: str) -> None:
        line = f"{self.elapsed():7.1f}s  {'':<9} {text}"
        if self.live:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
            self._pending = True
        else:
            self.echo(line)


def indented(echo: Echo, text: str, prefix: str = "    ") -> None:
    for line in text.rstrip("\n").splitlines():
        echo(prefix + line)


# ------------------------------------------------------------------------------------------------
# the demo
# ------------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, build: SystemdBuild, fast: bool, echo: Echo) -> None:
        self.build = build
        self.fast = fast
        self.echo = echo
        self.policy = RestartPolicy(base_s=0.2 if fast else 1.0)
        self.delays = schedule(self.policy)
        self.attempts = self.policy.attempts
        self.hold_s = 0.6 if fast else 1.0  # how long "healthy" must last after the manual restart
        self.user: str | None = None
        self.lock: IO[str] | None = None
        self.ns: LabNamespace | None = None
        self.mgr: UserManager | None = None
        self.installed = False
        self.timeline: Timeline | None = None

    # -- helpers ---------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """echo, first clearing a countdown a terminal may be showing."""
        (self.timeline.say if self.timeline is not None else self.echo)(text)

    def agor(self, *args: str, timeout: float = 30):
        """`agor-units ARGS` as the demo user, with the interpreter running this demo."""
        assert self.mgr is not None
        return self.mgr.run([sys.executable, "-m", "agor_systemd.cli", *args], timeout=timeout)

    def health(self, errors: list[str]) -> dict[str, Any] | None:
        """One `agor-units health --json`; None (and the reason in `errors`) if it failed."""
        cp = self.agor("health", "--json", timeout=15)
        if cp.returncode in (0, 3, 4, 5):
            try:
                state = json.loads(cp.stdout)
                if isinstance(state, dict) and "status" in state:
                    errors.clear()
                    return state
            except ValueError:
                pass
        detail = (cp.stderr.strip().splitlines() or cp.stdout.strip().splitlines() or ["no output"])[-1]
        errors.append(f"agor-units health --json exited {cp.returncode}: {detail}")
        if len(errors) >= HEALTH_ERRORS_TOLERATED:
            raise DemoError(errors[-1])
        return None

    def polls(self, deadline: float, what: str) -> Any:
        """Health readings about every POLL_S until the caller stops; DemoError after `deadline`."""
        errors: list[str] = []
        last: dict[str, Any] | None = None
        while True:
            started = time.monotonic()
            if started > deadline:
                raise DemoError(f"{what} (last health: {json.dumps(last) if last else 'none'})")
            state = self.health(errors)
            if state is not None:
                last = state
                yield state
            time.sleep(max(0.0, POLL_S - (time.monotonic() - started)))

    # -- steps -----------------------------------------------------------------------------------

    def run(self) -> int:
        echo = self.echo
        self.user, self.lock = claim_demo_user()
        build = self.build
        echo(
            f"agor-units demo: supervision of a crashing sidecar by systemd {describe_build(build)}, "
            f"restart delays from {self.policy.base_s:g}s{' (--fast)' if self.fast else ''}"
        )
        t = time.monotonic()
        self.ns = LabNamespace()
        self.ns.start()
        self.mgr = mgr = UserManager(self.user, build, self.ns)
        # leftovers of a demo that was killed: start from an empty unit directory and demo dir
        shutil.rmtree(mgr.unit_dir, ignore_errors=True)
        shutil.rmtree(mgr.home / "demo", ignore_errors=True)
        mgr.start()
        echo(
            f"started a throw-away `systemd --user` for user {self.user} (uid {mgr.uid}) in a private "
            f"mount namespace with its own journald ({time.monotonic() - t:.1f}s)"
        )

        probe = mgr.run(
            [sys.executable, "-I", "-c", "import agor_systemd.cli, agor_systemd.lab.demo_sidecar"], timeout=30
        )
        if probe.returncode != 0:
            detail = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            raise DemoError(
                f"user {self.user} cannot import agor_systemd with {sys.executable} ({detail}); "
                "run scripts/setup.sh and use /opt/agor-systemd/venv/bin/agor-units"
            )

        flag = mgr.home / FLAG
        command = [sys.executable, "-I", "-m", "agor_systemd.lab.demo_sidecar", str(flag)]
        config = (
            f"[sidecar]\ncommand = [{', '.join(json.dumps(w) for w in command)}]\n"
            f'working_directory = "~/{Path(FLAG).parent}"\n\n[restart]\nbase_s = {self.policy.base_s:g}\n'
        )
        mgr.write_file(CONFIG, config)
        mgr.write_file(FLAG, "while this file exists, the demo sidecar exits with status 3 after 0.3s\n")
        echo(
            f"~{self.user}/{CONFIG} (the sidecar crashes {CRASH_AFTER_S:g}s after each start "
            f"while ~/{FLAG} exists; it does now):"
        )
        indented(echo, config)

        echo(f"$ agor-units install --now        # as {self.user}")
        self.timeline = timeline = Timeline(echo, live=sys.stdout.isatty())
        self.installed = True  # from here on, uninstall when cleaning up
        cp = self.agor("install", "--now", timeout=60)
        indented(echo, cp.stdout)
        if cp.returncode != 0:
            detail = (cp.stderr.strip().splitlines() or ["no output"])[-1]
            raise DemoError(f"agor-units install --now exited {cp.returncode}: {detail}")
        self.header(cp.stdout)

        if not self.crash_loop(timeline):
            return 1
        self.manual_restart(timeline)
        self.systemd_view()
        return 0

    def header(self, install_output: str) -> None:
        m = re.search(r"^systemd (\d+): restart backoff (.+?), delays (.+)$", install_output, re.M)
        version, mode, delays = (
            m.groups() if m else (str(self.build.version), "?", ", ".join(f"{d:g}s" for d in self.delays))
        )
        how = {
            "native": "native (systemd >= 254 waits itself: RestartSteps=, RestartMaxDelaySec=)",
            "launcher fallback": "launcher fallback (systemd < 254 restarts at once; the launcher "
            "waits out each delay)",
        }.get(mode, mode)
        self.echo("")
        self.echo(f"== systemd {version}, restart backoff: {how}")
        self.echo(
            f"== delays {delays}; gives up after {self.attempts} restarts (the "
            f"{self.attempts + 1}th crash leaves the unit failed at once)"
        )
        self.echo("")
        self.echo(f"timeline in seconds since install, from `agor-units health --json` every {POLL_S:g}s:")

    def crash_loop(self, timeline: Timeline) -> bool:
        """Follow health from the first start to `failed`; False if it ended elsewhere."""
        n = self.attempts
        limit = sum(self.delays) + (n + 1) * (CRASH_AFTER_S + 1.5) + 15
        deadline = timeline.t0 + limit
        key: tuple | None = None
        seen = 0  # highest restart attempt reported so far
        last_countdown = 0.0

        def crashes_up_to(k: int) -> None:
            nonlocal seen
            for missed in range(seen + 1, k):
                timeline.event(
                    f"crash {missed}",
                    f"restarting: attempt {missed}/{n} (it came and went between two health readings)",
                )
            seen = max(seen, k - 1)

        for state in self.polls(deadline, f"the sidecar did not reach `failed` within {limit:.0f}s"):
            status = state["status"]
            if status == "failed":
                crashes_up_to(int(state.get("attempts", 0)) + 1)
                timeline.event(f"crash {seen + 1}", f"failed: {json.dumps(state)}")
                timeline.event(
                    "",
                    f"gave up: failed after {state.get('attempts')} restarts (last error: {state.get('last_error')})",
                )
                break
            if status == "restarting":
                attempt, wait = int(state["attempt"]), float(state["next_retry_s"])
                if ("restarting", attempt) != key:
                    key = ("restarting", attempt)
                    if attempt > seen:
                        crashes_up_to(attempt)
                        seen = attempt
                        timeline.event(
                            f"crash {attempt}", f"restarting: attempt {attempt}/{n}, next try in {wait:.1f}s"
                        )
                        last_countdown = time.monotonic()
                elif wait >= 0.5 and (timeline.live or time.monotonic() - last_countdown >= 1.0):
                    timeline.countdown(f"restarting: attempt {attempt}/{n}, next try in {wait:.1f}s")
                    last_countdown = time.monotonic()
                continue
            if (status,) != key:
                key = (status,)
                if status == "healthy":
                    timeline.event(
                        "healthy", "sidecar running" + (f" (restart {seen}/{n})" if seen else " (first start)")
                    )
                elif status == "starting":
                    timeline.event("starting", "first start, not READY yet")
                else:
                    timeline.event(status, json.dumps(state))

        # failed means failed: systemd does not try again by itself
        time.sleep(0.5 if self.fast else 1.0)
        errors: list[str] = []
        state = None
        for _ in range(HEALTH_ERRORS_TOLERATED):
            state = self.health(errors)
            if state is not None:
                break
        if state is None or state["status"] != "failed":
            timeline.say(f"unexpected: after giving up, health is {json.dumps(state)}")
            return False
        timeline.event("", "still failed: no more restarts until someone presses the manual restart")
        return True

    def manual_restart(self, timeline: Timeline) -> None:
        assert self.mgr is not None
        echo = timeline.say
        echo("")
        echo(f"fixing the sidecar: rm ~/{FLAG}")
        (self.mgr.home / FLAG).unlink()
        echo(f"$ agor-units restart        # as {self.user}: reset-failed + restart, full restart budget")
        cp = self.agor("restart", timeout=30)
        indented(echo, cp.stdout)
        if cp.returncode != 0:
            detail = (cp.stderr.strip().splitlines() or ["no output"])[-1]
            raise DemoError(f"agor-units restart exited {cp.returncode}: {detail}")
        limit = 15.0
        deadline = time.monotonic() + limit
        key: str | None = None
        healthy_since: float | None = None
        for state in self.polls(
            deadline, f"the sidecar did not stay healthy after the manual restart within {limit:.0f}s"
        ):
            status = state["status"]
            if status != key:
                if key == "healthy":
                    raise DemoError(f"the sidecar left `healthy` after the manual restart: {json.dumps(state)}")
                key = status
                if status == "healthy":
                    healthy_since = time.monotonic()
                else:
                    timeline.event(status, json.dumps(state))
            if healthy_since is not None and time.monotonic() - healthy_since >= self.hold_s:
                timeline.event(
                    "healthy", f"{json.dumps(state)}  (up for {self.hold_s:g}s+, the fixed sidecar stays up)"
                )
                return

    def systemd_view(self) -> None:
        assert self.mgr is not None
        echo = self.echo
        echo("")
        echo(f"$ journalctl --user -u agor-sidecar -o cat | tail -n {JOURNAL_LINES}        # systemd's own log")
        lines = self.mgr.journal_lines(SIDECAR_UNIT)
        for line in lines[-JOURNAL_LINES:]:
            echo("    " + line)
        if not lines:
            echo("    (no entries)")
        echo("")
        echo("$ systemctl --user status agor-sidecar --no-pager -n 0")
        cp = self.mgr.systemctl("status", SIDECAR_UNIT, "-n", "0", timeout=15)
        indented(echo, cp.stdout or cp.stderr)

    # -- cleanup ---------------------------------------------------------------------------------

    def cleanup(self) -> bool:
        """Uninstall, stop the manager and the namespace; True if all of it went well."""
        echo = self.say
        problems: list[str] = []
        mgr, ns = self.mgr, self.ns
        if mgr is not None and self.installed and mgr.is_alive():
            echo("")
            echo(f"$ agor-units uninstall        # as {self.user}")
            try:
                cp = self.agor("uninstall", timeout=30)
                indented(echo, cp.stdout)
                if cp.returncode != 0:
                    problems.append(
                        f"agor-units uninstall exited {cp.returncode}: "
                        f"{(cp.stderr.strip().splitlines() or ['no output'])[-1]}"
                    )
            except LabError as e:
                problems.append(str(e))
        if mgr is not None:
            for leftover in (mgr.home / "demo", mgr.home / CONFIG):
                with contextlib.suppress(OSError):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            try:
                mgr.stop()
            except LabError as e:
                problems.append(str(e))
        if ns is not None:
            try:
                ns.stop()
            except LabError as e:
                problems.append(str(e))
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        for problem in problems:
            error(self.say, f"cleaning up: {problem}")
        if ns is not None and not problems:
            echo(
                f"cleaned up: {'units uninstalled, ' if self.installed else ''}user manager and lab namespace stopped "
                f"(user {self.user} is kept for the next demo; `userdel -r {self.user}` removes it)"
            )
        return not problems


def run_demo(*, fast: bool, systemd_build: str | None, echo: Echo) -> int:
    """The whole demo; returns the exit status (0 ok, 1 error, 130 interrupted)."""
    if os.geteuid() != 0:
        error(
            echo,
            "the demo starts a throw-away systemd user manager and needs root "
            "(e.g. `sudo agor-units demo`); with a working user session, just use "
            "`agor-units install --now`",
        )
        return 1
    problem = interpreter_problem(sys.executable)
    if problem:
        error(echo, problem)
        return 1
    try:
        build = pick_build(systemd_build)
    except (LabError, DemoError) as e:
        error(echo, str(e))
        return 1

    def terminate(_signum, _frame) -> None:
        raise Interrupted()

    previous_term = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler, Ctrl-C still works
        previous_term = signal.signal(signal.SIGTERM, terminate)
    demo = Demo(build, fast, echo)
    status = 1
    try:
        status = demo.run()
    except KeyboardInterrupt:
        demo.say("")
        error(demo.say, "interrupted; cleaning up")
        status = 130
    except Interrupted:
        demo.say("")
        error(demo.say, "terminated; cleaning up")
        status = 143
    except (LabError, DemoError) as e:
        error(demo.say, str(e))
        status = 1
    except OSError as e:
        error(demo.say, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        status = 1
    finally:
        # a second Ctrl-C must not leave a manager, cgroups or a namespace behind
        previous_int = None
        with contextlib.suppress(ValueError):
            previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cleaned = demo.cleanup()
        finally:
            with contextlib.suppress(ValueError, TypeError):
                if previous_int is not None:
                    signal.signal(signal.SIGINT, previous_int)
                if previous_term is not None:
                    signal.signal(signal.SIGTERM, previous_term)
    if not cleaned and status == 0:
        status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    """`agor-units demo [--fast] [--systemd VERSION]`, which runs this as a program of its own."""
    import argparse

    parser = argparse.ArgumentParser(prog="agor-units demo")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--systemd", dest="systemd_build", metavar="VERSION")
    args = parser.parse_args(argv)

    def echo(text: str) -> None:
        print(text, flush=True)

    return run_demo(fast=args.fast, systemd_build=args.systemd_build, echo=echo)


if __name__ == "__main__":
    run_main("agor-units demo", main)
