"""Trace context in frames and the exporter choice (shared/telemetry.py)."""

import pytest
from opentelemetry import trace

from shared import telemetry
from shared.config import Settings


def test_inject_extract_round_trip_keeps_the_trace():
    telemetry.setup_tracing("test", Settings(otel_exporter="none"))
    try:
        with telemetry.tracer().start_as_current_span("hop-1") as first:
            carrier = telemetry.inject({})
        assert carrier["traceparent"].startswith("00-")
        with telemetry.tracer().start_as_current_span("hop-2", context=telemetry.extract(carrier)) as second:
            assert second.get_span_context().trace_id == first.get_span_context().trace_id
            assert second.parent.span_id == first.get_span_context().span_id
    finally:
        telemetry.shutdown_tracing()


@pytest.mark.parametrize("carrier", [None, {}, {"traceparent": "garbage"}, {"traceparent": 5}, "text"])
def test_bad_carriers_give_an_empty_context(carrier):
    span = trace.get_current_span(telemetry.extract(carrier))
    assert not span.get_span_context().is_valid


def test_console_exporter_names_the_service(capsys):
    telemetry.setup_tracing("gateway", Settings(otel_exporter="console"))
    with telemetry.tracer().start_as_current_span("one"):
        pass
    telemetry.shutdown_tracing()
    err = capsys.readouterr().err
    assert '"service.name": "rose-gateway"' in err and '"name": "one"' in err


def test_unknown_exporter_is_refused():
    with pytest.raises(ValueError, match="otel_exporter"):
        telemetry.setup_tracing("gateway", Settings(otel_exporter="zipkin"))
