"""The OpenTelemetry SDK side of agor_systemd.tracing: recorded spans out over OTLP/HTTP.

Only tracing's export thread imports this module, and only with $AGOR_OTLP_ENDPOINT set: it
imports the SDK (the `[otel]` extra). The spans were recorded without the SDK, their ids chosen
already (journal lines and TRACEPARENT carry them); they are replayed through an SDK tracer whose
id generator hands out exactly those ids, then exported in one request per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags

from agor_systemd import __version__

SCOPE = "agor_systemd"


class RecordedIds(IdGenerator):
    """Hands the SDK the ids a span was recorded with."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id


class Collect(SpanProcessor):
    """Keeps the spans the SDK ended, for one export call."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def remote_context(trace_id: str, span_id: str) -> SpanContext:
    """A span of another process (or recorded earlier), from the hex ids tracing keeps."""
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def attribute_value(value: Any) -> Any:
    """What OTLP can carry: str, bool, int, float; anything else as its text."""
    return value if isinstance(value, str | bool | int | float) else str(value)


class Exporter:
    def __init__(self, url: str, service: str, resource: dict[str, Any], timeout_s: float) -> None:
        # the SDK logs every failed export on stderr; tracing counts them and reports once
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL + 1)
        attributes = {"service.name": service, "service.version": __version__, **resource}
        self.ids = RecordedIds()
        self.collected = Collect()
        provider = TracerProvider(resource=Resource.create(attributes), id_generator=self.ids)
        provider.add_span_processor(self.collected)
        self.tracer = provider.get_tracer(SCOPE, __version__)
        self.exporter = OTLPSpanExporter(endpoint=url, timeout=timeout_s)

    def replay(self, recorded: Any) -> None:
        """One tracing.Span (validated ids; links as traceparents) through the SDK."""
        parent = None
        if recorded.parent_id is not None:
            parent = trace.set_span_in_context(
                trace.NonRecordingSpan(remote_context(recorded.trace_id, recorded.parent_id))
            )
        self.ids.trace_id, self.ids.span_id = int(recorded.trace_id, 16), int(recorded.span_id, 16)
        links = [Link(remote_context(*link.split("-")[1:3])) for link in recorded.links]
        span = self.tracer.start_span(
            recorded.name,
            context=parent,
            attributes={k: attribute_value(v) for k, v in recorded.attributes.items()},
            links=links,
            start_time=recorded.start_ns,
        )
        for name, at_ns, attributes in recorded.events:
            span.add_event(name, {k: attribute_value(v) for k, v in attributes.items()}, at_ns)
        span.set_status(Status(StatusCode.ERROR, recorded.error) if recorded.error else Status(StatusCode.OK))
        span.end(recorded.end_ns)

    def export(self, batch: Sequence[Any]) -> str | None:
        """Send the spans in one request; None when the collector took them, else why not."""
        self.collected.ended = []
        try:
            for recorded in batch:
                self.replay(recorded)
            result = self.exporter.export(self.collected.ended)
        except Exception as e:  # the exporter should not raise; never let it end the thread
            return f"{type(e).__name__}: {e}"
        return None if result == SpanExportResult.SUCCESS else "the collector refused or did not answer"
