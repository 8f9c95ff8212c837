"""OpenTelemetry tracing for every rose service, and trace context carried in frames.

Each service calls `setup_tracing("<role>", settings)` once at start. A request's
trace context travels inside the wire messages (`GenerateRequest.trace`,
`Submit.trace`) as a W3C `traceparent` carrier: the sender calls `inject(carrier)`
inside its span; the receiver starts its own span with `parent=extract(carrier)`,
so one request is one trace across gateway, formatter, scheduler and worker.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter, DefaultSetter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp")

_propagator = TraceContextTextMapPropagator()
_provider = None


def setup_tracing(service_name: str, settings) -> None:
    """Install a tracer provider for this process; resource service.name = rose-<role>.

    settings.otel_exporter: `none` (spans are made, so context still propagates, but
    not exported), `console` (printed to stderr), `otlp` (http/protobuf to
    OTEL_EXPORTER_OTLP_ENDPOINT).
    """
    global _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter_name = (getattr(settings, "otel_exporter", "none") or "none").strip().lower()
    if exporter_name not in EXPORTERS:
        raise ValueError(f"otel_exporter must be one of {', '.join(EXPORTERS)}, got {exporter_name!r}")
    name = service_name if service_name.startswith("rose-") else f"rose-{service_name}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if exporter_name == "console":
        import sys

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
            log.warning("otel_exporter=otlp but OTEL_EXPORTER_OTLP_ENDPOINT is unset; using the exporter's default")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if _provider is not None:
        # A second setup in one process (tests): flush the old one, keep the global.
        _provider.shutdown()
    _provider = provider
    # The OTel API only lets the global provider be set once per process; later calls
    # go through our own reference instead.
    trace.set_tracer_provider(provider)


def tracer(name: str = "rose") -> trace.Tracer:
    """A tracer from this process's provider (a no-op one before setup_tracing)."""
    if _provider is not None:
        return _provider.get_tracer(name)
    return trace.get_tracer(name)


def use_span(span):
    """Make `span` current inside a `with` block (without ending it on exit)."""
    return trace.use_span(span, end_on_exit=False)


def inject(carrier: dict[str, str]) -> dict[str, str]:
    """Write the current span's context into `carrier` (W3C traceparent); return it."""
    _propagator.inject(carrier, setter=DefaultSetter())
    return carrier


def extract(carrier: dict[str, str] | None) -> otel_context.Context:
    """The context a frame's `trace` carrier holds (an empty one if none or malformed)."""
    if not carrier or not isinstance(carrier, dict):
        return otel_context.Context()
    try:
        return _propagator.extract(carrier, getter=DefaultGetter())
    except Exception:  # a malformed header from a peer must never break a request
        return otel_context.Context()


def shutdown_tracing() -> None:
    """Flush pending spans and stop the exporter."""
    global _provider
    if _provider is not None:
        try:
            _provider.force_flush()
        finally:
            _provider.shutdown()
        _provider = None
