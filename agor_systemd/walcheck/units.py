"""agor-walcheck.service + agor-walcheck.timer from a Config: pure, like units.py.

The service is a oneshot running ``python -m agor_systemd.walcheck`` on the configured databases;
the timer starts it every ``[walcheck] interval_s`` (default 300 s, agor's own cadence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from agor_systemd.config import Config, telemetry_environment
from agor_systemd.unitfile import HEADER, UnitFile, documentation, environment_assignment, exec_line, seconds_text
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
    service = UnitFile(WALCHECK_SERVICE, header=HEADER)
    service.add(
        "Unit", "Description", "agor: checkpoint and truncate the WAL of agor's SQLite databases (agor-walcheck)"
    )
    pages = documentation(docs, "walcheck.md")
    if pages is not None:
        service.add("Unit", "Documentation", pages)
    # Only the timer starts this unit, at most once per interval (and never while a run is still
    # going), so the default start limit (5 starts per 10 s) could only trip for intervals under
    # 2 s, as in the tests, and then the timer would stop for good.
    service.add("Unit", "StartLimitIntervalSec", "0")
    service.add("Service", "Type", "oneshot")
    argv = [
        *python,
        "-m",
        "agor_systemd.walcheck",
        "--busy-timeout",
        f"{walcheck.busy_timeout_s:g}",
        "--",
        *walcheck.databases,
    ]
    service.add("Service", "ExecStart", exec_line(argv))
    # A oneshot has no start timeout by default. Bound it: the lock waits are bounded (busy timeout
    # per attempt, bounded retries), the rest is copying the WAL; 10 minutes covers a huge WAL on a
    # slow disk. Being killed is safe: SQLite's checkpoint is crash-safe and the next run redoes it.
    service.add("Service", "TimeoutStartSec", f"{math.ceil(worst_case_s(config)) + 600}s")
    service.add("Service", "SyslogIdentifier", "agor-walcheck")
    for name, value in telemetry_environment(config.telemetry).items():
        service.add("Service", "Environment", environment_assignment(name, value))
    # exit 75 (busy) and the error statuses make the unit `failed` on purpose: systemctl --user
    # status agor-walcheck shows it until the next good run.

    timer = UnitFile(WALCHECK_TIMER, header=HEADER)
    timer.add("Unit", "Description", f"agor: WAL checkpoint of agor's SQLite databases every {walcheck.interval_s:g} s")
    if pages is not None:
        timer.add("Unit", "Documentation", pages)
    # Monotonic, counted from the END of the last run (OnUnitInactiveSec=), not OnCalendar= and not
    # OnUnitActiveSec=:
    # * this is agor's own loop (sleep 300 s, checkpoint, repeat);
    # * a run still going when a timer elapses is never doubled (systemd leaves a running unit
    #   alone), but with OnCalendar= or OnUnitActiveSec= (both counted from the last *start*) a run
    #   longer than the interval is followed by an immediate catch-up run, back to back, holding
    #   agor's writers up again at once. Counted from the end of a run, there is always one full
    #   interval without a checkpoint in between, however long a run took (a busy run waits up to
    #   busy timeout + 1.75 s per database);
    # * no wall-clock alignment, so a clock change cannot bunch or skip runs, and Persistent=
    #   (which only applies to OnCalendar=) is not needed: after a suspend or a login the next run
    #   comes within one interval anyway.
    # OnUnitInactiveSec= alone never fires before the service has run once, hence OnStartupSec=
    # (relative to the user manager's start, i.e. the login; if that is already past when the
    # timer starts, as on a first `agor-units install --now`, the first run is immediate).
    timer.add("Timer", "OnStartupSec", seconds_text(min(FIRST_RUN_S, walcheck.interval_s)))
    timer.add("Timer", "OnUnitInactiveSec", seconds_text(walcheck.interval_s))
    # the default AccuracySec= is 1 minute: without this a "5 minute" timer fires after 5-6 minutes
    timer.add("Timer", "AccuracySec", "1s")
    timer.add("Install", "WantedBy", "timers.target")
    return [service, timer]
