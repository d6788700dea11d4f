"""The OTLP collector down, then slow, then back: the real OTLP/HTTP exporter on loopback,
through spec_metrics' SpanExportProcessor. Every span's fate is counted exactly; the queue
stays bounded; the hooks record every step whatever the collector does; export resumes."""

from __future__ import annotations

import logging
import socket
import threading

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import spec_metrics
from spec_metrics.spans import SpanExportProcessor

from .conftest import run_step, sample_value, scrape
from .otlp import OtlpReceiver, free_port

SPANS_PER_STEP = 4  # spec_decode.step + draft, verify, draft_extend


class HangingCollector:
    """Accepts connections on the collector's port and never answers: a stuck collector."""

    def __init__(self, port: int) -> None:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self._server.listen(64)
        self._server.settimeout(0.2)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            self._held.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._stop.set()
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


def test_collector_down_then_slow_then_back(clock, caplog) -> None:
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")
    port = free_port()
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
        # 1. Down: nobody listens. Every export fails; every span is counted as lost.
        record(10)
        assert processor.force_flush(30_000)
        assert processor.counts == {"exported": 0, "dropped_queue_full": 0,
                                    "dropped_export_failed": 10 * SPANS_PER_STEP,
                                    "dropped_shutdown": 0}

        # 2. Slow: the collector accepts and never answers. The export thread waits out the
        # exporter's timeout; meanwhile the queue fills and overflows, never beyond its bound.
        hanging = HangingCollector(port)
        try:
            record(50)
            assert processor.queue_length <= 64
            assert processor.force_flush(60_000)
        finally:
            hanging.close()
        counts = processor.counts
        lost_while_slow = 50 * SPANS_PER_STEP
        assert counts["exported"] == 0
        assert counts["dropped_queue_full"] >= lost_while_slow - 64 - 16
        assert (counts["dropped_queue_full"] + counts["dropped_export_failed"]
                == 10 * SPANS_PER_STEP + lost_while_slow)

        # 3. Back: a real receiver on the same port; export resumes.
        receiver = OtlpReceiver(port)
        try:
            traced.clear()
            record(5)
            assert processor.force_flush(30_000)
            assert receiver.wait_for_traces(set(traced))
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
        assert _spans_metric(registry, "shutdown") == 0
    finally:
        provider.shutdown()


def test_shutdown_is_bounded_and_counts_what_it_could_not_send(clock, caplog) -> None:
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")
    port = free_port()
    hanging = HangingCollector(port)
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
        run_step(hooks, clock, [1], 1)  # spans after shutdown are ignored, not queued
        assert processor.queue_length == 0
    finally:
        hanging.close()


@pytest.mark.parametrize("options", [dict(max_queue_size=0),
                                     dict(max_queue_size=8, max_export_batch_size=16),
                                     dict(schedule_delay_millis=0)])
def test_bad_processor_settings_are_refused(options) -> None:
    with pytest.raises(ValueError):
        SpanExportProcessor(OTLPSpanExporter(), registry=None, **options)


def test_processor_metrics_are_registered_once(registry) -> None:
    SpanExportProcessor(OTLPSpanExporter(), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        SpanExportProcessor(OTLPSpanExporter(), registry=registry)
