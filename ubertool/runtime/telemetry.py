"""OpenTelemetry for a server or command: off by default; with the policy's `[telemetry]
otlp_endpoint` or the standard OTEL_EXPORTER_OTLP_ENDPOINT, spans and metrics go over OTLP/HTTP.

Spans (see `ubertool.tools.tracing` for what they may record): fastmcp's span for each MCP
call (it continues the client's W3C `traceparent` from the request's `_meta`), which the server
marks with the session, run and principal; `ubertool.cell`; and, from the brokers,
`ubertool.mount.request`, `ubertool.tool.call` and `ubertool.credential.mint`. Metrics:
`ubertool.sessions` (open sessions), `ubertool.cells` (by status), `ubertool.restores` and
`ubertool.errors` (by kind). The SDK is imported only when telemetry is on, so a server
without it starts as fast as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import metrics

from ubertool.runtime.policy import Policy

_meter = metrics.get_meter("ubertool")
SESSIONS = _meter.create_up_down_counter("ubertool.sessions", unit="{session}",
                                         description="MCP sessions open in this server")
CELLS = _meter.create_counter("ubertool.cells", unit="{cell}", description="Cells run, by status")
RESTORES = _meter.create_counter("ubertool.restores", unit="{restore}",
                                 description="Sessions restored after a cell was stopped, by outcome")
ERRORS = _meter.create_counter("ubertool.errors", unit="{error}",
                               description="Failed cells, refused calls and journal failures, by kind")


def endpoint(policy: Policy) -> str | None:
    """Where telemetry goes: the policy's `otlp_endpoint`, else OTEL_EXPORTER_OTLP_ENDPOINT;
    None when neither is set or OTEL_SDK_DISABLED is true."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return policy.telemetry.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


@contextmanager
def telemetry(policy: Policy) -> Iterator[None]:
    """Export spans and metrics over OTLP/HTTP for the block when `endpoint(policy)` names a
    collector (flushed and shut down at its end); otherwise nothing is loaded or sent. Without
    the policy's endpoint the exporters read the standard OTEL_EXPORTER_OTLP_* variables
    (per-signal endpoints, headers, timeouts) themselves."""
    if endpoint(policy) is None:
        yield
        return
    # Lazily: the SDK and the exporter cost import time a server without telemetry never pays.
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    base = (policy.telemetry.otlp_endpoint or "").rstrip("/")
    resource = Resource.create({"service.name": policy.telemetry.service_name})
    tracer = TracerProvider(resource=resource)
    tracer.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"{base}/v1/traces") if base else OTLPSpanExporter()))
    meter = MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics") if base else OTLPMetricExporter())])
    trace.set_tracer_provider(tracer)
    metrics.set_meter_provider(meter)
    try:
        yield
    finally:
        tracer.shutdown()  # flushes the spans still queued
        meter.shutdown()
