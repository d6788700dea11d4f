"""make_tracer_provider takes the OTLP endpoint from the mapping it is given (the vLLM plugin
passes one), not only from os.environ: spans reach a real receiver at that endpoint."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanKind

from spec_metrics._tracing.provider import make_tracer_provider

from .otlp import OtlpReceiver


@pytest.fixture
def receiver():
    tap = OtlpReceiver()
    yield tap
    tap.close()


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                      "OTEL_EXPORTER_OTLP_ENDPOINT"])
def test_endpoint_from_the_given_mapping(receiver, monkeypatch, variable):
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    value = receiver.url if variable.endswith("TRACES_ENDPOINT") else receiver.endpoint
    provider = make_tracer_provider("test", environ={variable: value}, registry=None)
    tracer = provider.get_tracer("test")
    for index in range(3):
        with tracer.start_as_current_span(f"span-{index}", kind=SpanKind.INTERNAL):
            pass
    provider.force_flush(10_000)
    spans = receiver.wait_for(3)
    assert sorted(span.name for span in spans) == ["span-0", "span-1", "span-2"]
    provider.shutdown()
