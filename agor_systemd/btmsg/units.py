"""agor-btmsg-sweep.service + agor-btmsg-sweep.timer from a Config: pure, like units.py.

The service is a oneshot running ``python -m agor_systemd.btmsg sweep`` with the [btmsg]
thresholds (which the sweep stores in btmsg.db for every sender); the timer starts it every
``[btmsg] interval_s`` (default 30 s), counted from the end of the previous run.
"""

from __future__ import annotations

from collections.abc import Sequence

from agor_systemd.config import Config, telemetry_environment
from agor_systemd.unitfile import UnitFile, documentation, seconds_text, timer_driven

SWEEP_SERVICE = "agor-btmsg-sweep.service"
SWEEP_TIMER = "agor-btmsg-sweep.timer"


def sweep_units(config: Config, python: Sequence[str], docs: str | None = None) -> list[UnitFile]:
    """[service, timer], or none with [btmsg] enabled = false; `python` is the interpreter argv."""
    btmsg = config.btmsg
    if not btmsg.enabled:
        return []
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
    # exit 4 (btmsg.cli.EXIT_ATTENTION) makes the unit `failed` on purpose: `systemctl --user status
    # agor-btmsg-sweep` shows it until a sweep finds nothing stalled or parked
    return timer_driven(
        SWEEP_SERVICE,
        SWEEP_TIMER,
        (
            "agor: agent health in btmsg.db — stale and stalled agents, dead-letter redelivery",
            f"agor: agent health sweep of btmsg.db every {btmsg.interval_s:g} s",
        ),
        documentation(docs, "btmsg.md"),
        argv,
        timeout_start="120s",  # a sweep is one transaction: at most the 5 s busy timeout plus milliseconds
        identifier="agor-btmsg-sweep",
        environment=telemetry_environment(config.telemetry),
        first_run_s=btmsg.interval_s,
        interval_s=btmsg.interval_s,
        # a state must flip within about one interval of its threshold
        accuracy=seconds_text(min(1.0, btmsg.interval_s / 10)),
    )
