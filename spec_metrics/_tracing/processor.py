"""A batching span processor that never blocks the engine and says what it lost.

The SDK's BatchSpanProcessor drops spans silently (or into an OpenTelemetry metric that a
Prometheus-only shop never sees) when its queue is full. This one has the same shape — a
bounded queue filled by `on_end`, drained by a background thread that exports batches — and
counts every span's fate in Prometheus: exported, or dropped because the queue was full, the
export failed or timed out, or shutdown came first. It also reports each span's fate to the
export ticket of its step (span_fate.py), so that exemplars appear on /metrics only for spans
that were really exported. Memory is bounded by `max_queue_size` spans plus one batch in
flight, whatever the collector does.

Like the SDK's processor it reads `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
`OTEL_BSP_SCHEDULE_DELAY` and `OTEL_BSP_EXPORT_TIMEOUT` (milliseconds) when an argument is not
given, and suppresses instrumentation while exporting (an instrumented HTTP client inside the
exporter makes no spans of its own).

`on_end` runs on the engine thread: it appends to a deque and, when a batch is ready, sets
an event. It never waits for the exporter. A slow collector only stalls the export threads:
one dispatches batches, one calls the exporter, so that an export still running after the
export timeout is given up on (its spans counted `export_timeout`) while the dispatcher
waits for it before the next. Forked children start with an empty queue and their own
threads (the parent's spans are the parent's to export).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import Counter, deque
from typing import Any, Iterator, Mapping

from opentelemetry.context import (
    Context,
)
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from spec_metrics._support.export_caller import ExportCaller
from spec_metrics._support.forking import reset_after_fork
from spec_metrics._tracing.span_fate import ExportTicket, current
from spec_metrics.catalog import SPAN_DROP_REASONS, SPAN_EXPORT_METRICS

__all__ = ["SpanExportProcessor"]


# option -> (environment variable, default), the SDK's variables; our delay is shorter
# than the SDK's 5 s so that exemplars (shown once exported) appear sooner.
_ENV_OPTIONS: dict[str, tuple[str, int]] = {
    "max_queue_size": ("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
    "max_export_batch_size": ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
    "schedule_delay_millis": ("OTEL_BSP_SCHEDULE_DELAY", 1000),
    "export_timeout_millis": ("OTEL_BSP_EXPORT_TIMEOUT", 30_000),
}
_Entry = tuple[ReadableSpan, "ExportTicket | None"]


class SpanExportProcessor(SpanProcessor):
    """Batch export with a bounded queue and Prometheus counts of exported and lost spans.

    `registry`: where `spec_metrics_spans_exported_total` and
    `spec_metrics_spans_dropped_total{reason}` are registered (None: nowhere; read
    `.counts`). Several processors (several providers, or a file and an OTLP exporter) may
    share a registry: the series are the sums over all of them.
    """

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int | None = None,
                 max_export_batch_size: int | None = None,
                 schedule_delay_millis: float | None = None,
                 export_timeout_millis: float | None = None,
                 registry: CollectorRegistry | None = REGISTRY,
                 environ: Mapping[str, str] | None = None) -> None:
        options = _resolve(environ if environ is not None else os.environ,
                           max_queue_size=max_queue_size,
                           max_export_batch_size=max_export_batch_size,
                           schedule_delay_millis=schedule_delay_millis,
                           export_timeout_millis=export_timeout_millis)
        self._exporter = exporter
        self.max_queue_size = int(options["max_queue_size"])
        self.max_export_batch_size = int(options["max_export_batch_size"])
        self.schedule_delay_millis = float(options["schedule_delay_millis"])
        self.export_timeout_millis = float(options["export_timeout_millis"])
        self.exported = 0
        self.dropped = dict.fromkeys(SPAN_DROP_REASONS, 0)
        self._totals = _totals_for(registry) if registry is not None else None
        self._fresh_state()
        reset_after_fork(self)

    def _fresh_state(self) -> None:
        self._queue: deque[_Entry] = deque()
        self._lock = threading.Lock()  # counts, queue length checks, the batch in flight
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._in_flight: list[_Entry] | None = None  # popped, fate not yet counted
        self._shut_down = False
        self._flush_requested = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        exporter = self._exporter
        self._caller: ExportCaller[list[ReadableSpan], SpanExportResult] = ExportCaller(
            lambda spans, _timeout: exporter.export(spans), SpanExportResult.FAILURE,
            "spec-metrics-span-export", lambda spans: f"{len(spans)} spans lost")

    # ---- SpanProcessor -----------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        ticket = current()
        if self._stopping:
            self._count("shutdown", 1)  # ended after shutdown: never exported
            if ticket is not None:
                ticket.lost()
            return
        with self._lock:
            full = len(self._queue) >= self.max_queue_size
            if full:
                self.dropped["queue_full"] += 1
            else:
                if ticket is not None:
                    ticket.expect()
                self._queue.append((span, ticket))
                ready = len(self._queue) >= self.max_export_batch_size
        if full:
            if self._totals is not None:
                self._totals.add("queue_full", 1)
            if ticket is not None:
                ticket.lost()
            return
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
            while self._queue or self._in_flight is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self, timeout_millis: int = 5_000) -> None:
        """Flush and stop within `timeout_millis` (an export already on the wire may go on
        in a daemon thread); what is still queued or in flight then counts as lost, and so
        does every span ended afterwards."""
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
            lost = list(self._queue) + (self._in_flight or [])
            self._queue.clear()
            self._in_flight = None
        self._settle(lost, "shutdown")
        self._caller.stop()
        self._exporter.shutdown()

    # ---- the export threads ----------------------------------------------------------

    def _start_thread(self) -> None:
        with self._idle:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spec-metrics-spans",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        delay = self.schedule_delay_millis / 1e3
        while not self._stopping:
            self._wake.wait(delay)
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
            batch = [self._queue.popleft() for _ in range(size)]
            self._in_flight = batch  # read by force_flush without the lock
        result = self._caller.call([span for span, _ in batch], self.export_timeout_millis / 1e3)
        with self._lock:
            if self._in_flight is not batch:  # shutdown already counted this batch
                return
            self._in_flight = None
        if result is SpanExportResult.SUCCESS:
            self._settle(batch, None)
        else:
            self._settle(batch, "export_timeout" if result is None else "export_failed")
        if result is None:
            # Never two exports at once: wait for the one that timed out (or for shutdown).
            while not self._caller.wait_idle(0.1):
                if self._stopping:
                    return

    def _settle(self, entries: list[_Entry], lost_reason: str | None) -> None:
        """Count the fate of `entries` once, and tell their steps' tickets."""
        if not entries:
            return
        if lost_reason is None:
            with self._lock:
                self.exported += len(entries)
            if self._totals is not None:
                self._totals.add(None, len(entries))
        else:
            self._count(lost_reason, len(entries))
        tickets = Counter(ticket for _, ticket in entries if ticket is not None)
        for ticket, spans in tickets.items():
            if lost_reason is None:
                ticket.exported(spans)
            else:
                ticket.lost(spans)

    def _count(self, reason: str, n: int) -> None:
        with self._lock:
            self.dropped[reason] += n
        if self._totals is not None:
            self._totals.add(reason, n)

    # ---- introspection ---------------------------------------------------------------

    @property
    def span_exporter(self) -> SpanExporter:
        return self._exporter

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def counts(self) -> dict[str, int]:
        """This processor's own counts (the registry's series sum every processor)."""
        with self._lock:
            return {"exported": self.exported, **{f"dropped_{reason}": value
                                                  for reason, value in self.dropped.items()}}

    def _reset_after_fork(self) -> None:
        # The parent's queued spans are the parent's to export; its threads are not here.
        self.exported = 0
        self.dropped = dict.fromkeys(SPAN_DROP_REASONS, 0)
        self._fresh_state()


class _RegistryTotals(Collector):
    """spec_metrics_spans_* of one registry: the sums over every processor that counts
    into it, kept here so that a processor that goes away takes nothing back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.created_ns = time.time_ns()  # start time of the OTLP metrics push's points
        self.exported = 0
        self.dropped = dict.fromkeys(SPAN_DROP_REASONS, 0)
        reset_after_fork(self)

    def add(self, reason: str | None, n: int) -> None:
        with self._lock:
            if reason is None:
                self.exported += n
            else:
                self.dropped[reason] += n

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            values = (self.exported, dict(self.dropped))
        return self._families(values)

    @staticmethod
    def _families(values: tuple[int, dict[str, int]] | None) -> Iterator[Metric]:
        exported_spec, dropped_spec = SPAN_EXPORT_METRICS
        exported = CounterMetricFamily(exported_spec.name, exported_spec.help)
        dropped = CounterMetricFamily(dropped_spec.name, dropped_spec.help, labels=["reason"])
        if values is not None:
            exported.add_metric([], float(values[0]))
            for reason in SPAN_DROP_REASONS:
                dropped.add_metric([reason], float(values[1][reason]))
        yield exported
        yield dropped

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self.created_ns = time.time_ns()
        self.exported = 0
        self.dropped = dict.fromkeys(SPAN_DROP_REASONS, 0)


_TOTALS: "weakref.WeakKeyDictionary[CollectorRegistry, _RegistryTotals]" = (
    weakref.WeakKeyDictionary())
_TOTALS_LOCK = threading.Lock()


def _totals_for(registry: CollectorRegistry) -> _RegistryTotals:
    with _TOTALS_LOCK:
        totals = _TOTALS.get(registry)
        if totals is None:
            totals = _TOTALS[registry] = _RegistryTotals()
            registry.register(totals)
        return totals


def _resolve(environ: Mapping[str, str], **given: Any) -> dict[str, float]:
    """Arguments, else the OTEL_BSP_* variables, else the defaults; checked."""
    values: dict[str, float] = {}
    for name, (variable, default) in _ENV_OPTIONS.items():
        value = given[name]
        if value is None:
            raw = environ.get(variable, "").strip()
            if raw:
                try:
                    value = int(raw)
                except ValueError:
                    raise ValueError(f"spec_metrics: {variable}={raw!r} is not an integer "
                                     "(milliseconds or a count)") from None
            else:
                value = default
        values[name] = value
    queue, batch = values["max_queue_size"], values["max_export_batch_size"]
    if queue < 1 or not 1 <= batch <= queue:
        raise ValueError("need max_queue_size >= 1 and 1 <= max_export_batch_size <= "
                         f"max_queue_size, got {queue} and {batch} (arguments or "
                         "OTEL_BSP_MAX_QUEUE_SIZE / OTEL_BSP_MAX_EXPORT_BATCH_SIZE)")
    for name in ("schedule_delay_millis", "export_timeout_millis"):
        if values[name] <= 0:
            raise ValueError(f"{name} must be > 0, got {values[name]} (argument or "
                             f"{_ENV_OPTIONS[name][0]})")
    return values
