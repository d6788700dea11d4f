"""SpanExportProcessor behaves like an OpenTelemetry span processor: instrumentation is
suppressed while it exports, the OTEL_BSP_* variables apply, spans ended after shutdown are
counted, and several processors share one registry."""

from __future__ import annotations

import threading

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import spec_metrics
from spec_metrics._tracing.processor import SpanExportProcessor

from .conftest import run_step, sample_value, scrape
from .otlp import OtlpReceiver

SPANS_PER_STEP = 4


def _hooks(provider: TracerProvider, registry: CollectorRegistry | None = None
           ) -> spec_metrics.SpecDecodeHooks:
    return spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                        trace_ratio=1.0, max_traced_steps_per_second=1e9)


def test_export_suppresses_the_exporters_own_instrumentation(clock) -> None:
    # An auto-instrumented service: `requests` is instrumented, and the OTLP/HTTP exporter
    # sends with `requests`. Without suppression every export makes a span that is exported
    # in turn, forever; with it, exactly the steps' spans reach the receiver.
    instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.requests",
        reason="the dev extra installs opentelemetry-instrumentation-requests")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider()
    instrumentor = instrumentation.RequestsInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    receiver = OtlpReceiver()
    try:
        processor = SpanExportProcessor(OTLPSpanExporter(endpoint=receiver.url),
                                        schedule_delay_millis=20, registry=None)
        provider.add_span_processor(processor)
        hooks = _hooks(provider)
        for _ in range(3):
            run_step(hooks, clock, [1], 1)
        assert processor.force_flush(20_000)  # an export's own span would keep it busy
        assert processor.force_flush(5_000)
        received = receiver.wait_for(3 * SPANS_PER_STEP)
        assert processor.counts["exported"] == 3 * SPANS_PER_STEP
        assert sorted({span.name for span in received}) == [
            "spec_decode.draft", "spec_decode.draft_extend", "spec_decode.step",
            "spec_decode.verify"]
        assert len(received) == 3 * SPANS_PER_STEP
    finally:
        instrumentor.uninstrument()
        receiver.close()
        provider.shutdown()


class RecordingExporter(SpanExporter):
    """Keeps the size of every batch and whether instrumentation was suppressed."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.suppressed: list[bool] = []

    def export(self, spans):  # type: ignore[no-untyped-def]
        self.batches.append(len(spans))
        self.suppressed.append(bool(otel_context.get_value(
            otel_context._SUPPRESS_INSTRUMENTATION_KEY)))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def test_otel_bsp_variables_apply_and_arguments_win() -> None:
    environ = {"OTEL_BSP_MAX_QUEUE_SIZE": "40", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "6",
               "OTEL_BSP_SCHEDULE_DELAY": "250", "OTEL_BSP_EXPORT_TIMEOUT": "1500"}
    processor = SpanExportProcessor(RecordingExporter(), registry=None, environ=environ)
    assert (processor.max_queue_size, processor.max_export_batch_size,
            processor.schedule_delay_millis, processor.export_timeout_millis) == (40, 6, 250,
                                                                                  1500)
    explicit = SpanExportProcessor(RecordingExporter(), registry=None, environ=environ,
                                   max_queue_size=10, max_export_batch_size=2)
    assert (explicit.max_queue_size, explicit.max_export_batch_size) == (10, 2)
    defaults = SpanExportProcessor(RecordingExporter(), registry=None, environ={})
    assert (defaults.max_queue_size, defaults.max_export_batch_size,
            defaults.schedule_delay_millis, defaults.export_timeout_millis) == (2048, 512, 1000,
                                                                                30000)
    with pytest.raises(ValueError, match="OTEL_BSP_MAX_QUEUE_SIZE"):
        SpanExportProcessor(RecordingExporter(), registry=None,
                            environ={"OTEL_BSP_MAX_QUEUE_SIZE": "many"})


def test_queue_and_batch_sizes_from_the_environment_bound_what_happens(clock) -> None:
    exporter = RecordingExporter()
    gate = threading.Event()
    real_export = exporter.export

    def held_export(spans):  # type: ignore[no-untyped-def]
        gate.wait(30)  # the first export holds the thread: the queue fills behind it
        return real_export(spans)

    exporter.export = held_export  # type: ignore[method-assign]
    processor = SpanExportProcessor(exporter, registry=None, environ={
        "OTEL_BSP_MAX_QUEUE_SIZE": "12", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
        "OTEL_BSP_SCHEDULE_DELAY": "10"})
    provider = TracerProvider()
    provider.add_span_processor(processor)
    hooks = _hooks(provider)
    run_step(hooks, clock, [1], 1)  # 4 spans = one batch, taken by the export thread
    deadline = threading.Event()
    for _ in range(500):  # until the thread has popped that batch (it then blocks)
        if processor.queue_length == 0:
            break
        deadline.wait(0.01)
    assert processor.queue_length == 0
    for _ in range(5):  # 20 spans into a queue of 12
        run_step(hooks, clock, [1], 1)
    assert processor.queue_length == 12
    assert processor.counts["dropped_queue_full"] == 8
    gate.set()
    assert processor.force_flush(10_000)
    assert max(exporter.batches) == 4 and sum(exporter.batches) == 16
    assert all(exporter.suppressed)  # instrumentation suppressed around every export
    provider.shutdown()


def test_spans_ended_after_shutdown_are_counted(clock) -> None:
    registry = CollectorRegistry()
    processor = SpanExportProcessor(InMemorySpanExporter(), registry=registry)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    hooks = _hooks(provider, registry)
    run_step(hooks, clock, [1], 1)
    processor.shutdown()
    assert processor.counts["exported"] == SPANS_PER_STEP
    run_step(hooks, clock, [1], 1)  # the engine goes on after the processor shut down
    assert processor.counts["dropped_shutdown"] == SPANS_PER_STEP
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_spans_dropped",
                        "spec_metrics_spans_dropped_total", reason="shutdown") == SPANS_PER_STEP
    # ... and the step's exemplars are withheld: its spans never left.
    assert sample_value(families, "spec_metrics_exemplars_withheld",
                        "spec_metrics_exemplars_withheld_total", reason="span_lost") == 1


def test_several_processors_share_a_registry_and_sum(clock) -> None:
    registry = CollectorRegistry()
    first = SpanExportProcessor(InMemorySpanExporter(), registry=registry)
    second = SpanExportProcessor(InMemorySpanExporter(), registry=registry)  # no clash
    providers = [TracerProvider(), TracerProvider()]
    providers[0].add_span_processor(first)
    providers[1].add_span_processor(second)
    providers[1].add_span_processor(SpanExportProcessor(InMemorySpanExporter(),
                                                        registry=registry))
    run_step(_hooks(providers[0]), clock, [1], 1)
    hooks = _hooks(providers[1])
    run_step(hooks, clock, [1], 1)
    run_step(hooks, clock, [1], 1)
    for provider in providers:
        provider.force_flush()
    assert first.counts["exported"] == SPANS_PER_STEP
    assert second.counts["exported"] == 2 * SPANS_PER_STEP
    # 1 step x 4 spans through one processor + 2 steps x 4 spans through two.
    assert sample_value(scrape(registry), "spec_metrics_spans_exported",
                        "spec_metrics_spans_exported_total") == 4 + 2 * 2 * 4
    for provider in providers:
        provider.shutdown()
