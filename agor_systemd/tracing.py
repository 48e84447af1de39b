"""Traces of the toolkit's programs, sent over OTLP/HTTP when $AGOR_OTLP_ENDPOINT is set.

The API every program and capability calls (docs/telemetry.md):

    from agor_systemd import tracing

    with tracing.span("btmsg.send", recipient=agent) as s:   # a child of the current span
        ...
        s.set(message_id=mid)                                # attributes: str, bool, int, float
        s.event("dead_letter", reason="stale")               # a timestamped event in the span
    tracing.event("sweep.result", stale=3)                   # an event in the current span
    tracing.traceparent()                                    # "00-<trace>-<span>-01", or None
    env = tracing.child_environment(os.environ)              # + TRACEPARENT for a child process

Off (the endpoint unset or empty), `span()` returns one shared do-nothing object, and no
`opentelemetry` module is ever imported: a program pays one dictionary lookup per call. On, spans
are recorded here as plain objects (ids from os.urandom, so journal fields and TRACEPARENT are
known at once) and handed to a background thread, which loads the SDK (agor_systemd.otlp) and
exports them. The program never waits for the SDK or the collector except at its end, and then
at most AGOR_OTLP_FLUSH_TIMEOUT_S (default 0.25 s): spans not sent by then are counted and
reported in one line. A program's first span with TRACEPARENT in its environment joins that
trace (the OpenTelemetry environment carrier).

Import-light (os, sys, time; threading only when on): programs systemd starts call it.
"""

from __future__ import annotations

import os
import sys
import time

from agor_systemd import console, journal

TYPE_CHECKING = False  # import cost: `typing` is ~6 ms, more than the launcher's whole start
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

    from agor_systemd.otlp import Exporter

ENDPOINT_ENV = "AGOR_OTLP_ENDPOINT"
FLUSH_TIMEOUT_ENV = "AGOR_OTLP_FLUSH_TIMEOUT_S"
TRACEPARENT_ENV = "TRACEPARENT"
DEFAULT_FLUSH_TIMEOUT_S = 0.25
QUEUE_MAX = 2048  # spans waiting for export; more are dropped (and counted)
EXPORT_DELAY_S = 1.0  # a long-running program sends what it has at least this often
TRACES_PATH = "/v1/traces"
SDK_MISSING = "opentelemetry-sdk is not installed (pip install 'agor-systemd[otel]')"


def endpoint() -> str | None:
    """$AGOR_OTLP_ENDPOINT, or None when tracing is off (unset or empty)."""
    return os.environ.get(ENDPOINT_ENV, "").strip() or None


def traces_url(base: str) -> str:
    """Where spans are posted: the endpoint as a user writes it (http://host:4318) plus /v1/traces.
    The SDK uses an endpoint passed to it verbatim, so the path is added here, once."""
    base = base.strip()
    return base if base.rstrip("/").endswith(TRACES_PATH) else base.rstrip("/") + TRACES_PATH


def flush_timeout_s() -> float:
    try:
        value = float(os.environ.get(FLUSH_TIMEOUT_ENV, ""))
    except ValueError:
        return DEFAULT_FLUSH_TIMEOUT_S
    return value if 0 < value <= 60 else DEFAULT_FLUSH_TIMEOUT_S


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace id, span id) of a W3C traceparent `00-<32 hex>-<16 hex>-<2 hex>`, None if invalid."""
    parts = (value or "").strip().lower().split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[3]) != 2:
        return None
    trace_id, span_id = parts[1], parts[2]
    if len(trace_id) != 32 or len(span_id) != 16 or not all(c in "0123456789abcdef" for c in trace_id + span_id):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id


def format_traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def new_id(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


class Span:
    """One recorded span; use it as a context manager (ends it, makes it current meanwhile)."""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "events",
        "links",
        "name",
        "parent_id",
        "span_id",
        "start_ns",
        "trace_id",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        trace_id: str,
        parent_id: str | None,
        attributes: dict[str, Any],
        links: tuple[str, ...] = (),
        start_ns: int | None = None,
    ) -> None:
        self.tracer = tracer
        self.name = name
        self.trace_id = trace_id
        self.span_id = new_id(8)
        self.parent_id = parent_id
        self.attributes = attributes
        self.links = links  # valid traceparents of spans this one follows from (the command that caused it)
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        self.error: str | None = None
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.end_ns: int | None = None

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.trace_id, self.span_id)

    def set(self, **attributes: Any) -> None:
        self.attributes.update(attributes)

    def rename(self, name: str) -> None:
        self.name = name

    def event(self, name: str, **attributes: Any) -> None:
        self.events.append((name, time.time_ns(), attributes))

    def fail(self, message: str) -> None:
        """Mark the span's outcome as an error (status ERROR with this description)."""
        self.error = message

    def end(self, end_ns: int | None = None) -> None:
        if self.end_ns is None:
            self.end_ns = time.time_ns() if end_ns is None else end_ns
            self.tracer.finished(self)

    def __enter__(self) -> Span:
        self.tracer.stack.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        if self.tracer.stack and self.tracer.stack[-1] is self:
            self.tracer.stack.pop()
        if isinstance(error, SystemExit):
            status = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
            self.attributes["exit.status"] = status
            if status and self.error is None:
                self.error = console.failure or f"exit status {status}"
        elif isinstance(error, KeyboardInterrupt):
            self.error = "interrupted"
        elif error is not None:
            self.error = f"{type(error).__name__}: {error}"
        self.end()


class NoSpan:
    """What `span()` returns with tracing off: every method does nothing."""

    __slots__ = ()
    traceparent = None

    def set(self, **attributes: Any) -> None:
        pass

    def rename(self, name: str) -> None:
        pass

    def event(self, name: str, **attributes: Any) -> None:
        pass

    def fail(self, message: str) -> None:
        pass

    def end(self, end_ns: int | None = None) -> None:
        pass

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass


NO_SPAN = NoSpan()


class Tracer:
    """Tracing switched on: the spans of this process, their export thread, what was lost."""

    def __init__(
        self, url: str, service: str, resource: dict[str, Any], parent: tuple[str, str] | None, prefetch_sdk: bool
    ) -> None:
        import threading  # import cost: ~3 ms, only with tracing on

        self.url = url
        self.service = service
        self.resource = resource
        self.parent = parent  # TRACEPARENT this process started with: its root spans' parent
        self.stack: list[Span] = []
        self.queue: list[Span] = []
        self.lock = threading.Condition()
        self.closing = False
        self.in_flight = 0  # taken from the queue, not yet sent or failed
        self.sent = 0
        self.dropped = 0
        self.problem: str | None = None
        self.reported = False
        self.worker = threading.Thread(target=self.export_loop, name="otlp-export", daemon=True)
        if prefetch_sdk:
            self.start_export()

    def new_span(
        self, name: str, parent: str | None, links: Iterable[str], start_ns: int | None, attributes: dict[str, Any]
    ) -> Span:
        remote = parse_traceparent(parent) if parent is not None else None
        if remote is None and self.stack:
            remote = (self.stack[-1].trace_id, self.stack[-1].span_id)
        if remote is None:
            remote = self.parent
        trace_id, parent_id = remote if remote is not None else (new_id(16), None)
        valid = tuple(link for link in links if parse_traceparent(link) is not None)
        return Span(self, name, trace_id, parent_id, attributes, valid, start_ns)

    def finished(self, span: Span) -> None:
        with self.lock:
            if len(self.queue) >= QUEUE_MAX or (self.closing and not self.worker.is_alive()):
                self.dropped += 1
                self.problem = self.problem or f"more than {QUEUE_MAX} spans waiting: the export could not keep up"
                return
            self.queue.append(span)
            if self.worker.ident is None:
                self.start_export()  # the first span ended: from now on spans are sent
            elif len(self.queue) >= QUEUE_MAX // 4:
                self.lock.notify()

    def start_export(self) -> None:
        if self.worker.ident is None and not self.closing:
            self.worker.start()

    def export_loop(self) -> None:
        exporter = self.load_exporter()
        while True:
            with self.lock:
                if not self.queue and not self.closing:
                    self.lock.wait(EXPORT_DELAY_S)
                batch, self.queue = self.queue, []
                self.in_flight = len(batch)
                closing = self.closing
            if batch:
                problem = "the export failed" if exporter is None else exporter.export(batch)
                with self.lock:
                    self.in_flight = 0
                    if problem is None:
                        self.sent += len(batch)
                    else:
                        self.dropped += len(batch)
                        self.problem = self.problem or problem
            if closing and not self.queue:
                return

    def load_exporter(self) -> Exporter | None:
        try:
            # the OpenTelemetry SDK and its OTLP/HTTP exporter load here, in this thread alone
            from agor_systemd.otlp import Exporter  # import cost: ~100-200 ms
        except ImportError:
            self.problem = SDK_MISSING
            return None
        try:
            return Exporter(self.url, self.service, self.resource, flush_timeout_s())
        except Exception as e:  # a bad URL, an SDK that changed: never the program's problem
            self.problem = f"cannot set up the exporter: {e}"
            return None

    def flush(self) -> None:
        """Send what is left, waiting at most the flush timeout; report losses in one line."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        if self.worker.ident is not None:
            self.worker.join(flush_timeout_s())
        with self.lock:
            if self.worker.is_alive():  # the collector is slow or black-holing: leave it
                self.dropped += len(self.queue) + self.in_flight
                self.queue, self.in_flight = [], 0
                self.problem = self.problem or f"no answer within {flush_timeout_s():g} s"
            self.report()

    def report(self) -> None:
        if self.reported or not self.dropped:
            return
        self.reported = True
        total = self.sent + self.dropped
        journal.log(
            self.service,
            f"telemetry: {self.dropped} of {total} span(s) not sent to {self.url}: {self.problem}",
            journal.WARNING,
        )


_tracer: Tracer | None = None
_configured = False


def start(
    service: str | None = None, *, journal_identifier: str | None = None, prefetch_sdk: bool = False, **resource: Any
) -> bool:
    """Switch tracing on for this process if $AGOR_OTLP_ENDPOINT is set: `service` is its
    service.name (default: the program's name), `resource` more resource attributes. With
    `journal_identifier` (the unit's SyslogIdentifier=), the program's journal lines carry
    TRACE_ID= and SPAN_ID= of the current span. The SDK loads in the background at the first
    ended span (or at `prefetch()`), not while the program starts: under the GIL it would only
    slow the program down. `prefetch_sdk`: load it now. Idempotent; True when tracing is on."""
    global _tracer, _configured
    if _configured:
        return _tracer is not None
    _configured = True
    url = endpoint()
    if url is None:
        return False
    service = service or os.path.basename(sys.argv[0]) or "agor-systemd"
    attributes = {"host.name": os.uname().nodename, "process.pid": os.getpid(), **resource}
    if os.environ.get("INVOCATION_ID"):  # run by systemd: ties the trace to journalctl _SYSTEMD_INVOCATION_ID=
        attributes["systemd.invocation_id"] = os.environ["INVOCATION_ID"]
    parent = parse_traceparent(os.environ.get(TRACEPARENT_ENV))
    _tracer = Tracer(traces_url(url), service, attributes, parent, prefetch_sdk)
    console.at_exit(flush)
    if journal_identifier is not None:
        journal.send_natively(journal_identifier, journal_fields)
    return True


def prefetch() -> None:
    """Load the SDK in the background now (after `start(prefetch_sdk=False)` and a fork)."""
    if _tracer is not None:
        _tracer.start_export()


def _active() -> Tracer | None:
    if not _configured:
        start()
    return _tracer


def enabled() -> bool:
    return _active() is not None


def span(
    name: str, *, parent: str | None = None, links: Iterable[str] = (), start_ns: int | None = None, **attributes: Any
) -> Span | NoSpan:
    """A span named `name`, a child of the current span (or of `parent`, a traceparent; or of
    $TRACEPARENT; or a new trace). Use it with `with`, or call .end() yourself. `links`:
    traceparents of spans that caused this one without being its parent; `start_ns`: when it
    began (time.time_ns()), if before now."""
    tracer = _active()
    if tracer is None:
        return NO_SPAN
    return tracer.new_span(name, parent, links, start_ns, attributes)


def current() -> Span | NoSpan:
    tracer = _active()
    return tracer.stack[-1] if tracer is not None and tracer.stack else NO_SPAN


def event(name: str, **attributes: Any) -> None:
    """An event in the current span (nothing without one)."""
    current().event(name, **attributes)


def traceparent() -> str | None:
    """The current span as a W3C traceparent, None with tracing off or outside any span."""
    return current().traceparent


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` for a child process, with TRACEPARENT naming the current span (on)."""
    child = dict(env)
    value = traceparent()
    if value is not None:
        child[TRACEPARENT_ENV] = value
    return child


def journal_fields() -> dict[str, str]:
    """TRACE_ID= and SPAN_ID= of the current span, for the journal."""
    now = current()
    if isinstance(now, NoSpan):
        return {}
    return {"TRACE_ID": now.trace_id, "SPAN_ID": now.span_id}


def flush() -> None:
    """Export what is left (console.run_main calls this at the end; call it before os._exit or
    a signal that ends the process). Bounded by the flush timeout."""
    if _tracer is not None:
        _tracer.flush()
