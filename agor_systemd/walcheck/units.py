"""agor-walcheck.service + agor-walcheck.timer from a Config: pure, like units.py.

The service is a oneshot running ``python -m agor_systemd.walcheck`` on the configured databases;
the timer starts it every ``[walcheck] interval_s`` (default 300 s, agor's own cadence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from agor_systemd.config import Config, telemetry_environment
from agor_systemd.unitfile import UnitFile, documentation, timer_driven
from agor_systemd.walcheck import RETRY_DELAYS_S

WALCHECK_SERVICE = "agor-walcheck.service"
WALCHECK_TIMER = "agor-walcheck.timer"

# the first run after the user manager starts (login): soon, but not in the middle of the login
FIRST_RUN_S = 60.0


def worst_case_s(config: Config) -> float:
    """Longest a run can wait: the attempts on a database share its busy timeout, plus the backoff."""
    walcheck = config.walcheck
    per_db = walcheck.busy_timeout_s + sum(RETRY_DELAYS_S)
    return per_db * len(walcheck.databases)


def walcheck_units(config: Config, python: Sequence[str], docs: str | None = None) -> list[UnitFile]:
    """[service, timer]; `python` is the interpreter argv (e.g. ["/usr/bin/python3", "-I"]), `docs`
    the directory of the installed docs (None: no Documentation=)."""
    walcheck = config.walcheck
    argv = [
        *python,
        "-m",
        "agor_systemd.walcheck",
        "--busy-timeout",
        f"{walcheck.busy_timeout_s:g}",
        "--",
        *walcheck.databases,
    ]
    # Counted from the end of a run, as agor's own loop (sleep 300 s, checkpoint, repeat): a busy run
    # (up to busy timeout + 1.75 s per database) is never followed at once by another that would hold
    # agor's writers up again. Exit 75 (busy) and the error statuses make the unit `failed` on
    # purpose: systemctl --user status agor-walcheck shows it until the next good run.
    return timer_driven(
        WALCHECK_SERVICE,
        WALCHECK_TIMER,
        (
            "agor: checkpoint and truncate the WAL of agor's SQLite databases (agor-walcheck)",
            f"agor: WAL checkpoint of agor's SQLite databases every {walcheck.interval_s:g} s",
        ),
        documentation(docs, "walcheck.md"),
        argv,
        # Bounded: the lock waits are (busy timeout per attempt, bounded retries), the rest is copying
        # the WAL; 10 minutes covers a huge WAL on a slow disk. Being killed is safe: SQLite's
        # checkpoint is crash-safe and the next run redoes it.
        timeout_start=f"{math.ceil(worst_case_s(config)) + 600}s",
        identifier="agor-walcheck",
        environment=telemetry_environment(config.telemetry),
        first_run_s=min(FIRST_RUN_S, walcheck.interval_s),
        interval_s=walcheck.interval_s,
        accuracy="1s",
    )
