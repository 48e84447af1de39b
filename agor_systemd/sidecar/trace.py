"""The sidecar's life as one trace across launcher processes (tracing on only; docs/telemetry.md).

Each restart is a new launcher process, so the run's trace context lives in a small file in the
runtime directory, `$XDG_RUNTIME_DIR/agor/sidecar.trace` (`/run/agor/` for the system manager),
of KEY=value lines:

    parent=<traceparent>    the span every attempt of this run is a child of
    cause=<traceparent>     an `agor-units restart` waiting to be linked by the next attempt
    ended_at=<ns>           when the last attempt ended: the next one records the restart wait

`agor-units install --now` begins a run (its own span is the parent, so the run is in the
install's trace); `agor-units restart` keeps the run and leaves its span as the cause, so a crash
loop, the give-up and the manual restart that follows are one trace. A stop ends the run: the next
start without a new install begins a new trace. Only the launcher imports this module, and only
with tracing on.
"""

from __future__ import annotations

import os
import time

from agor_systemd import console, tracing

TYPE_CHECKING = False  # import cost: `typing` is ~6 ms
if TYPE_CHECKING:
    from typing import Any

    from agor_systemd.tracing import NoSpan, Span

RUN_FILE = "sidecar.trace"
JOURNAL_IDENTIFIER = "agor-sidecar"  # the unit's SyslogIdentifier=: the launcher's native lines keep it


def run_file(system: bool = False) -> str:
    """Where a run's trace context is kept between launcher processes."""
    if system:
        return f"/run/agor/{RUN_FILE}"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"{runtime}/agor/{RUN_FILE}"


def parse_run(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("parent", "cause", "ended_at"):
            fields[key] = value.strip()
    if tracing.parse_traceparent(fields.get("parent")) is None:
        return {}  # no run (or a damaged file): the next attempt begins a new one
    if "cause" in fields and tracing.parse_traceparent(fields["cause"]) is None:
        del fields["cause"]
    if not fields.get("ended_at", "").isdigit():
        fields.pop("ended_at", None)
    return fields


def read_run(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_run(f.read(4096))
    except (OSError, UnicodeDecodeError):
        return {}


def write_run(path: str, fields: dict[str, str]) -> None:
    """Replace the file whole (a temp file and a rename); a failure only loses the linking."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{key}={value}\n" for key, value in fields.items()))
        os.replace(tmp, path)
    except OSError:
        pass


def remove_run(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- what agor-units does before it starts the unit -----------------------------------------------


def begin_run(system: bool) -> None:
    """`install --now`: a new run, in the trace of the running command (or a new one)."""
    path = run_file(system)
    try:  # the unit makes it writable for the launcher only if it exists (ReadWritePaths=-%t/agor)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    except OSError:
        pass
    parent = tracing.traceparent()
    if parent is None:
        remove_run(path)  # the launcher begins a trace of its own
    else:
        write_run(path, {"parent": parent})


def mark_manual_restart(system: bool) -> None:
    """`agor-units restart`: the run goes on; the next attempt links to this command's span."""
    cause = tracing.traceparent()
    if cause is None:
        return
    path = run_file(system)
    run = read_run(path)
    write_run(path, {**run, "cause": cause} if run else {"parent": cause})


# -- the launcher's side ----------------------------------------------------------------------------


class AttemptTrace:
    """One launcher process: the span `sidecar.attempt` (current for its whole life, so its
    journal lines carry its ids), the restart wait before it, the events of its sidecar."""

    def __init__(self, unit: str, system: bool) -> None:
        self.done = False
        console.at_exit(self.end_unfinished)  # before tracing's own hook, which sends the spans
        # no export thread before the spawn (the sandboxed spawn forks): running() starts it
        resource: dict[str, Any] = {"systemd.unit": unit}
        tracing.start("agor-launch", journal_identifier=JOURNAL_IDENTIFIER, **resource)
        self.path = run_file(system)
        run = read_run(self.path)
        cause = run.pop("cause", None)
        ended_at = run.pop("ended_at", None)
        self.started_ns = time.time_ns()
        start = "manual restart" if cause else ("restart" if ended_at else "start")
        self.span: Span | NoSpan = tracing.span(
            "sidecar.attempt", parent=run.get("parent"), links=[cause] if cause else (), start=start
        )
        self.span.__enter__()  # current until the process ends
        self.parent = run.get("parent") or self.span.traceparent
        self.wait: Span | NoSpan | None = None
        if ended_at:  # the wait between the last attempt's end and this one's sidecar start
            self.wait = tracing.span("sidecar.restart_wait", parent=self.parent, start_ns=int(ended_at))
        if self.parent is not None:
            write_run(self.path, {"parent": self.parent})  # the cause is linked now; forget it

    @property
    def traceparent(self) -> str | None:
        return self.span.traceparent

    def running(self, pid: int, attempt: int, attempts: int, spawned_ns: int) -> None:
        """The sidecar runs; which restart this is is known now (native mode asks systemd)."""
        tracing.prefetch()  # the spawn (a fork, with the sandbox) is done: the SDK may load now
        self.span.set(**{"sidecar.pid": pid, "attempt": attempt, "attempts": attempts})
        if self.wait is not None:
            self.wait.set(attempt=attempt)
            self.wait.end(spawned_ns)
            self.wait = None

    def ready(self, spawned_ns: int, sandbox: str) -> None:
        self.span.event("ready", sandbox=sandbox)
        # sent at once: a long run is visible before its attempt span ends
        tracing.span("sidecar.start", start_ns=spawned_ns, sandbox=sandbox).end()

    def event(self, name: str, **attributes: object) -> None:
        self.span.event(name, **attributes)

    def end_unfinished(self) -> None:
        """The launcher ended some other way (an error it reported): end the span with it."""
        if not self.done:
            self.span.fail(console.failure or "the launcher ended early")
            self.done = True
            self.span.end()

    def ended(self, cause: str, *, stopped: bool, gave_up: bool) -> None:
        """The attempt is over: its outcome, the run file for the next one, the span sent."""
        if self.done:
            return
        self.done = True
        if stopped:
            self.span.event("stop", cause=cause)
            run = read_run(self.path)
            if run.get("parent") == self.parent and "cause" not in run:
                remove_run(self.path)  # the run is over (unless a new install or restart took it)
        else:
            self.span.event("crash", cause=cause)
            self.span.fail(cause)
            if gave_up:  # what comes next is a manual restart, not a restart wait
                self.span.event("give_up", cause=cause)
                self.span.set(gave_up=True)
                write_run(self.path, {"parent": self.parent or ""})
            else:
                write_run(self.path, {"parent": self.parent or "", "ended_at": str(time.time_ns())})
        self.span.set(cause=cause)
        self.span.end()
        tracing.flush()
