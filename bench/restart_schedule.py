#!/usr/bin/env python3
"""Restart-schedule benchmark: how exactly the sidecar is restarted, on every systemd build here.

Run as root (it starts real, unprivileged ``systemd --user`` managers in a lab namespace)::

    /opt/agor-systemd/venv/bin/python bench/restart_schedule.py [--base-s 1] [--rounds N] [--json]

What it measures, for every build of :func:`agor_systemd.lab.testbed.available_builds` and every backoff
mode that build offers (252: launcher fallback; >= 254: native and, rendered with
``--systemd-version 252``, fallback), each on its own user manager, all managers in parallel:

1. Schedule accuracy.  ``agor-units install --now --base-s B`` with a sidecar that logs its
   CLOCK_MONOTONIC start time and crashes at once; 6 starts, then the launcher gives up and health
   says ``failed``.  For each of the 5 gaps between consecutive starts: error = gap - scheduled
   delay (B, 2B, 4B, 8B, 16B).  Target: every gap late by at most 0.3 s (and never early, with
   the integration tests' 5 ms tolerance); on a version with both modes, the fallback's largest
   error no larger than native's.
2. Launcher start-up overhead.  The same unit with a sidecar that keeps running, restarted N times
   with ``systemctl --user restart``; overhead = the sidecar's first CLOCK_MONOTONIC reading -
   the unit's ExecMainStartTimestampMonotonic (when systemd forked the ExecStart process).  For
   comparison a plain ``Type=simple`` unit whose ExecStart is the sidecar itself, restarted
   alternately with it: the difference is what the launcher adds.  These restarts run one manager
   at a time, after the schedule runs, so they do not compete with each other for the CPU.

Output: a table on stdout; with ``--json`` the table goes to stderr and a JSON document to stdout.
Exit status: 0 all targets met, 1 a target missed, 2 the benchmark could not run or measure,
130 interrupted.  Managers, lab namespace and the files written for the bench users are removed
in every case (the bench users themselves stay, like the test users).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the working tree's agor_systemd, not the venv's copy

from agor_systemd.config import RestartPolicy  # noqa: E402
from agor_systemd.lab.testbed import (  # noqa: E402
    OPT_ROOT,
    USER_LOCKS,
    VENV,
    LabError,
    LabNamespace,
    SystemdBuild,
    UserManager,
    available_builds,
    claim_name,
    deploy_package,
    package_deployed,
    venv_site,
)
from agor_systemd.sidecar.backoff import schedule  # noqa: E402
from agor_systemd.sidecar.units import NATIVE_BACKOFF_VERSION  # noqa: E402

AGOR_UNITS = VENV / "bin" / "agor-units"
LOCK_DIR = OPT_ROOT / "locks"
UNIT = "agor-sidecar.service"
DIRECT_UNIT = "agor-bench-direct.service"
BENCH_DIR = "agor-bench"  # under the bench user's home

LATE_MAX_MS = 300.0
EARLY_TOLERANCE_MS = 5.0
OVERHEAD_RESTARTS = 10

# The sidecar: reads the clock first, logs "<CLOCK_MONOTONIC ns> <pid>", then crashes or runs.
SIDECAR_PY = """\
import os, sys, time
t = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, b"%d %d\\n" % (t, os.getpid()))
os.close(fd)
print('{"type":"ready"}', flush=True)  # what agor's runners print once they are up
if sys.argv[2] == "crash":
    os._exit(3)
while True:
    time.sleep(3600)
"""
SIDECAR_ARGV = ("/usr/bin/python3", "-I", "-S")


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# the working tree's agor_systemd in the venv the units run
# ------------------------------------------------------------------------------------------------


def sync_package(site: Path) -> None:
    """Copy the working tree's agor_systemd over the venv's, as the tests' project_venv does."""
    deploy_package(REPO / "agor_systemd", site, LOCK_DIR)


def package_in_sync(site: Path) -> bool:
    return package_deployed(REPO / "agor_systemd", site)


# ------------------------------------------------------------------------------------------------
# one manager per (version, mode)
# ------------------------------------------------------------------------------------------------


def claim_user(user: str, build: SystemdBuild, ns: LabNamespace, bench_dir: str) -> tuple[Any, UserManager]:
    """Lock the bench user for this run, clear what a killed run left, start its manager."""
    claimed = claim_name([user], USER_LOCKS)  # the lock is held until release_user
    if claimed is None:
        raise LabError(f"user {user} is in use: is another benchmark running?")
    lock = claimed[1]
    mgr = UserManager(user, build, ns)
    shutil.rmtree(mgr.unit_dir, ignore_errors=True)
    shutil.rmtree(mgr.home / bench_dir, ignore_errors=True)
    mgr.start()
    return lock, mgr


def release_user(mgr: UserManager | None, lock: Any, bench_dir: str) -> None:
    """Stop the manager, remove the units and bench files (and parents left empty), unlock."""
    if mgr is not None:
        try:
            mgr.stop()  # `systemctl --user exit`: stops the units too
        except LabError as e:
            note(f"cleanup: {e}")
        for tree in (mgr.unit_dir, mgr.home / bench_dir):
            shutil.rmtree(tree, ignore_errors=True)
            for empty in tree.parents:
                if empty == mgr.home:
                    break
                with contextlib.suppress(OSError):
                    empty.rmdir()
    if lock is not None:
        lock.close()


def modes_for(build: SystemdBuild) -> list[str]:
    return ["native", "fallback"] if build.version >= NATIVE_BACKOFF_VERSION else ["fallback"]


@dataclass
class Bench:
    build: SystemdBuild
    mode: str
    base_s: float
    mgr: UserManager | None = None
    lock: Any = None
    schedules: list[dict[str, Any]] = field(default_factory=list)
    overhead: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.build.version}/{self.mode}"

    @property
    def user(self) -> str:
        return f"agor-bench-{self.build.version}-{self.mode}"

    @property
    def policy(self) -> RestartPolicy:
        return RestartPolicy(base_s=self.base_s)

    @property
    def delays(self) -> list[float]:
        return schedule(self.policy)

    # -- set-up ----------------------------------------------------------------------------------

    def start(self, ns: LabNamespace) -> None:
        self.lock, self.mgr = claim_user(self.user, self.build, ns, BENCH_DIR)
        self.mgr.write_file(f"{BENCH_DIR}/sidecar.py", SIDECAR_PY)

    def close(self) -> None:
        release_user(self.mgr, self.lock, BENCH_DIR)
        self.mgr = self.lock = None

    # -- helpers ---------------------------------------------------------------------------------

    def sidecar_command(self, log: Path, behaviour: str) -> list[str]:
        assert self.mgr is not None
        return [*SIDECAR_ARGV, str(self.mgr.home / BENCH_DIR / "sidecar.py"), str(log), behaviour]

    def install(self, log: Path, behaviour: str) -> dict[str, Any]:
        assert self.mgr is not None
        p = self.policy
        args = [
            "install",
            "--now",
            "--json",
            f"--base-s={p.base_s:g}",
            f"--cap-s={p.cap_s:g}",
            f"--attempts={p.attempts}",
            f"--stability-window-s={p.stability_window_s:g}",
            f"--read-write-path={self.mgr.home / BENCH_DIR}",
        ]  # the sidecar logs its starts there
        if self.mode == "fallback" and self.build.version >= NATIVE_BACKOFF_VERSION:
            args.append("--systemd-version=252")
        cp = self.mgr.run([str(AGOR_UNITS), *args, "--", *self.sidecar_command(log, behaviour)], timeout=60)
        if cp.returncode != 0:
            raise LabError(f"agor-units install exited {cp.returncode}: {cp.stderr.strip()}")
        report = json.loads(cp.stdout)
        wanted = "native" if self.mode == "native" else "launcher fallback"
        if report.get("backoff") != wanted:
            raise LabError(
                f"install chose backoff {report.get('backoff')!r}, expected {wanted!r} (base {p.base_s:g} s)"
            )
        return report

    def health(self) -> dict[str, Any]:
        assert self.mgr is not None
        cp = self.mgr.run([str(AGOR_UNITS), "health", "--json"], timeout=30)
        if cp.returncode not in (0, 3, 4, 5):
            raise LabError(f"agor-units health exited {cp.returncode}: {cp.stderr.strip()}")
        return json.loads(cp.stdout)

    @staticmethod
    def starts(log: Path) -> list[tuple[int, int]]:
        """(CLOCK_MONOTONIC ns, pid) of every sidecar start logged so far."""
        try:
            text = log.read_text()
        except FileNotFoundError:
            return []
        return [(int(t), int(pid)) for t, pid in (line.split() for line in text.splitlines() if line.strip())]

    # -- 1. schedule accuracy ---------------------------------------------------------------------

    def run_schedule(self, round_no: int, stop: threading.Event) -> None:
        assert self.mgr is not None
        log = self.mgr.home / BENCH_DIR / f"schedule-{round_no}-{uuid.uuid4().hex[:6]}.log"
        delays = self.delays
        expected_starts = len(delays) + 1
        self.install(log, "crash")
        deadline = time.monotonic() + sum(delays) + 30
        # Watch the log from here (cheap) and ask health only at the end: every `agor-units health`
        # is a Python start-up, which would compete for the 2 CPUs with the restarts measured.
        while len(self.starts(log)) < expected_starts:
            if stop.wait(0.2):
                raise Interrupted()
            if time.monotonic() > deadline:
                raise LabError(
                    f"{self.key}: only {len(self.starts(log))} of {expected_starts} starts within {sum(delays) + 30:g}s"
                )
        failed_deadline = time.monotonic() + 15
        while (state := self.health())["status"] != "failed":
            if time.monotonic() > failed_deadline:
                raise LabError(f"{self.key}: health never said failed after the last start; last: {state}")
            if stop.wait(0.2):
                raise Interrupted()
        times = [t for t, _ in self.starts(log)]
        if len(times) != expected_starts:
            raise LabError(f"{self.key}: {len(times)} starts, expected {expected_starts}")
        gaps_ms = [(b - a) / 1e6 for a, b in zip(times, times[1:])]
        errors_ms = [g - d * 1000 for g, d in zip(gaps_ms, delays)]
        self.schedules.append(
            {"round": round_no, "delays_s": delays, "gaps_ms": gaps_ms, "errors_ms": errors_ms, "health": state}
        )

    # -- 2. launcher start-up overhead ------------------------------------------------------------

    def run_overhead(self, round_no: int, restarts: int, stop: threading.Event) -> None:
        assert self.mgr is not None
        mgr = self.mgr
        tag = f"{round_no}-{uuid.uuid4().hex[:6]}"
        logs = {
            UNIT: mgr.home / BENCH_DIR / f"launcher-{tag}.log",
            DIRECT_UNIT: mgr.home / BENCH_DIR / f"direct-{tag}.log",
        }
        self.install(logs[UNIT], "run")
        # `install --now` returns at READY=1, which the launcher sends right after spawning the
        # sidecar: wait for that first start, or it would be counted for the first restart
        deadline = time.monotonic() + 10
        while not self.starts(logs[UNIT]):
            if time.monotonic() > deadline:
                raise LabError(f"{self.key}: the sidecar did not start within 10 s of install --now")
            time.sleep(0.01)
        direct = "\n".join(
            [
                "[Unit]",
                "Description=agor bench: the sidecar started directly, no launcher",
                "StartLimitIntervalSec=0",
                "",
                "[Service]",
                "Type=simple",
                "ExecStart=" + " ".join(self.sidecar_command(logs[DIRECT_UNIT], "run")),
                "",
            ]
        )
        mgr.write_file(f".config/systemd/user/{DIRECT_UNIT}", direct)
        mgr.systemctl("daemon-reload", check=True, timeout=30)
        samples: dict[str, list[float]] = {UNIT: [], DIRECT_UNIT: []}
        try:
            for _ in range(restarts):
                for unit in (UNIT, DIRECT_UNIT):  # alternate, so both see the same background load
                    if stop.is_set():
                        raise Interrupted()
                    samples[unit].append(self._one_restart(unit, logs[unit]))
        finally:
            mgr.systemctl("stop", UNIT, DIRECT_UNIT, timeout=30)
        self.overhead.append({"round": round_no, "launcher_ms": samples[UNIT], "direct_ms": samples[DIRECT_UNIT]})

    def _one_restart(self, unit: str, log: Path) -> float:
        assert self.mgr is not None
        before = len(self.starts(log))
        # every manual start counts against StartLimitBurst= (6 per 300 s for the sidecar's unit):
        # reset-failed on the running unit clears the start limiter
        self.mgr.systemctl("reset-failed", unit, timeout=15)
        self.mgr.systemctl("restart", unit, check=True, timeout=30)
        deadline = time.monotonic() + 10
        while len(found := self.starts(log)) <= before:
            if time.monotonic() > deadline:
                raise LabError(f"{self.key}: {unit} restarted but its sidecar logged no start in 10 s")
            time.sleep(0.01)
        if len(found) != before + 1:
            raise LabError(f"{self.key}: {unit}: {len(found) - before} sidecar starts for one restart")
        sidecar_ns, sidecar_pid = found[-1]
        cp = self.mgr.systemctl(
            "show", "-p", "ExecMainStartTimestampMonotonic", "-p", "MainPID", "-p", "ActiveState", unit, timeout=15
        )
        props = dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)
        if props.get("ActiveState") != "active":
            raise LabError(f"{self.key}: {unit} is {props.get('ActiveState')!r} after the restart")
        main_pid = int(props["MainPID"])
        if unit == DIRECT_UNIT and main_pid != sidecar_pid:
            raise LabError(f"{self.key}: {unit} MainPID {main_pid} is not the sidecar ({sidecar_pid})")
        if unit == UNIT and _parent_pid(sidecar_pid) != main_pid:
            raise LabError(f"{self.key}: the sidecar {sidecar_pid} is not a child of MainPID {main_pid}")
        forked_us = int(props["ExecMainStartTimestampMonotonic"])
        return (sidecar_ns / 1000 - forked_us) / 1000


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median_ms": None, "max_ms": None, "min_ms": None}
    return {"median_ms": statistics.median(values), "max_ms": max(values), "min_ms": min(values)}


def summarize(
    benches: list[Bench], args: argparse.Namespace, machine: dict[str, Any], loads: list[dict[str, Any]], venv_ok: bool
) -> dict[str, Any]:
    targets: list[dict[str, Any]] = []
    results = []
    for b in benches:
        errors = [e for s in b.schedules for e in s["errors_ms"]]
        launcher = [x for o in b.overhead for x in o["launcher_ms"]]
        direct = [x for o in b.overhead for x in o["direct_ms"]]
        entry: dict[str, Any] = {
            "systemd": b.build.version,
            "systemd_full_version": b.build.full_version,
            "mode": b.mode,
            "user": b.user,
            "delays_s": b.delays,
            "rounds": b.schedules,
            "error": stats(errors),
            "overhead": {
                "rounds": b.overhead,
                "launcher": stats(launcher),
                "direct": stats(direct),
                "added_median_ms": (statistics.median(launcher) - statistics.median(direct))
                if launcher and direct
                else None,
                "ratio_median": (statistics.median(launcher) / statistics.median(direct))
                if launcher and direct and statistics.median(direct) > 0
                else None,
            },
            "problems": b.errors,
        }
        results.append(entry)
        if errors:
            ok = all(-EARLY_TOLERANCE_MS <= e <= LATE_MAX_MS for e in errors)
            targets.append(
                {
                    "target": f"systemd {b.build.version} {b.mode}: every gap late by 0..{LATE_MAX_MS:g} ms",
                    "met": ok,
                    "detail": f"errors {min(errors):+.0f} .. {max(errors):+.0f} ms",
                }
            )
    by_key = {(r["systemd"], r["mode"]): r for r in results}
    for (version, mode), r in by_key.items():
        native = by_key.get((version, "native"))
        if mode != "fallback" or native is None:
            continue
        f_max, n_max = r["error"]["max_ms"], native["error"]["max_ms"]
        if f_max is None or n_max is None:
            continue
        targets.append(
            {
                "target": f"systemd {version}: fallback no later than native (max error)",
                "met": f_max <= n_max,
                "detail": f"fallback {f_max:.0f} ms, native {n_max:.0f} ms",
            }
        )
    problems = [f"{b.key}: {e}" for b in benches for e in b.errors]
    return {
        "benchmark": "restart_schedule",
        "command": " ".join([sys.executable, *sys.argv]),
        "base_s": args.base_s,
        "rounds": args.rounds,
        "overhead_restarts": args.restarts,
        "target_late_max_ms": LATE_MAX_MS,
        "early_tolerance_ms": EARLY_TOLERANCE_MS,
        "machine": machine,
        "load": loads,
        "venv_package_unchanged_during_run": venv_ok,
        "results": results,
        "targets": targets,
        "problems": problems,
        "all_targets_met": bool(targets) and all(t["met"] for t in targets) and not problems,
    }


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"Restart schedule benchmark: {m['os']}, kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu']})",
        f"base {doc['base_s']:g} s, {doc['rounds']} round(s); load average before/after rounds: "
        + "; ".join(f"{x['before'][0]:.2f}/{x['after'][0]:.2f}" for x in doc["load"]),
        "",
    ]
    delays = doc["results"][0]["delays_s"] if doc["results"] else []
    lines.append(
        "Error = gap between sidecar starts - scheduled delay (ms); target: 0 <= error <= "
        f"{doc['target_late_max_ms']:g} ms"
    )
    head = (
        f"{'systemd':<9}{'mode':<10}{'median':>8}{'max':>8}   per-gap errors (delays "
        + ", ".join(f"{d:g}" for d in delays)
        + " s)"
    )
    lines += [head, "-" * len(head)]
    for r in doc["results"]:
        rounds = r["rounds"] or [{"errors_ms": []}]
        for i, s in enumerate(rounds):
            prefix = (
                f"{r['systemd']:<9}{r['mode']:<10}{fmt(r['error']['median_ms']):>8}{fmt(r['error']['max_ms']):>8}"
                if i == 0
                else " " * 35
            )
            gaps = ", ".join(f"{e:+.0f}" for e in s["errors_ms"]) or "(no data)"
            lines.append(f"{prefix}   {gaps}" + (f"   (round {s['round']})" if len(rounds) > 1 else ""))
    lines += [
        "",
        "Launcher start-up overhead: systemd forks ExecStart -> sidecar's first instruction (ms), "
        f"{doc['overhead_restarts']} restarts per round",
        f"{'systemd':<9}{'mode':<10}{'launcher med/max':>18}{'direct med/max':>17}{'added':>8}{'ratio':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    for r in doc["results"]:
        o = r["overhead"]
        lines.append(
            f"{r['systemd']:<9}{r['mode']:<10}"
            f"{fmt(o['launcher']['median_ms'], '.1f') + ' / ' + fmt(o['launcher']['max_ms'], '.1f'):>18}"
            f"{fmt(o['direct']['median_ms'], '.1f') + ' / ' + fmt(o['direct']['max_ms'], '.1f'):>17}"
            f"{fmt(o['added_median_ms'], '+.1f'):>8}{fmt(o['ratio_median'], '.1f') + 'x':>7}"
        )
    lines += ["", "Targets:"]
    lines += [f"  [{'ok  ' if t['met'] else 'MISS'}] {t['target']}: {t['detail']}" for t in doc["targets"]]
    for p in doc["problems"]:
        lines.append(f"  [FAIL] {p}")
    if not doc["venv_package_unchanged_during_run"]:
        lines.append(
            "  warning: the venv's agor_systemd changed during the run (a test session synced "
            "another tree?): figures may not be this tree's"
        )
    return "\n".join(lines)


def machine_info(builds: list[SystemdBuild]) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    osname = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    with contextlib.suppress(OSError):
        osname += f" ({Path('/etc/debian_version').read_text().strip()})"
    return {
        "os": osname,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "systemd": {str(b.version): b.full_version + ("" if b.is_host else f" ({b.prefix})") for b in builds},
    }


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


WORKERS: list[threading.Thread] = []


def run_parallel(benches: list[Bench], work, what: str) -> None:
    """work(bench) in one thread per bench; problems are recorded on the bench."""

    def target(b: Bench) -> None:
        try:
            work(b)
        except Interrupted:
            pass
        except Exception as e:  # recorded and reported; the other managers go on
            b.errors.append(f"{what}: {e}")

    threads = [threading.Thread(target=target, args=(b,), name=f"{what}-{b.key}", daemon=True) for b in benches]
    WORKERS.extend(threads)
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)  # short joins so Ctrl-C reaches the main thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-s", type=float, default=1.0, help="first restart delay (default 1 s)")
    parser.add_argument("--rounds", type=int, default=1, help="how often to repeat everything (default 1)")
    parser.add_argument(
        "--restarts",
        type=int,
        default=OVERHEAD_RESTARTS,
        help=f"restarts per unit for the overhead measurement (default {OVERHEAD_RESTARTS})",
    )
    parser.add_argument("--json", action="store_true", help="JSON document on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("restart_schedule: needs root (it starts systemd user managers in a lab namespace)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.restarts < 1 or args.base_s <= 0:
        parser.error("--rounds and --restarts must be >= 1, --base-s > 0")

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    stop = threading.Event()
    benches: list[Bench] = []
    builds: list[SystemdBuild] = []
    ns: LabNamespace | None = None
    loads: list[dict[str, Any]] = []
    venv_ok = False
    outcome: int | None = None
    try:
        site = venv_site()
        sync_package(site)
        builds = available_builds()
        if not builds:
            raise LabError("no systemd build found")
        benches = [Bench(b, mode, args.base_s) for b in builds for mode in modes_for(b)]
        note(
            "systemd builds: "
            + ", ".join(f"{b.version} ({b.full_version})" for b in builds)
            + "; runs: "
            + ", ".join(b.key for b in benches)
        )
        ns = LabNamespace().start()
        for b in benches:
            b.start(ns)
        for r in range(1, args.rounds + 1):
            load = {"round": r, "before": os.getloadavg()}
            note(f"round {r}: schedule runs in parallel (~{sum(benches[0].delays) + 4:.0f} s)")
            run_parallel([b for b in benches if not b.errors], lambda b: b.run_schedule(r, stop), "schedule")  # noqa: B023 - run_parallel waits
            note(f"round {r}: launcher overhead, {args.restarts} restarts per unit, one manager at a time")
            for b in benches:
                if not b.errors:
                    run_parallel([b], lambda b: b.run_overhead(r, args.restarts, stop), "overhead")  # noqa: B023 - run_parallel waits
            load["after"] = os.getloadavg()
            loads.append(load)
        venv_ok = package_in_sync(site)
    except KeyboardInterrupt:
        note("interrupted: cleaning up")
        outcome = 130
    except LabError as e:
        note(f"error: {e}")
        outcome = 2
    finally:
        # cleanup must not be cut short by a second Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        _join_workers(deadline=time.monotonic() + 15)
        _cleanup(benches, ns)
    if outcome is not None:
        return outcome
    doc = summarize(benches, args, machine_info(builds), loads, venv_ok)
    table = render(doc)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(doc, indent=2))
    else:
        print(table)
    if doc["problems"] or not doc["targets"]:
        return 2
    return 0 if doc["all_targets_met"] else 1


def _join_workers(deadline: float) -> None:
    """Let worker threads notice the stop event (their commands time out at 30 s at worst)."""
    for t in WORKERS:
        t.join(max(0.0, deadline - time.monotonic()))


def _cleanup(benches: list[Bench], ns: LabNamespace | None) -> None:
    for b in benches:
        b.close()
    if ns is not None:
        try:
            ns.stop()
        except LabError as e:
            note(f"cleanup: {e}")


if __name__ == "__main__":
    sys.exit(main())
