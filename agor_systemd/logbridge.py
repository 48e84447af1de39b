"""The log bridge for agor's frontend: `agor-units log` (docs/telemetry.md).

agor's web view cannot run the OpenTelemetry SDK; its `tel.info('agent-started', {...})` calls
reach the backend, which hands them here — one record per `agor-units log LEVEL EVENT key=value`,
or a stream of JSON lines {"level", "event", "attrs"} on the stdin of one `agor-units log
--stream` kept open. Each record goes to the journal with its priority (the native protocol:
SYSLOG_IDENTIFIER=agor, AGOR_EVENT=, AGOR_ATTRS= as JSON, and TRACE_ID=/SPAN_ID= with tracing
on) and, with tracing on, into the trace as an event of an `agor.log` span (Tempo keeps traces
only, so events rather than log records). It never blocks the writer: the stream is read into a
bounded queue, and what does not fit, or what journald cannot take at once, is dropped and
counted; a malformed line gets a one-line complaint and the stream goes on.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

from agor_systemd import journal, tracing
from agor_systemd.errors import AgorError

IDENTIFIER = "agor"  # SYSLOG_IDENTIFIER= of the frontend's records: journalctl --user -t agor
LEVELS = {
    "error": journal.ERR,
    "warn": journal.WARNING,
    "warning": journal.WARNING,
    "info": journal.INFO,
    "debug": journal.DEBUG,
    "trace": journal.DEBUG,
}
QUEUE_RECORDS = 10_000  # read but not yet handled; a record more is dropped
SPAN_EVENTS = 512  # events per agor.log span ...
SPAN_SECONDS = 1.0  # ... or a new span after this long, so a long stream is exported as it goes


@dataclass(frozen=True)
class Record:
    level: str
    event: str
    attrs: dict[str, Any] = field(default_factory=dict)


def check_record(level: Any, event: Any, attrs: Any) -> Record:
    """A record from its three parts, or ValueError saying what is wrong."""
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if not isinstance(event, str) or not event.strip() or any(ord(c) < 0x20 for c in event):
        raise ValueError(f"event must be a non-empty single-line string, got {event!r}")
    if not isinstance(attrs, dict):
        raise ValueError(f"attrs must be an object, got {type(attrs).__name__}")
    return Record(level.lower(), event, attrs)


def parse_arguments(level: str, event: str, pairs: Iterable[str]) -> Record:
    """`LEVEL EVENT key=value ...` from the command line."""
    attrs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"attribute {pair!r} is not key=value")
        attrs[key] = value
    return check_record(level, event, attrs)


def parse_line(line: bytes) -> Record:
    """One JSON line {"level": ..., "event": ..., "attrs": {...}} ("attrs" may be left out)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    except ValueError:  # bytes that are not UTF-8
        raise ValueError("not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ValueError('not a JSON object like {"level": "info", "event": "agent-started", "attrs": {}}')
    return check_record(data.get("level"), data.get("event"), data.get("attrs", {}))


def value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def message(record: Record) -> str:
    """The journal's MESSAGE=: `event key=value ...`, one line."""
    words = [record.event, *(f"{k}={value_text(v)}" for k, v in record.attrs.items())]
    return " ".join(words).replace("\n", "\\n")


def journal_entry(record: Record, trace: dict[str, str]) -> dict[str, str]:
    return {
        "MESSAGE": message(record),
        "PRIORITY": str(LEVELS[record.level]),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "AGOR_EVENT": record.event,
        "AGOR_LEVEL": record.level,
        "AGOR_ATTRS": json.dumps(record.attrs, separators=(",", ":"), default=str),
        **trace,
    }


class Bridge:
    """Hands records to the journal and the trace; counts what was lost."""

    def __init__(self, stderr: TextIO, journal_socket: str = journal.JOURNAL_SOCKET) -> None:
        self.stderr = stderr
        self.journal_socket = journal_socket
        self.to_journal = os.path.exists(journal_socket)  # else: one line each on stderr
        self.handled = 0  # records taken from the stream (or the command line) and sent on
        self.overflowed = 0  # dropped: the queue was full
        self.refused = 0  # dropped: journald could not take the record at once
        self.span: tracing.Span | tracing.NoSpan = tracing.NO_SPAN
        self.span_events = 0
        self.span_ends = 0.0

    def emit(self, record: Record) -> None:
        self.handled += 1
        trace = self.trace_event(record)
        if not self.to_journal:
            self.stderr.write(journal.line(IDENTIFIER, message(record), LEVELS[record.level]))
        elif not journal.send(journal_entry(record, trace), self.journal_socket):
            self.refused += 1

    @property
    def dropped(self) -> int:
        return self.overflowed + self.refused

    def trace_event(self, record: Record) -> dict[str, str]:
        """The record as an event of the current agor.log span; its ids for the journal."""
        if not tracing.enabled():
            return {}
        now = time.monotonic()
        if self.span_events >= SPAN_EVENTS or now >= self.span_ends:
            self.span.end()
            self.span = tracing.span("agor.log", source="frontend")
            self.span_events, self.span_ends = 0, now + SPAN_SECONDS
        self.span.event(record.event, level=record.level, **{k: value_text(v) for k, v in record.attrs.items()})
        self.span_events += 1
        return (
            {"TRACE_ID": self.span.trace_id, "SPAN_ID": self.span.span_id}
            if isinstance(self.span, tracing.Span)
            else {}
        )

    def complain(self, line_number: int, problem: str) -> None:
        self.stderr.write(f"agor-units: log: line {line_number}: {problem}\n")
        self.stderr.flush()

    def close(self) -> None:
        self.span.end()
        self.stderr.flush()


def log_one(record: Record, stderr: TextIO = sys.stderr, journal_socket: str = journal.JOURNAL_SOCKET) -> Bridge:
    bridge = Bridge(stderr, journal_socket)
    bridge.emit(record)
    bridge.close()
    if bridge.dropped:
        raise AgorError("the journal did not take the record (journald busy or gone)")
    return bridge


def log_stream(
    stdin: BinaryIO,
    stderr: TextIO = sys.stderr,
    queue_records: int = QUEUE_RECORDS,
    journal_socket: str = journal.JOURNAL_SOCKET,
) -> Bridge:
    """Handle JSON lines from `stdin` until its end. A reader thread only reads and queues, so
    the writer is never held up by the journal or the export; a full queue drops (counted)."""
    bridge = Bridge(stderr, journal_socket)
    lines: queue.Queue[tuple[int, bytes] | None] = queue.Queue(queue_records)
    full = 0

    def read() -> None:
        nonlocal full
        for number, line in enumerate(stdin, start=1):
            try:
                lines.put_nowait((number, line))
            except queue.Full:
                full += 1
        lines.put(None)

    reader = threading.Thread(target=read, name="log-reader", daemon=True)
    reader.start()
    while (item := lines.get()) is not None:
        number, line = item
        if not line.strip():
            continue
        try:
            record = parse_line(line)
        except ValueError as e:
            bridge.complain(number, str(e))
            continue
        bridge.emit(record)
    reader.join()
    bridge.overflowed = full
    bridge.close()
    return bridge
