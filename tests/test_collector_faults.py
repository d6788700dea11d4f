"""The OTLP collector down, then slow, then back: the real OTLP/HTTP exporter on loopback,
through spec_metrics' SpanExportProcessor. Every span's fate is counted exactly; the queue
stays bounded; the hooks record every step whatever the collector does; export resumes."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import spec_metrics
from spec_metrics._tracing.processor import SpanExportProcessor

from .conftest import run_step, sample_value, scrape
from .otlp import OtlpReceiver, span_trace_id

SPANS_PER_STEP = 4  # spec_decode.step + draft, verify, draft_extend


class HangingCollector:
    """Holds a loopback port from the start: bound and not listening, connections to it are
    refused (a collector that is down); after `hang()` it accepts connections and never
    answers (a stuck collector). Holding the port all along, no other process can take it
    between the phases."""

    def __init__(self, port: int = 0) -> None:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hang(self) -> "HangingCollector":
        self._server.listen(64)
        self._server.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            self._held.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for conn in self._held:
            conn.close()
        self._server.close()


def _spans_metric(registry: CollectorRegistry, reason: str | None) -> float:
    families = scrape(registry)
    if reason is None:
        return sample_value(families, "spec_metrics_spans_exported",
                            "spec_metrics_spans_exported_total")
    return sample_value(families, "spec_metrics_spans_dropped",
                        "spec_metrics_spans_dropped_total", reason=reason)


def _exemplars(registry: CollectorRegistry) -> set[tuple[str, str]]:
    """(trace_id, span_id) of every exemplar an OpenMetrics scrape shows."""
    return {(s.exemplar.labels["trace_id"], s.exemplar.labels["span_id"])
            for family in scrape(registry).values() for s in family.samples if s.exemplar}


def _withheld(registry: CollectorRegistry) -> float:
    return sample_value(scrape(registry), "spec_metrics_exemplars_withheld",
                        "spec_metrics_exemplars_withheld_total", reason="span_lost")


def _received(receiver: OtlpReceiver) -> set[tuple[str, str]]:
    return {(span_trace_id(span), _hex(span.span_id)) for span in list(receiver.spans)}


def _hex(value: object) -> str:
    return value.hex() if isinstance(value, (bytes, bytearray)) else str(value)


def test_collector_down_then_slow_then_back(clock, caplog) -> None:
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")
    collector = HangingCollector()  # holds the port; down until it hangs
    port = collector.port
    registry = CollectorRegistry()
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=1)
    processor = SpanExportProcessor(exporter, max_queue_size=64, max_export_batch_size=16,
                                    schedule_delay_millis=50, registry=registry)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    traced: list[str] = []
    hooks = spec_metrics.SpecDecodeHooks(
        "eagle", registry=registry, tracer_provider=provider, trace_ratio=1.0,
        max_traced_steps_per_second=1e9, max_draft_tokens=4,
        on_step=lambda result: traced.append(result.trace_id))
    steps = 0

    def record(n: int) -> None:
        nonlocal steps
        for _ in range(n):
            run_step(hooks, clock, [1, 2], 2)
        steps += n

    try:
        # 1. Down: nobody listens. Every export fails; every span is counted as lost, and
        # no exemplar ever reaches /metrics: each traced step is counted as withheld.
        record(10)
        assert processor.force_flush(30_000)
        assert processor.counts == {"exported": 0, "dropped_queue_full": 0,
                                    "dropped_export_failed": 10 * SPANS_PER_STEP,
                                    "dropped_export_timeout": 0, "dropped_shutdown": 0}
        assert _exemplars(registry) == set()
        assert _withheld(registry) == 10

        # 2. Stuck: the collector accepts and never answers. The export thread waits out the
        # exporter's timeout; meanwhile the queue fills and overflows, never beyond its bound.
        # While spans wait, their exemplars are not shown; once lost, they never are.
        hanging = collector.hang()
        try:
            record(50)
            assert processor.queue_length <= 64
            assert _exemplars(registry) == set()
            assert processor.force_flush(60_000)
        finally:
            hanging.close()
        counts = processor.counts
        lost_while_slow = 50 * SPANS_PER_STEP
        assert counts["exported"] == 0
        assert counts["dropped_queue_full"] >= lost_while_slow - 64 - 16
        assert (counts["dropped_queue_full"] + counts["dropped_export_failed"]
                == 10 * SPANS_PER_STEP + lost_while_slow)
        assert _exemplars(registry) == set()
        assert _withheld(registry) == 60  # every traced step lost at least one span

        # 3. Back: a real receiver on the same port; export resumes, and every exemplar on
        # /metrics points at a span the receiver got.
        receiver = OtlpReceiver(port)
        try:
            traced.clear()
            record(5)
            assert processor.force_flush(30_000)
            assert receiver.wait_for_traces(set(traced))
            # Every span exported has reached the receiver; its stream hands them over one
            # by one, so wait until all 20 are listed.
            received = receiver.wait_for(5 * SPANS_PER_STEP)
            assert len(received) == 5 * SPANS_PER_STEP
            shown = _exemplars(registry)
            assert shown and shown <= _received(receiver)
            assert {trace_id for trace_id, _ in shown} <= set(traced)
        finally:
            receiver.close()
        assert processor.counts["exported"] == 5 * SPANS_PER_STEP
        assert processor.counts["dropped_queue_full"] == counts["dropped_queue_full"]
        assert processor.counts["dropped_export_failed"] == counts["dropped_export_failed"]

        # The hooks recorded every step through all of it, and /metrics tells the story.
        families = scrape(registry)
        assert sample_value(families, "spec_decode_step_duration_seconds",
                            "spec_decode_step_duration_seconds_count", method="eagle") == steps
        assert _spans_metric(registry, None) == 5 * SPANS_PER_STEP
        assert _spans_metric(registry, "queue_full") == counts["dropped_queue_full"]
        assert _spans_metric(registry, "export_failed") == counts["dropped_export_failed"]
        assert _spans_metric(registry, "export_timeout") == 0
        assert _spans_metric(registry, "shutdown") == 0
        assert _withheld(registry) == 60
    finally:
        collector.close()
        provider.shutdown()


def test_export_timeout_gives_up_counts_and_withholds(clock, caplog) -> None:
    # OTEL_BSP_EXPORT_TIMEOUT: an export that has not returned by then is given up on; its
    # spans count as export_timeout (once, even when the export returns later) and their
    # exemplars are withheld. The exporter's own timeout (30 s) is far longer.
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")
    hanging = HangingCollector().hang()
    port = hanging.port
    registry = CollectorRegistry()
    provider = TracerProvider()
    try:
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=30)
        processor = SpanExportProcessor(exporter, max_export_batch_size=8,
                                        schedule_delay_millis=10, registry=registry,
                                        environ={"OTEL_BSP_EXPORT_TIMEOUT": "300"})
        assert processor.export_timeout_millis == 300
        provider.add_span_processor(processor)
        hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry,
                                             tracer_provider=provider, trace_ratio=1.0,
                                             max_traced_steps_per_second=1e9)
        run_step(hooks, clock, [1], 1)
        run_step(hooks, clock, [1], 1)  # 2 steps x 4 spans = one batch of 8
        assert not processor.force_flush(100)  # still waiting on the collector
        assert _exemplars(registry) == set()
        give_up = time.monotonic() + 30
        while processor.counts["dropped_export_timeout"] == 0 and time.monotonic() < give_up:
            time.sleep(0.02)
        assert processor.counts["dropped_export_timeout"] == 2 * SPANS_PER_STEP
        assert _withheld(registry) == 2
        assert _exemplars(registry) == set()
        assert _spans_metric(registry, "export_timeout") == 2 * SPANS_PER_STEP
    finally:
        hanging.close()  # the stuck export now fails: it is not counted again
        provider.shutdown()
    assert processor.counts["dropped_export_timeout"] == 2 * SPANS_PER_STEP
    assert processor.counts["dropped_export_failed"] == 0
    assert processor.counts["dropped_shutdown"] == 0


def test_shutdown_is_bounded_and_counts_what_it_could_not_send(clock, caplog) -> None:
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")
    hanging = HangingCollector().hang()
    port = hanging.port
    try:
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=1)
        processor = SpanExportProcessor(exporter, max_queue_size=1000, max_export_batch_size=8,
                                        schedule_delay_millis=10, registry=None)
        provider = TracerProvider()
        provider.add_span_processor(processor)
        hooks = spec_metrics.SpecDecodeHooks("eagle", registry=None, tracer_provider=provider,
                                             trace_ratio=1.0, max_traced_steps_per_second=1e9)
        for _ in range(25):
            run_step(hooks, clock, [1], 1)
        processor.shutdown(timeout_millis=1500)  # at most ~2 exports of 8 get a chance
        counts = processor.counts
        assert counts["exported"] == 0
        assert counts["dropped_shutdown"] > 0
        assert (counts["dropped_export_failed"] + counts["dropped_shutdown"]
                + counts["dropped_queue_full"]) == 25 * SPANS_PER_STEP
        assert processor.queue_length == 0
        run_step(hooks, clock, [1], 1)  # spans ended after shutdown: counted, not queued
        assert processor.queue_length == 0
        assert processor.counts["dropped_shutdown"] == counts["dropped_shutdown"] + 4
    finally:
        hanging.close()


@pytest.mark.parametrize("options", [dict(max_queue_size=0),
                                     dict(max_queue_size=8, max_export_batch_size=16),
                                     dict(schedule_delay_millis=0),
                                     dict(export_timeout_millis=0)])
def test_bad_processor_settings_are_refused(options) -> None:
    with pytest.raises(ValueError):
        SpanExportProcessor(OTLPSpanExporter(), registry=None, **options)
