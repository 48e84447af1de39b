#!/usr/bin/env python3
"""Watchdog and launcher-cost benchmark: hang-detection latency, start-up overhead, idle cost.

Run as root (part 1 starts real, unprivileged ``systemd --user`` managers in a lab namespace)::

    /opt/agor-systemd/venv/bin/python bench/watchdog.py [--reps 3] [--watchdog-s 2,5] [--json]

1. Hang-detection latency, on every build of :func:`agor_systemd.lab.testbed.available_builds` (default
   backoff mode of each: 252 launcher fallback, >= 254 native), one user manager per build, the
   managers in parallel.  ``agor-units install --now --watchdog-s=W --base-s=B`` with
   ``tests/programs/fake_sidecar.py`` and the plan ``stop-self:1, hang`` (SIGSTOP 1 s after the start: T
   state) or ``spin:1, hang`` with ``--activity-timeout-s=1`` (busy loop, silent after 1 s); the
   1 s is really 1 s + (r - 0.5)/n of the launcher's 0.25 s check period for repetition r of n
   (see HANG_AFTER_S).  hang = the first start's logged CLOCK_MONOTONIC + that; new start = the second start's logged
   CLOCK_MONOTONIC; latency = new start - hang.  The restart delay B is *included* in the latency;
   "latency - B" is reported too.  The journal gives the breakdown (the launcher's "is hung" and
   "watchdog timeout" records).  Target: latency (B included) <= W + 0.5 s.
   Then, per manager, the launcher of an installed, healthy unit (W = 2 s) is sampled for 10 s:
   CPU and RSS of the real thing, D-Bus connection included.
2. Launcher start-up overhead, outside systemd, interleaved in random order: (a) ``python3 -I -S
   -c pass``, (b) ``python -I -S _launch.py --unit x.service --attempts 0 --stability-window 300
   --ready immediate --reset-via notify -- /bin/true`` (no D-Bus connection: ``--attempts 0`` with
   ``--reset-via notify`` makes launcher.run() skip it), (b') the same with the default
   ``--reset-via dbus`` (loads ctypes + libsystemd and tries the bus, which fails outside a
   manager), (c) ``/bin/true``.  Target: (b - c) / a <= 1.5 (medians).  Plus ``-X importtime``.
3. Idle cost, outside systemd, with a fake NOTIFY_SOCKET the bench reads and WATCHDOG_USEC=2 s,
   sidecar ``/bin/sleep 30``: after 2 s, CPU time (/proc/PID/schedstat), VmRSS/VmHWM and the
   WATCHDOG=1 rate over 10 s, against ``python3 -I -S -c "import time; time.sleep(30)"``.
   Targets: CPU <= 1 %, WATCHDOG=1 rate 0.9 .. 1.1 per second.

Output: a table on stdout; with ``--json`` the table goes to stderr and a JSON document to stdout.
Exit status: 0 all targets met, 1 a target missed, 2 the benchmark could not run or measure,
130 interrupted.  Managers, lab namespace, processes and files are removed in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import restart_schedule as rs
from restart_schedule import AGOR_UNITS, REPO, VENV, Interrupted, note

from agor_systemd.lab.testbed import (
    LabError,
    LabNamespace,
    SystemdBuild,
    UserManager,
    available_builds,
)

UNIT = "agor-sidecar.service"
# Under the bench user's home, in the one directory the units' default Landlock sandbox lets the
# sidecar write: its log, plan and the fake sidecar itself.
BENCH_DIR = ".local/share/agor/bench-wd"
SYSTEM_PYTHON = "/usr/bin/python3"
SLACK_S = 0.5  # target: latency <= WatchdogSec + 0.5 s
OVERHEAD_TARGET = 1.5
CPU_TARGET_PCT = 1.0
PING_RATE = (0.9, 1.1)
IDLE_SETTLE_S = 2.0
IDLE_SAMPLE_S = 10.0
CASES = {
    "stop-self": ("stop-self", []),
    "spin": ("spin", ["--activity-timeout-s=1"]),
}
HANG_AFTER_S = 1.0
# The launcher checks liveness every LIVENESS_CHECK_S from the ready line on, and the fake sidecar
# prints that line just before its S-second sleep: with S = 1 s exactly (4 periods) every hang
# would fall right before a check and look detected at once.  Repetition r of n hangs at
# 1 s + (r - 0.5) / n of a period instead, spread over the check period like real hangs.
from agor_systemd.sidecar.launcher import LIVENESS_CHECK_S  # noqa: E402

# ------------------------------------------------------------------------------------------------
# /proc helpers
# ------------------------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """Time on CPU so far (ns), from /proc/PID/schedstat (finer than utime+stime ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def sample_idle(
    pid: int, stop: threading.Event, settle_s: float = IDLE_SETTLE_S, window_s: float = IDLE_SAMPLE_S, on_window=None
) -> dict[str, Any]:
    """CPU and memory of `pid` over `window_s`, after `settle_s`."""
    if stop.wait(settle_s):
        raise Interrupted()
    t0, c0, k0, s0 = time.monotonic(), cpu_ns(pid), ticks(pid), status_kib(pid)
    if on_window:
        on_window("start", t0)
    rss = []
    while (left := t0 + window_s - time.monotonic()) > 0:
        if stop.wait(min(1.0, left)):
            raise Interrupted()
        rss.append(status_kib(pid)["VmRSS"])
    t1, c1, k1, s1 = time.monotonic(), cpu_ns(pid), ticks(pid), status_kib(pid)
    if on_window:
        on_window("end", t1)
    span = t1 - t0
    clk = os.sysconf("SC_CLK_TCK")
    return {
        "window_s": span,
        "cpu_pct": (c1 - c0) / 1e9 / span * 100,
        "cpu_pct_ticks": (k1 - k0) / clk / span * 100,
        "cpu_ms_per_s": (c1 - c0) / 1e6 / span,
        "wakeups_per_s": (
            s1["voluntary_ctxt_switches"]
            - s0["voluntary_ctxt_switches"]
            + s1["nonvoluntary_ctxt_switches"]
            - s0["nonvoluntary_ctxt_switches"]
        )
        / span,
        "rss_mib": max(rss + [s1["VmRSS"]]) / 1024,
        "rss_anon_mib": s1["RssAnon"] / 1024,
        "rss_file_mib": s1["RssFile"] / 1024,
        "hwm_mib": s1["VmHWM"] / 1024,
    }


# ------------------------------------------------------------------------------------------------
# 1. hang-detection latency under real managers
# ------------------------------------------------------------------------------------------------


@dataclass
class Manager:
    build: SystemdBuild
    base_s: float
    mgr: UserManager | None = None
    lock: Any = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    idle: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return str(self.build.version)

    @property
    def user(self) -> str:
        return f"agor-bench-wd-{self.build.version}"

    @property
    def mode(self) -> str:
        return "native" if self.build.version >= rs.NATIVE_BACKOFF_VERSION else "fallback"

    def start(self, ns: LabNamespace) -> None:
        self.lock, self.mgr = rs.claim_user(self.user, self.build, ns, BENCH_DIR)
        self.mgr.write_file(
            f"{BENCH_DIR}/fake_sidecar.py", (REPO / "tests" / "programs" / "fake_sidecar.py").read_text(), mode=0o755
        )

    def close(self) -> None:
        rs.release_user(self.mgr, self.lock, BENCH_DIR)
        self.mgr = self.lock = None

    def install(self, plan: list[str], watchdog_s: float, extra: list[str]) -> Path:
        assert self.mgr is not None
        token = uuid.uuid4().hex[:8]
        log = self.mgr.home / BENCH_DIR / f"starts-{token}.jsonl"
        plan_file = self.mgr.write_file(f"{BENCH_DIR}/plan-{token}.txt", "\n".join(plan) + "\n")
        fake = self.mgr.home / BENCH_DIR / "fake_sidecar.py"
        cp = self.mgr.run(
            [
                str(AGOR_UNITS),
                "install",
                "--now",
                "--json",
                f"--watchdog-s={watchdog_s:g}",
                f"--base-s={self.base_s:g}",
                "--attempts=5",
                "--stability-window-s=300",
                *extra,
                "--",
                SYSTEM_PYTHON,
                "-I",
                "-S",
                str(fake),
                "--log",
                str(log),
                "--plan",
                str(plan_file),
            ],
            timeout=60,
        )
        if cp.returncode != 0:
            raise LabError(f"agor-units install exited {cp.returncode}: {cp.stderr.strip()}")
        return log

    @staticmethod
    def starts(log: Path) -> list[dict[str, Any]]:
        try:
            text = log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def finish_unit(self) -> None:
        assert self.mgr is not None
        self.mgr.systemctl("stop", UNIT, timeout=30)
        self.mgr.systemctl("reset-failed", UNIT, timeout=15)  # clears the start limiter as well

    def journal(self) -> list[dict[str, Any]]:
        assert self.mgr is not None
        self.mgr.namespace.sync_journal()
        cp = self.mgr.journalctl("--user", "-u", UNIT, "-o", "json", timeout=30)
        out = []
        for line in cp.stdout.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry.get("MESSAGE"), str):
                    out.append(entry)
        return out

    def run_hang(self, case: str, watchdog_s: float, rep: int, reps: int, stop: threading.Event) -> None:
        behaviour, extra = CASES[case]
        hang_after = round(HANG_AFTER_S + LIVENESS_CHECK_S * (rep - 0.5) / reps, 4)
        log = self.install([f"{behaviour}:{hang_after:g}", "hang"], watchdog_s, extra)
        deadline = time.monotonic() + hang_after + watchdog_s * 1.5 + self.base_s + 15
        try:
            while len(found := self.starts(log)) < 2:
                if stop.wait(0.05):
                    raise Interrupted()
                if time.monotonic() > deadline:
                    raise LabError(f"{self.key} {case} W={watchdog_s:g}: {len(found)} start(s), no restart in time")
            time.sleep(0.3)  # a third start would be a problem
            found = self.starts(log)
            journal = self.journal()
            nrestarts = self.mgr.unit_property(UNIT, "NRestarts")  # type: ignore[union-attr]
        finally:
            self.finish_unit()
        if len(found) != 2:
            raise LabError(f"{self.key} {case} W={watchdog_s:g}: {len(found)} starts, expected 2")
        first, second = found
        hang = first["mono"] + hang_after
        hung_at = crash_at = None
        reason = None
        for e in journal:
            msg = e["MESSAGE"]
            at = int(e["__MONOTONIC_TIMESTAMP"]) / 1e6
            if hung_at is None and f"sidecar (pid {first['pid']}) is hung" in msg:
                hung_at, reason = at, msg.split("is hung: ", 1)[1].split(";")[0]
            elif hung_at is not None and crash_at is None and "watchdog timeout" in msg and "agor-launch" in msg:
                crash_at = at
        if hung_at is None:
            raise LabError(
                f"{self.key} {case} W={watchdog_s:g}: no 'is hung' record of pid {first['pid']} "
                "in the journal: the restart was not the launcher's hang detection"
            )
        latency = second["mono"] - hang
        self.runs.append(
            {
                "case": case,
                "watchdog_s": watchdog_s,
                "rep": rep,
                "hang_after_s": hang_after,
                "base_s": self.base_s,
                "reason": reason,
                "latency_s": latency,
                "latency_minus_delay_s": latency - self.base_s,
                "detect_s": hung_at - hang,
                "kill_s": None if crash_at is None else crash_at - hung_at,
                "restart_s": None if crash_at is None else second["mono"] - crash_at,
                "nrestarts": nrestarts,
            }
        )

    def run_idle(self, stop: threading.Event) -> None:
        """The real launcher of a healthy unit (WatchdogSec=2s): CPU and RSS over 10 s."""
        assert self.mgr is not None
        log = self.install(["hang"], 2.0, [])
        try:
            deadline = time.monotonic() + 10
            while not self.starts(log):
                if stop.wait(0.05):
                    raise Interrupted()
                if time.monotonic() > deadline:
                    raise LabError(f"{self.key}: the sidecar did not start")
            pid = int(self.mgr.unit_property(UNIT, "MainPID"))
            ts0 = self.mgr.unit_property(UNIT, "WatchdogTimestampMonotonic")
            marks: dict[str, str] = {}

            def on_window(which: str, _t: float) -> None:
                marks[which] = self.mgr.unit_property(UNIT, "WatchdogTimestampMonotonic")  # type: ignore[union-attr]

            result = sample_idle(pid, stop, on_window=on_window)
            state = self.mgr.unit_property(UNIT, "ActiveState")
        finally:
            self.finish_unit()
        result.update({"pid": pid, "state_after": state, "watchdog_timestamp_moved": ts0 != marks.get("end")})
        self.idle = result


# ------------------------------------------------------------------------------------------------
# 2. start-up overhead outside systemd
# ------------------------------------------------------------------------------------------------


def launcher_argv(site: Path, sidecar: list[str], *, bus: bool, attempts: int = 0) -> list[str]:
    args = [
        str(VENV / "bin" / "python"),
        "-I",
        "-S",
        str(site / "agor_systemd" / "_launch.py"),
        "--unit",
        "x.service",
        "--attempts",
        str(attempts),
        "--stability-window",
        "300",
        "--ready",
        "immediate",
    ]
    if not bus:
        args += ["--reset-via", "notify"]
    return [*args, "--", *sidecar]


BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}  # no NOTIFY_SOCKET, no WATCHDOG_*


def time_once(argv: list[str]) -> tuple[float, int]:
    devnull = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)]
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, BASE_ENV, file_actions=devnull)
    _, status = os.waitpid(pid, 0)
    return (time.perf_counter_ns() - t0) / 1e6, os.waitstatus_to_exitcode(status)


def measure_startup(site: Path, n: int, stop: threading.Event) -> dict[str, Any]:
    variants = {
        "python": [SYSTEM_PYTHON, "-I", "-S", "-c", "pass"],
        "venv_python": [str(VENV / "bin" / "python"), "-I", "-S", "-c", "pass"],
        "launcher": launcher_argv(site, ["/bin/true"], bus=False),
        "launcher_dbus": launcher_argv(site, ["/bin/true"], bus=True),
        "true": ["/bin/true"],
    }
    expected = {
        "python": 0,
        "venv_python": 0,
        "launcher": 250,
        "launcher_dbus": 250,
        "true": 0,
    }  # 250: gave up (--attempts 0)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(1)
    for i in range(n + 3):  # 3 warm-up rounds (page cache, .pyc files)
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            if stop.is_set():
                raise Interrupted()
            ms, code = time_once(variants[name])
            if code != expected[name]:
                raise LabError(f"start-up: {' '.join(variants[name])} exited {code}, expected {expected[name]}")
            if i >= 3:
                samples[name].append(ms)
    summary = {
        k: {"median_ms": statistics.median(v), "p90_ms": statistics.quantiles(v, n=10)[-1], "min_ms": min(v)}
        for k, v in samples.items()
    }
    a, b, bb, c = (summary[k]["median_ms"] for k in ("python", "launcher", "launcher_dbus", "true"))
    return {
        "n": n,
        "argv": {k: " ".join(v) for k, v in variants.items()},
        "samples_ms": samples,
        "summary": summary,
        "ratio_minus_true": (b - c) / a,
        "ratio_total": b / (a + c),
        "ratio_dbus_minus_true": (bb - c) / a,
        "launcher_minus_python_ms": b - c - a,
        "importtime": importtime(site),
    }


def importtime(site: Path) -> dict[str, Any]:
    """`-X importtime` of a whole launcher run against `python -I -S -c pass`: what the launcher adds."""
    argv = launcher_argv(site, ["/bin/true"], bus=False)
    launcher = importtime_of([argv[0], "-X", "importtime", *argv[1:]])
    bare = importtime_of([argv[0], "-X", "importtime", "-I", "-S", "-c", "pass"])
    known = {r["module"].strip() for r in bare["all"]}
    extra = [r for r in launcher["all"] if r["module"].strip() not in known]
    launcher["bare_python_total_self_us"] = bare["total_self_us"]
    launcher["bare_python_modules"] = bare["modules"]
    launcher["extra_modules"] = len(extra)
    launcher["extra_self_us"] = sum(r["self_us"] for r in extra)
    launcher["extra_top"] = [r["module"].strip() for r in extra[:12]]
    del launcher["all"]
    return launcher


def importtime_of(argv: list[str], runs: int = 5) -> dict[str, Any]:
    """Parse `-X importtime` output: median self/cumulative µs per module over `runs` runs."""
    per: dict[str, list[tuple[int, int]]] = {}
    totals = []
    for _ in range(runs):
        import subprocess

        cp = subprocess.run(argv, env=BASE_ENV, capture_output=True, text=True, check=False)
        total = 0
        for line in cp.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = (x.strip() for x in line[len("import time:") :].split("|"))
            per.setdefault(name.strip(), []).append((int(self_us), int(cum_us)))
            total += int(self_us)
        totals.append(total)
    rows = [
        {
            "module": name,
            "self_us": statistics.median(s for s, _ in v),
            "cumulative_us": statistics.median(c for _, c in v),
            "depth": (len(name) - len(name.lstrip())) // 2,
        }
        for name, v in per.items()
    ]
    rows.sort(key=lambda r: r["self_us"], reverse=True)
    launcher_cum = next((r["cumulative_us"] for r in rows if r["module"] == "agor_systemd.sidecar.launcher"), None)
    return {
        "total_self_us": statistics.median(totals),
        "modules": len(rows),
        "agor_systemd_launcher_cumulative_us": launcher_cum,
        "top": rows[:12],
        "all": rows,
    }


# ------------------------------------------------------------------------------------------------
# 3. idle cost outside systemd, with a fake NOTIFY_SOCKET
# ------------------------------------------------------------------------------------------------


class NotifyListener:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def count(self, field_: str, t0: float, t1: float) -> int:
        return sum(1 for t, m in self.messages if t0 <= t < t1 and field_ in m.split("\n"))

    def close(self) -> None:
        self.closed = True
        self.thread.join(1)
        self.sock.close()


STARTED: list[int] = []  # processes this bench started outside systemd (pid), for cleanup


def measure_idle(site: Path, tmp: Path, stop: threading.Event) -> dict[str, Any]:
    import subprocess

    variants = {
        "launcher": launcher_argv(site, ["/bin/sleep", "30"], bus=False),
        "launcher_dbus": launcher_argv(site, ["/bin/sleep", "30"], bus=True, attempts=5),
        "python_sleep": [SYSTEM_PYTHON, "-I", "-S", "-c", "import time; time.sleep(30)"],
    }
    listeners: dict[str, NotifyListener] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    results: dict[str, Any] = {}
    threads = []
    try:
        for name, argv in variants.items():
            env = dict(BASE_ENV)
            if name.startswith("launcher"):
                path = str(tmp / f"notify-{name}")
                listeners[name] = NotifyListener(path)
                env.update({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
            procs[name] = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            STARTED.append(procs[name].pid)

        def work(name: str) -> None:
            window: dict[str, float] = {}
            try:
                r = sample_idle(procs[name].pid, stop, on_window=lambda w, t: window.__setitem__(w, t))
            except Interrupted:
                return
            except OSError as e:
                results[name] = {"error": f"{name}: {e} (exited {procs[name].poll()})"}
                return
            if name in listeners:
                pings = listeners[name].count("WATCHDOG=1", window["start"], window["end"])
                r.update(
                    {
                        "watchdog_pings": pings,
                        "pings_per_s": pings / (window["end"] - window["start"]),
                        "sidecar_pids": children(procs[name].pid),
                        "ready_sent": any("READY=1" in m for _, m in listeners[name].messages),
                    }
                )
            results[name] = r

        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in variants]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        if stop.is_set():
            raise Interrupted()
    finally:
        for p in procs.values():
            stop_process(p)
        for listener in listeners.values():
            listener.close()
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise LabError("idle: " + "; ".join(errors))
    return {"argv": {k: " ".join(v) for k, v in variants.items()}, "watchdog_usec": 2000000, **results}


def stop_process(p) -> None:
    """SIGTERM (the launcher forwards it to its sidecar), then SIGKILL; leftover sidecars too."""
    if p.poll() is None:
        kids = children(p.pid)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except Exception:
            p.kill()
            p.wait(5)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
    with contextlib.suppress(ValueError):
        STARTED.remove(p.pid)


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------


def summarize(
    managers: list[Manager],
    startup: dict[str, Any] | None,
    idle: dict[str, Any] | None,
    args: argparse.Namespace,
    machine: dict[str, Any],
    loads: dict[str, Any],
    venv_ok: bool,
) -> dict[str, Any]:
    targets: list[dict[str, Any]] = []
    hang_rows = []
    for m in managers:
        for case in CASES:
            for w in args.watchdog_s:
                runs = [r for r in m.runs if r["case"] == case and r["watchdog_s"] == w]
                if not runs:
                    continue
                lat = [r["latency_s"] for r in runs]
                det = [r["detect_s"] for r in runs]
                row = {
                    "systemd": m.build.version,
                    "mode": m.mode,
                    "case": case,
                    "watchdog_s": w,
                    "base_s": m.base_s,
                    "runs": len(runs),
                    "latency_median_s": statistics.median(lat),
                    "latency_max_s": max(lat),
                    "latency_minus_delay_max_s": max(lat) - m.base_s,
                    "detect_median_s": statistics.median(det),
                    "detect_max_s": max(det),
                    "reasons": sorted({r["reason"] for r in runs}),
                }
                for k in ("kill_s", "restart_s"):
                    vals = [r[k] for r in runs if r[k] is not None]
                    row[k.replace("_s", "_median_s")] = statistics.median(vals) if vals else None
                hang_rows.append(row)
                targets.append(
                    {
                        "target": f"systemd {m.build.version} {case} W={w:g}s: hang -> new start (restart delay "
                        f"{m.base_s:g} s included) <= {w + SLACK_S:g} s",
                        "met": max(lat) <= w + SLACK_S,
                        "detail": f"max {max(lat):.2f} s (median {statistics.median(lat):.2f} s; "
                        f"without the delay {max(lat) - m.base_s:.2f} s)",
                    }
                )
    if startup:
        targets.append(
            {
                "target": f"launcher start-up: (launcher - /bin/true) / (python3 -I -S -c pass) <= {OVERHEAD_TARGET:g}",
                "met": startup["ratio_minus_true"] <= OVERHEAD_TARGET,
                "detail": f"{startup['ratio_minus_true']:.2f}x (launcher / (python + true) "
                f"{startup['ratio_total']:.2f}x)",
            }
        )
    idle_all = []
    if idle:
        idle_all.append(("outside systemd, no D-Bus", idle["launcher"]))
        idle_all.append(("outside systemd, D-Bus tried", idle["launcher_dbus"]))
        for name in ("launcher", "launcher_dbus"):
            r = idle[name]
            lo, hi = PING_RATE
            targets.append(
                {
                    "target": f"idle {name}: WATCHDOG=1 rate {lo:g}..{hi:g}/s",
                    "met": lo <= r["pings_per_s"] <= hi,
                    "detail": f"{r['pings_per_s']:.2f}/s ({r['watchdog_pings']} in {r['window_s']:.1f} s)",
                }
            )
    for m in managers:
        if m.idle:
            idle_all.append((f"systemd {m.build.version} unit", m.idle))
    for label, r in idle_all:
        targets.append(
            {
                "target": f"idle CPU ({label}) <= {CPU_TARGET_PCT:g} %",
                "met": r["cpu_pct"] <= CPU_TARGET_PCT,
                "detail": f"{r['cpu_pct']:.3f} %",
            }
        )
    problems = [f"{m.key}: {e}" for m in managers for e in m.errors]
    return {
        "benchmark": "watchdog",
        "command": " ".join([sys.executable, *sys.argv]),
        "reps": args.reps,
        "watchdog_s": args.watchdog_s,
        "base_s": args.base_s,
        "starts": args.starts,
        "machine": machine,
        "load": loads,
        "venv_package_unchanged_during_run": venv_ok,
        "hang": {"rows": hang_rows, "runs": {m.key: m.runs for m in managers}},
        "idle_in_unit": {m.key: m.idle for m in managers},
        "startup": startup,
        "idle": idle,
        "targets": targets,
        "problems": problems,
        "all_targets_met": bool(targets) and all(t["met"] for t in targets) and not problems,
    }


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    ld = doc["load"]
    lines = [
        f"Watchdog benchmark: {m['os']}, kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu']}); systemd "
        + ", ".join(f"{k}: {v}" for k, v in m["systemd"].items()),
        f"tree: {m['git']['head']} + {len(m['git']['dirty'])} uncommitted file(s) in agor_systemd/",
        "load average (1/5/15 min): " + "; ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}/{v[2]:.2f}" for k, v in ld.items()),
        "",
    ]
    lines.append(
        f"1. Hang -> new start (s), restart delay B={doc['base_s']:g} s INCLUDED; {doc['reps']} run(s) each; "
        "detect = hang -> launcher's 'is hung' record; target latency <= W + 0.5 s"
    )
    head = (
        f"{'systemd':<9}{'mode':<10}{'case':<11}{'W':>4}{'latency med':>13}{'max':>7}{'max-B':>7}"
        f"{'detect med':>12}{'max':>7}{'kill':>7}{'restart':>9}  reason"
    )
    lines += [head, "-" * len(head)]
    for r in doc["hang"]["rows"]:
        lines.append(
            f"{r['systemd']:<9}{r['mode']:<10}{r['case']:<11}{r['watchdog_s']:>4g}"
            f"{fmt(r['latency_median_s']):>13}{fmt(r['latency_max_s']):>7}{fmt(r['latency_minus_delay_max_s']):>7}"
            f"{fmt(r['detect_median_s']):>12}{fmt(r['detect_max_s']):>7}{fmt(r['kill_median_s'], '.3f'):>7}"
            f"{fmt(r['restart_median_s']):>9}  {', '.join(r['reasons'])}"
        )
    s = doc["startup"]
    if s:
        lines += [
            "",
            f"2. Start-up, outside systemd, {s['n']} interleaved runs each (ms)",
            f"{'':<44}{'median':>8}{'p90':>8}{'min':>8}",
        ]
        labels = {
            "python": "(a) python3 -I -S -c pass",
            "venv_python": "(a') venv python -I -S -c pass",
            "launcher": "(b) launcher -- /bin/true (no D-Bus)",
            "launcher_dbus": "(b') launcher -- /bin/true (D-Bus tried)",
            "true": "(c) /bin/true",
        }
        for k, label in labels.items():
            x = s["summary"][k]
            lines.append(f"{label:<44}{x['median_ms']:>8.2f}{x['p90_ms']:>8.2f}{x['min_ms']:>8.2f}")
        lines.append(
            f"(b - c) / a = {s['ratio_minus_true']:.2f}x   b / (a + c) = {s['ratio_total']:.2f}x   "
            f"(b' - c) / a = {s['ratio_dbus_minus_true']:.2f}x   b - c - a = {s['launcher_minus_python_ms']:+.2f} ms"
        )
        it = s["importtime"]
        lines.append(
            f"-X importtime of a launcher run: {it['modules']} modules, {it['total_self_us'] / 1000:.1f} ms "
            f"in all; agor_systemd.sidecar.launcher cumulative "
            f"{fmt((it['agor_systemd_launcher_cumulative_us'] or 0) / 1000)} ms; top (self us):"
        )
        lines.append("   " + ", ".join(f"{r['module'].strip()} {r['self_us']:.0f}" for r in it["top"][:10]))
        lines.append(
            f"python -I -S -c pass imports {it['bare_python_modules']} modules "
            f"({it['bare_python_total_self_us'] / 1000:.1f} ms); "
            f"the launcher adds {it['extra_modules']} ({it['extra_self_us'] / 1000:.1f} ms): "
            + ", ".join(it["extra_top"])
        )
    i = doc["idle"]
    rows = []
    if i:
        rows += [
            ("launcher, outside systemd, no D-Bus", i["launcher"]),
            ("launcher, outside systemd, D-Bus tried", i["launcher_dbus"]),
            ("python3 -I -S sleep (reference)", i["python_sleep"]),
        ]
    rows += [(f"launcher in a systemd {k} unit (W=2 s)", v) for k, v in doc["idle_in_unit"].items() if v]
    if rows:
        lines += [
            "",
            f"3. Idle, {IDLE_SAMPLE_S:g} s after {IDLE_SETTLE_S:g} s, WATCHDOG_USEC=2 s (pings every 1 s)",
            f"{'':<44}{'CPU %':>8}{'ms CPU/s':>10}{'wakeups/s':>10}{'RSS MiB':>9}{'HWM MiB':>9}{'pings/s':>9}",
        ]
        for label, r in rows:
            lines.append(
                f"{label:<44}{r['cpu_pct']:>8.3f}{r['cpu_ms_per_s']:>10.3f}{r['wakeups_per_s']:>10.1f}"
                f"{r['rss_mib']:>9.1f}{r['hwm_mib']:>9.1f}{fmt(r.get('pings_per_s')):>9}"
            )
    lines += ["", "Targets:"]
    lines += [f"  [{'ok  ' if t['met'] else 'MISS'}] {t['target']}: {t['detail']}" for t in doc["targets"]]
    lines += [f"  [FAIL] {p}" for p in doc["problems"]]
    if not doc["venv_package_unchanged_during_run"]:
        lines.append("  warning: the venv's agor_systemd changed during the run (a test session synced another tree?)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit and the uncommitted files of agor_systemd/ (the tree other engineers edit too)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=False).stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--short", "--", "agor_systemd").splitlines(),
    }


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="runs per build, case and WatchdogSec (default 3)")
    parser.add_argument("--watchdog-s", type=floats, default=[2.0, 5.0], help="WatchdogSec values (default 2,5)")
    parser.add_argument("--base-s", type=float, default=1.0, help="restart delay (default 1 s)")
    parser.add_argument("--starts", type=int, default=50, help="start-up runs per variant (default 50)")
    parser.add_argument("--skip-systemd", action="store_true", help="parts 2 and 3 only (no managers)")
    parser.add_argument("--json", action="store_true", help="JSON document on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("watchdog: needs root (it starts systemd user managers in a lab namespace)", file=sys.stderr)
        return 2
    if args.reps < 1 or args.starts < 5 or args.base_s <= 0 or not args.watchdog_s:
        parser.error("--reps >= 1, --starts >= 5, --base-s > 0, --watchdog-s not empty")

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()
    managers: list[Manager] = []
    builds: list[SystemdBuild] = []
    ns: LabNamespace | None = None
    tmp: Path | None = None
    loads: dict[str, Any] = {"start": os.getloadavg()}
    startup = idle = None
    venv_ok = False
    outcome: int | None = None
    try:
        site = rs.venv_site()
        rs.sync_package(site)
        time_once(launcher_argv(site, ["/bin/true"], bus=False))  # writes the .pyc files (as root)
        builds = available_builds()
        if not builds and not args.skip_systemd:
            raise LabError("no systemd build found")
        if not args.skip_systemd:
            managers = [Manager(b, args.base_s) for b in builds]
            note("systemd builds: " + ", ".join(f"{b.version} ({b.full_version})" for b in builds))
            ns = LabNamespace().start()
            for m in managers:
                m.start(ns)

            def series(m: Manager) -> None:
                for rep in range(1, args.reps + 1):
                    for w in args.watchdog_s:
                        for case in CASES:
                            m.run_hang(case, w, rep, args.reps, stop)
                m.run_idle(stop)

            note(
                f"part 1: hang detection, {len(CASES) * len(args.watchdog_s) * args.reps} runs per manager, "
                "managers in parallel"
            )
            rs.run_parallel(managers, series, "hang")
            loads["after_hang"] = os.getloadavg()
            for m in managers:
                m.close()
            if ns is not None:
                ns.stop()
                ns = None
        note(f"part 2: start-up, {args.starts} interleaved runs per variant")
        startup = measure_startup(site, args.starts, stop)
        loads["after_startup"] = os.getloadavg()
        note("part 3: idle cost, 12 s")
        tmp = Path(tempfile.mkdtemp(prefix="agor-bench-wd-"))
        idle = measure_idle(site, tmp, stop)
        loads["end"] = os.getloadavg()
        venv_ok = rs.package_in_sync(site)
    except (KeyboardInterrupt, Interrupted):
        note("interrupted: cleaning up")
        outcome = 130
    except LabError as e:
        note(f"error: {e}")
        outcome = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        rs._join_workers(deadline=time.monotonic() + 15)
        for pid in list(STARTED):  # only processes this bench started
            with contextlib.suppress(ProcessLookupError):
                for kid in children(pid):
                    os.kill(kid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
        rs._cleanup(managers, ns)  # type: ignore[arg-type]  (close() on each, then the namespace)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if outcome is not None:
        return outcome
    machine = rs.machine_info(builds)
    machine["git"] = git_state()
    doc = summarize(managers, startup, idle, args, machine, loads, venv_ok)
    table = render(doc)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(doc, indent=2))
    else:
        print(table)
    if doc["problems"]:
        return 2
    return 0 if doc["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
