"""The sidecar's health, computed from systemd's own unit properties.

    {"status": "healthy", "sandbox": "full"}       sandbox: full | partial | none | off
    {"status": "healthy", ..., "clients": 0, "buffering_lines": 12}   with agor-sidecar.socket
    {"status": "starting"}                       first start, not READY yet
    {"status": "restarting", "attempt": k, "next_retry_s": x}
    {"status": "failed", "attempts": 5, "last_error": "exited with status 3"}
    {"status": "stopped"}

Everything comes from one GetAll of the unit: ActiveState/SubState, NRestarts, the restart
timing (RestartUSecNext on systemd ≥ 254 in native mode; InactiveEnterTimestampMonotonic
plus the launcher's --wait-schedule from ExecStart in fallback mode), Result,
ExecMainCode/Status and the launcher's StatusText. Nothing is kept on the side.
"""

from __future__ import annotations

import re
from typing import Any

from agor_systemd.errors import AgorError
from agor_systemd.giveup import GAVE_UP_STATUS
from agor_systemd.manager import Systemd
from agor_systemd.sidecar.protocol import (
    CLD_DUMPED,
    CLD_EXITED,
    CLD_KILLED,
    CRASH_MARK,
    SIDECAR_UNIT,
    LauncherOptions,
    describe_exit,
    find_launcher_arguments,
    monotonic_usec,
    parse_launcher_arguments,
)

Health = dict[str, Any]

RESULT_TEXT = {
    "timeout": "did not start or stop within its timeout",
    "watchdog": "watchdog timeout",
    "start-limit-hit": "start request repeated too quickly",
    "resources": "systemd could not start it (missing working directory or environment file?)",
    "oom-kill": "killed by the OOM killer",
    "protocol": "violated the service protocol",
    "exec-condition": "skipped by ExecCondition=",
}


class NotInstalled(AgorError, LookupError):
    """The unit is not known to the manager."""


def launcher_options(props: dict[str, Any]) -> LauncherOptions | None:
    """The launcher's settings, read back from the ExecStart= argv systemd reports."""
    for entry in props.get("ExecStart") or []:
        args = find_launcher_arguments(list(entry[1]))
        if args is not None:
            try:
                return parse_launcher_arguments(args)
            except ValueError:
                return None
    return None


def last_error(props: dict[str, Any]) -> str:
    """systemd's own verdict first (watchdog, timeout, ...), then the launcher's account of the
    sidecar's death (it knows about core dumps and readiness), then the main process's exit."""
    result = props.get("Result", "")
    if result in RESULT_TEXT and result not in ("start-limit-hit", "exec-condition"):
        return RESULT_TEXT[result]  # what systemd itself did to this run
    status_text = props.get("StatusText") or ""
    if CRASH_MARK in status_text:
        return status_text.split(CRASH_MARK, 1)[1]
    if result in RESULT_TEXT:
        return RESULT_TEXT[result]
    code, status = props.get("ExecMainCode", 0), props.get("ExecMainStatus", 0)
    if code in (CLD_EXITED, CLD_KILLED, CLD_DUMPED):
        return describe_exit(code, status)
    return result or "unknown"


def usec_to_s(usec: int) -> float:
    return round(max(usec, 0) / 1e6, 3)


def has_job(props: dict[str, Any]) -> bool:
    """Whether a job (a stop, restart or start someone asked for) is running on the unit."""
    job = props.get("Job") or (0, "/")
    return int(job[0]) != 0


def unrequested_stop(props: dict[str, Any], restarts: int, options: LauncherOptions | None) -> Health:
    """`deactivating` with no job: the main process ended by itself (a crash, a watchdog kill) and
    systemd is ending the rest of the unit (ExecStopPost=, leftover processes) before it restarts
    it, or before it stays `failed` when the launcher gave up."""
    if props.get("ExecMainCode") == CLD_EXITED and props.get("ExecMainStatus") == GAVE_UP_STATUS:
        return {"status": "failed", "attempts": restarts, "last_error": last_error(props)}
    attempt = restarts + 1
    if options is not None and options.wait_schedule:
        delay_usec = round(options.wait_schedule[min(attempt, len(options.wait_schedule)) - 1] * 1e6)
    else:  # systemd ≥ 254 computes RestartUSecNext for the coming restart already
        delay_usec = props.get("RestartUSecNext", props.get("RestartUSec", 0))
    # the wait starts only when the unit is inactive: this is the whole delay, still ahead
    return {"status": "restarting", "attempt": attempt, "next_retry_s": usec_to_s(delay_usec)}


def socket_clients(status_text: str) -> Health:
    """The bridge's part of STATUS= (bridge.Bridge.summary): clients connected, or the lines kept
    for the next one; nothing without agor-sidecar.socket."""
    if connected := re.search(r"\bclients (\d+)\b", status_text):
        return {"clients": int(connected.group(1))}
    if buffering := re.search(r"\bno client, buffering (\d+) lines\b", status_text):
        return {"clients": 0, "buffering_lines": int(buffering.group(1))}
    return {}


def health_from_properties(props: dict[str, Any], now_usec: int) -> Health:
    """Pure mapping from unit properties (str keys) to a health dict; now_usec is CLOCK_MONOTONIC."""
    if props.get("LoadState") in ("not-found", "masked") and props.get("ActiveState") == "inactive":
        raise NotInstalled(f"{props.get('Id', SIDECAR_UNIT)} is {props['LoadState']}; run `agor-units install`")
    active, sub = props.get("ActiveState", ""), props.get("SubState", "")
    restarts = int(props.get("NRestarts", 0))
    options = launcher_options(props)

    if active == "failed" and sub == "failed":
        attempts = restarts - 1 if props.get("Result") == "start-limit-hit" else restarts
        # a client's connection after the give-up started the launcher once more, afresh (NRestarts
        # 0): it told the client and kept the count in STATUS= (docs/socket.md)
        if told := re.match(r"gave up after (\d+) restarts", props.get("StatusText") or ""):
            attempts = max(attempts, int(told.group(1)))
        return {"status": "failed", "attempts": max(attempts, 0), "last_error": last_error(props)}
    if active in ("active", "reloading"):
        status_text = props.get("StatusText") or ""
        sandbox = re.search(r"\bsandbox (full|partial|none|off)\b", status_text)
        return {
            "status": "healthy",
            **({"sandbox": sandbox.group(1)} if sandbox else {}),
            **socket_clients(status_text),
        }
    waiting = sub in ("auto-restart", "failed-before-auto-restart", "dead-before-auto-restart")
    if options is not None and options.wait_schedule and (waiting or (active == "activating" and restarts)):
        # fallback: the launcher sleeps until the crash time plus delay(k)
        attempt = restarts + 1 if waiting else restarts
        delay = options.wait_schedule[min(attempt, len(options.wait_schedule)) - 1]
        crashed = props.get("InactiveEnterTimestampMonotonic", now_usec)
        return {
            "status": "restarting",
            "attempt": attempt,
            "next_retry_s": usec_to_s(crashed + round(delay * 1e6) - now_usec),
        }
    if waiting:
        # native holdoff: systemd's timer fires RestartUSecNext after entering auto-restart
        delay = props.get("RestartUSecNext", props.get("RestartUSec", 0))
        since = props.get("StateChangeTimestampMonotonic", now_usec) if sub == "auto-restart" else now_usec
        return {"status": "restarting", "attempt": restarts + 1, "next_retry_s": usec_to_s(since + delay - now_usec)}
    if sub == "auto-restart-queued" or (active == "activating" and restarts):
        return {"status": "restarting", "attempt": restarts, "next_retry_s": 0.0}
    if active == "activating":
        return {"status": "starting"}
    if active == "deactivating" and not has_job(props):
        return unrequested_stop(props, restarts, options)
    return {"status": "stopped"}


def read_health(unit: str = SIDECAR_UNIT, system: bool = False) -> Health:
    """Health of `unit` from the running manager (raises BusError, NotInstalled)."""
    with Systemd(system) as manager:
        props = manager.unit_properties(unit)
    return health_from_properties(props, monotonic_usec())
