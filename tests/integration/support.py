"""Helpers for the supervision tests: run agor-units as the test user, read the fake sidecar's log."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agor_systemd.lab.testbed import OPT_ROOT, UserManager

UNIT = "agor-sidecar.service"
# every unit `agor-units install` writes with the default settings, in its order
ALL_UNITS = [
    UNIT,
    "agor-sidecar.socket",
    "agor-walcheck.service",
    "agor-walcheck.timer",
    "agor-btmsg-sweep.service",
    "agor-btmsg-sweep.timer",
]
LOG_ID = "agor-sidecar"  # its SyslogIdentifier=: selects the launcher's lines even when it exited right after


def agor_units(
    mgr: UserManager, *args: str | bytes, check: bool = False, timeout: float = 60, env: dict[str, str] | None = None
):
    """`agor-units ARGS` as the test user (the venv's console script), `env` added to its environment."""
    cp = mgr.run([str(OPT_ROOT / "venv" / "bin" / "agor-units"), *args], timeout=timeout, env=env)
    if check and cp.returncode != 0:
        raise AssertionError(f"agor-units {' '.join(map(str, args))} exited {cp.returncode}: {cp.stderr.strip()}")
    return cp


@dataclass
class Sample:
    before: float  # CLOCK_MONOTONIC around the health query
    after: float
    health: dict[str, Any]  # the sidecar's part
    agents: dict[str, Any] | None = None  # btmsg.db's summary (test_btmsg.py checks it)


def health(mgr: UserManager) -> Sample:
    before = time.clock_gettime(time.CLOCK_MONOTONIC)
    cp = agor_units(mgr, "health", "--json")
    after = time.clock_gettime(time.CLOCK_MONOTONIC)
    if cp.returncode not in (0, 3, 4, 5):
        raise AssertionError(f"agor-units health exited {cp.returncode}: {cp.stderr.strip()}")
    state = json.loads(cp.stdout)
    return Sample(before, after, state, state.pop("agents", None))


def supervision_health(mgr: UserManager) -> dict[str, Any]:
    """Health without the socket's part (clients, buffering_lines), which test_socket.py checks."""
    return {k: v for k, v in health(mgr).health.items() if k not in ("clients", "buffering_lines")}


@dataclass
class Sidecar:
    """One installed fake sidecar: where it logs its starts and reads its plan."""

    mgr: UserManager
    fake: Path
    log: Path
    plan: Path

    def command(self, extra_words: Sequence[str] = ()) -> list[str]:
        """The sidecar's argv as install gives it: the fake sidecar with its log and plan."""
        return [
            "/usr/bin/python3",
            "-I",
            "-S",
            str(self.fake),
            "--log",
            str(self.log),
            "--plan",
            str(self.plan),
            *extra_words,
        ]

    def starts(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def start_times(self) -> list[float]:
        return [s["mono"] for s in self.starts()]

    def argv(self, start: int = -1) -> list[bytes]:
        return [bytes.fromhex(h) for h in self.starts()[start]["argv"]]


def install_sidecar(
    mgr: UserManager,
    fake: Path,
    plan: Sequence[str],
    *,
    base_s: float = 0.2,
    cap_s: float = 30,
    attempts: int = 5,
    window_s: float = 300,
    extra_words: Sequence[str] = (),
    install_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Sidecar:
    """Install agor-sidecar.service running the fake sidecar with `plan` (one behaviour per start)."""
    token = uuid.uuid4().hex[:8]
    plan_file = mgr.write_file(f"sidecar-data/plan-{token}.txt", "\n".join(plan) + "\n")
    log = plan_file.parent / f"sidecar-{token}.jsonl"  # the sandbox lets the sidecar write only here
    sidecar = Sidecar(mgr, fake, log, plan_file)
    agor_units(
        mgr,
        "install",
        "--now",
        f"--base-s={base_s}",
        f"--cap-s={cap_s}",
        f"--attempts={attempts}",
        f"--stability-window-s={window_s}",
        f"--read-write-path={plan_file.parent}",
        *install_args,
        "--",
        *sidecar.command(extra_words),
        check=True,
        env=env,
    )
    return sidecar


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_health(mgr: UserManager, status: str, timeout: float) -> Sample:
    last: list[Sample] = []

    def check() -> Sample | None:
        sample = health(mgr)
        last[:] = [sample]
        return sample if sample.health["status"] == status else None

    try:
        return wait_for(f"health {status}", check, timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"health never became {status!r} in {timeout}s; last: {last[0].health}") from None


def gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]
