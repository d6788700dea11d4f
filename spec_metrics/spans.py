"""A batching span processor that never blocks the engine and says what it lost.

The SDK's BatchSpanProcessor drops spans silently (or into an OpenTelemetry metric that a
Prometheus-only shop never sees) when its queue is full. This one has the same shape — a
bounded queue filled by `on_end`, drained by one background thread that exports batches —
and counts every span's fate in Prometheus: exported, or dropped because the queue was full,
the export failed (the collector is down or timed out) or shutdown ran out of time. Memory
is bounded by `max_queue_size` spans plus one batch in flight, whatever the collector does.

`on_end` runs on the engine thread: it appends to a deque and, when a batch is ready, sets
an event. It never waits for the exporter. A slow collector only stalls the export thread.
Forked children start with an empty queue and their own thread (the parent's spans are the
parent's to export).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Iterator

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from .catalog import SPAN_DROP_REASONS, SPAN_EXPORT_METRICS
from .forking import reset_after_fork

__all__ = ["SpanExportProcessor"]

logger = logging.getLogger("spec_metrics")


class SpanExportProcessor(SpanProcessor, Collector):
    """Batch export with a bounded queue and Prometheus counts of exported and lost spans.

    `registry`: where `spec_metrics_spans_exported_total` and
    `spec_metrics_spans_dropped_total{reason}` are registered (None: nowhere; read
    `.counts`). The exporter's own timeout bounds each export (OTLPSpanExporter(timeout=s)).
    """

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int = 2048,
                 max_export_batch_size: int = 512, schedule_delay_millis: float = 1000.0,
                 registry: CollectorRegistry | None = REGISTRY) -> None:
        if max_queue_size < 1 or not 1 <= max_export_batch_size <= max_queue_size:
            raise ValueError("need max_queue_size >= 1 and 1 <= max_export_batch_size <= "
                             f"max_queue_size, got {max_queue_size} and {max_export_batch_size}")
        if schedule_delay_millis <= 0:
            raise ValueError(f"schedule_delay_millis must be > 0, got {schedule_delay_millis}")
        self._exporter = exporter
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = max_export_batch_size
        self._delay = schedule_delay_millis / 1e3
        self.exported = 0
        self.dropped = dict.fromkeys(SPAN_DROP_REASONS, 0)
        self._fresh_state()
        if registry is not None:
            registry.register(self)
        reset_after_fork(self)

    def _fresh_state(self) -> None:
        self._queue: deque[ReadableSpan] = deque()
        self._lock = threading.Lock()  # counts and queue length checks
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._abandoned = 0
        self._shut_down = False
        self._flush_requested = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- SpanProcessor -----------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled or self._stopping:
            return
        with self._lock:
            if len(self._queue) >= self.max_queue_size:
                self.dropped["queue_full"] += 1
                return
            self._queue.append(span)
            ready = len(self._queue) >= self.max_export_batch_size
        if self._thread is None:
            self._start_thread()
        if ready:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export everything queued now; False if the deadline passed first."""
        if self._thread is None:
            return not self._queue
        deadline = time.monotonic() + timeout_millis / 1e3
        with self._idle:
            self._flush_requested = True
            self._wake.set()
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self, timeout_millis: int = 5_000) -> None:
        """Flush and stop within `timeout_millis` (an export already on the wire may go on
        in the daemon thread); what is still queued then counts as lost."""
        if self._shut_down:  # the provider's atexit may call again
            return
        self._shut_down = True
        deadline = time.monotonic() + timeout_millis / 1e3
        self.force_flush(timeout_millis)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        with self._lock:
            # A batch still on the wire past the deadline is counted lost now, not again
            # when (if ever) its export returns.
            self._abandoned = self._in_flight
            self.dropped["shutdown"] += len(self._queue) + self._abandoned
            self._queue.clear()
        self._exporter.shutdown()

    # ---- the export thread -----------------------------------------------------------

    def _start_thread(self) -> None:
        with self._idle:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spec-metrics-spans",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay)
            self._wake.clear()
            while self._queue and not self._stopping:
                self._export_batch()
                if not (self._flush_requested or len(self._queue)
                        >= self.max_export_batch_size):
                    break
            with self._idle:
                if not self._queue:
                    self._flush_requested = False
                self._idle.notify_all()

    def _export_batch(self) -> None:
        with self._lock:
            size = min(self.max_export_batch_size, len(self._queue))
            self._in_flight = size  # before popping: force_flush reads both without the lock
            batch = [self._queue.popleft() for _ in range(size)]
        try:
            result = self._exporter.export(batch)
        except Exception:  # an exporter bug must not kill the thread
            logger.exception("spec_metrics: span exporter raised; %d spans lost", len(batch))
            result = SpanExportResult.FAILURE
        with self._lock:
            if self._abandoned:  # shutdown already counted this batch
                self._abandoned = self._in_flight = 0
                return
            if result is SpanExportResult.SUCCESS:
                self.exported += len(batch)
            else:
                self.dropped["export_failed"] += len(batch)
            self._in_flight = 0

    # ---- introspection and exposition -------------------------------------------------

    @property
    def span_exporter(self) -> SpanExporter:
        return self._exporter

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"exported": self.exported, **{f"dropped_{reason}": value
                                                  for reason, value in self.dropped.items()}}

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            exported, dropped = self.exported, dict(self.dropped)
        return self._families({"exported": exported, **dropped})

    @staticmethod
    def _families(values: dict[str, int]) -> Iterator[Metric]:
        exported_spec, dropped_spec = SPAN_EXPORT_METRICS
        exported = CounterMetricFamily(exported_spec.name, exported_spec.help)
        dropped = CounterMetricFamily(dropped_spec.name, dropped_spec.help, labels=["reason"])
        if values:
            exported.add_metric([], float(values["exported"]))
            for reason in SPAN_DROP_REASONS:
                dropped.add_metric([reason], float(values[reason]))
        yield exported
        yield dropped

    def _reset_after_fork(self) -> None:
        # The parent's queued spans are the parent's to export; its thread is not here.
        self.exported = 0
        self.dropped = dict.fromkeys(SPAN_DROP_REASONS, 0)
        self._fresh_state()
