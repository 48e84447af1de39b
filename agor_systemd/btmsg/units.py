"""agor-btmsg-sweep.service + agor-btmsg-sweep.timer from a Config: pure, like units.py.

The service is a oneshot running ``python -m agor_systemd.btmsg sweep`` with the [btmsg]
thresholds (which the sweep stores in btmsg.db for every sender); the timer starts it every
``[btmsg] interval_s`` (default 30 s), counted from the end of the previous run.
"""

from __future__ import annotations

from collections.abc import Sequence

from agor_systemd.config import Config, telemetry_environment
from agor_systemd.unitfile import HEADER, UnitFile, documentation, environment_assignment, exec_line, seconds_text

SWEEP_SERVICE = "agor-btmsg-sweep.service"
SWEEP_TIMER = "agor-btmsg-sweep.timer"


def sweep_units(config: Config, python: Sequence[str], docs: str | None = None) -> list[UnitFile]:
    """[service, timer], or none with [btmsg] enabled = false; `python` is the interpreter argv."""
    btmsg = config.btmsg
    if not btmsg.enabled:
        return []
    service = UnitFile(SWEEP_SERVICE, header=HEADER)
    service.add(
        "Unit", "Description", "agor: agent health in btmsg.db — stale and stalled agents, dead-letter redelivery"
    )
    pages = documentation(docs, "btmsg.md")
    if pages is not None:
        service.add("Unit", "Documentation", pages)
    # only the timer starts it, never twice at once; short test intervals must not trip the start limit
    service.add("Unit", "StartLimitIntervalSec", "0")
    service.add("Service", "Type", "oneshot")
    argv = [
        *python,
        "-m",
        "agor_systemd.btmsg",
        "sweep",
        "--db",
        btmsg.database,
        "--stale-after-s",
        f"{btmsg.stale_after_s:g}",
        "--stall-threshold-min",
        f"{btmsg.stall_threshold_min:g}",
        "--max-deliver",
        str(btmsg.max_deliver),
        "--max-message-kib",
        f"{btmsg.max_message_kib:g}",
    ]
    service.add("Service", "ExecStart", exec_line(argv))
    # a sweep is one transaction: at most the 5 s busy timeout plus milliseconds of work
    service.add("Service", "TimeoutStartSec", "120s")
    service.add("Service", "SyslogIdentifier", "agor-btmsg-sweep")
    for name, value in telemetry_environment(config.telemetry).items():
        service.add("Service", "Environment", environment_assignment(name, value))
    # exit 4 (btmsg.cli.EXIT_ATTENTION) makes the unit `failed` on purpose: `systemctl --user status
    # agor-btmsg-sweep` shows it until a sweep finds nothing stalled or parked

    timer = UnitFile(SWEEP_TIMER, header=HEADER)
    timer.add("Unit", "Description", f"agor: agent health sweep of btmsg.db every {btmsg.interval_s:g} s")
    if pages is not None:
        timer.add("Unit", "Documentation", pages)
    # as agor-walcheck.timer: monotonic, from the end of the last run, first run at start-up
    timer.add("Timer", "OnStartupSec", seconds_text(btmsg.interval_s))
    timer.add("Timer", "OnUnitInactiveSec", seconds_text(btmsg.interval_s))
    # a state must flip within about one interval of its threshold: the default accuracy is 1 minute
    timer.add("Timer", "AccuracySec", seconds_text(min(1.0, btmsg.interval_s / 10)))
    timer.add("Install", "WantedBy", "timers.target")
    return [service, timer]
