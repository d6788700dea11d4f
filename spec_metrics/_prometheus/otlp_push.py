"""Push the series /metrics shows over OTLP/HTTP on an interval: one aggregation, two ways out.

`start_otlp_metrics_exporter` starts an `OtlpMetricsExporter` on a registry. Every interval
its thread (`spec-metrics-otlp-metrics`) reads the registry's spec_metrics collectors as a
scrape does (otlp_data.py) and hands the SDK's MetricsData to an SDK metric exporter (the
OTLP/HTTP one by default), which a second thread (`spec-metrics-otlp-metric-export`) calls,
so that a push that hangs is given up on after the export timeout. The engine thread takes
no part: the hooks feed the collectors as they always do, and no OpenTelemetry instrument
is ever called. Every push is counted once on /metrics (otlp_totals.py): accepted, or lost
by reason; losses are also logged, at most once a minute per reason. Settings:
otlp_config.py.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Iterator, Mapping

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._prometheus.otlp_config import (
    DEFAULT_INTERVAL_MS,
    DEFAULT_TIMEOUT_MS,
    delta_from,
    otlp_http_exporter,
    seconds_from,
)
from spec_metrics._prometheus.otlp_data import Reading, metrics_data, read
from spec_metrics._prometheus.otlp_totals import PushTotals, totals_for
from spec_metrics._support.export_caller import ExportCaller
from spec_metrics._support.forking import reset_after_fork
from spec_metrics._support.log import logger
from spec_metrics._tracing.processor import _RegistryTotals
from spec_metrics._version import __version__
from spec_metrics.catalog import OTLP_EXPORT_FAILURE_REASONS, OTLP_METRIC_EXPORTS_FAILED

__all__ = ["OtlpMetricsExporter", "start_otlp_metrics_exporter"]

DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
_LOG_EVERY_S = 60.0


def start_otlp_metrics_exporter(
    registry: CollectorRegistry = REGISTRY, *, endpoint: str | None = None,
    interval_s: float | None = None, timeout_s: float | None = None,
    temporality: str | None = None, headers: Mapping[str, str] | None = None,
    resource: Resource | None = None, exporter: MetricExporter | None = None,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
) -> "OtlpMetricsExporter":
    """Push `registry`'s spec_metrics series (what its /metrics shows, exemplars included)
    over OTLP/HTTP every `interval_s` seconds, until `shutdown()` or interpreter exit.

    `endpoint`: a collector's base URL (`/v1/metrics` is added) or the full metrics URL;
    None: `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` +
    `/v1/metrics`, else http://localhost:4318/v1/metrics. `interval_s`, `timeout_s`: None
    reads `OTEL_METRIC_EXPORT_INTERVAL` / `OTEL_METRIC_EXPORT_TIMEOUT` (ms; 60 s, 30 s).
    `temporality`: "cumulative" or "delta" (None: the standard preference variable).
    `resource`: None is the SDK's `Resource.create()` (OTEL_SERVICE_NAME,
    OTEL_RESOURCE_ATTRIBUTES). `exporter`: any SDK MetricExporter instead of OTLP/HTTP
    (then no endpoint or headers)."""
    if exporter is None:
        exporter = otlp_http_exporter(endpoint, headers)
    elif endpoint is not None or headers is not None:
        raise ValueError("pass endpoint and headers, or an exporter, not both")
    environ = os.environ
    interval = seconds_from(interval_s, environ, "OTEL_METRIC_EXPORT_INTERVAL",
                            DEFAULT_INTERVAL_MS)
    timeout = seconds_from(timeout_s, environ, "OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_TIMEOUT_MS)
    return OtlpMetricsExporter(registry, exporter, interval_s=interval, timeout_s=timeout,
                               delta=delta_from(temporality, environ),
                               resource=resource or Resource.create(),
                               shutdown_timeout_s=shutdown_timeout_s)


class OtlpMetricsExporter:
    """A running push (see `start_otlp_metrics_exporter`). `force_flush()` pushes now;
    `shutdown()` pushes once more and stops, both within their timeouts. `counts`: this
    exporter's pushes by outcome (the registry's series sum every exporter on it)."""

    def __init__(self, registry: CollectorRegistry, exporter: MetricExporter, *,
                 interval_s: float, timeout_s: float, delta: bool, resource: Resource,
                 shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
        if not isinstance(registry, CollectorRegistry):
            raise TypeError("the OTLP metrics push reads a prometheus_client CollectorRegistry")
        for name, value in (("interval", interval_s), ("timeout", timeout_s),
                            ("shutdown_timeout_s", shutdown_timeout_s)):
            if not value > 0:
                raise ValueError(f"the OTLP metrics push's {name} must be > 0, got {value!r}")
        self.registry = registry
        self.exporter = exporter
        self.interval_s, self.timeout_s = float(interval_s), float(timeout_s)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self.delta = delta
        self.endpoint: str | None = getattr(exporter, "_endpoint", None)
        self._resource = resource
        self._scope = InstrumentationScope("spec_metrics", __version__)
        self._totals = totals_for(registry)
        self.counts = dict.fromkeys(("exported", *OTLP_EXPORT_FAILURE_REASONS), 0)
        self._counts_lock = threading.Lock()
        self._baseline: Reading | None = None  # delta: the last push that may have arrived
        self._baseline_ns = 0
        self._attempt = threading.Lock()  # one push at a time (the thread, force_flush)
        self._caller: ExportCaller[MetricsData, MetricExportResult] = ExportCaller(
            lambda data, timeout: exporter.export(data, timeout_millis=timeout * 1e3),
            MetricExportResult.FAILURE, "spec-metrics-otlp-metric-export",
            lambda data: "one push lost")
        self._last_log: dict[str, tuple[float, int]] = {}
        self._stop = threading.Event()
        self._shut_down = False
        self._thread = threading.Thread(target=self._run, name="spec-metrics-otlp-metrics",
                                        daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)
        reset_after_fork(self)

    def force_flush(self, timeout_millis: float | None = None) -> bool:
        """Push now; True if the collector accepted it within the timeout (default: the
        export timeout). Blocks the caller: not for the engine thread."""
        if self._shut_down:
            return False
        return self._push(self.timeout_s if timeout_millis is None else timeout_millis / 1e3)

    def shutdown(self, timeout_millis: float | None = None) -> None:
        """Stop the interval, push a last time and shut the exporter down, within
        `timeout_millis` (default: shutdown_timeout_s); a push still hanging then is
        left to its daemon thread and counted as timed out."""
        if self._shut_down:
            return
        self._shut_down = True
        timeout = self.shutdown_timeout_s if timeout_millis is None else timeout_millis / 1e3
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._push(max(deadline - time.monotonic(), 0.0))
        self._caller.stop()
        try:
            self.exporter.shutdown(timeout_millis=max(deadline - time.monotonic(), 0.0) * 1e3)
        except Exception:  # already shut down, or failing: we are leaving anyway
            pass
        atexit.unregister(self._at_exit)

    def close(self) -> None:
        self.shutdown()

    # ---- the push thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._push(self.timeout_s)
            except Exception:  # never let the thread die: the next interval tries again
                logger.exception("spec_metrics: the OTLP metrics push failed (please report)")

    def _at_exit(self) -> None:
        try:
            self.shutdown()
        except Exception:
            logger.exception("spec_metrics: the OTLP metrics push's shutdown at exit failed")

    def _push(self, timeout: float) -> bool:
        """One push: read, build, export; its outcome counted exactly once."""
        deadline = time.monotonic() + timeout
        if not self._attempt.acquire(timeout=timeout):
            return self._outcome("export_timeout", "the previous push is still running")
        try:
            if not self._caller.wait_idle(max(deadline - time.monotonic(), 0.0)):
                return self._outcome("export_timeout", "the previous push still hangs")
            try:
                now_ns = time.time_ns()
                reading = read(self._sources(), now_ns)
                data = metrics_data(reading, now_ns, self._resource, self._scope, self.delta,
                                    self._baseline, self._baseline_ns)
            except Exception:  # a bug of ours: the push fails, the engine goes on
                logger.exception("spec_metrics: building the OTLP metrics push failed "
                                 "(please report)")
                return self._outcome("export_failed", "could not build the push")
            result = self._caller.call(data, max(deadline - time.monotonic(), 0.0))
            if result is not MetricExportResult.FAILURE:
                # Accepted, or timed out (it may still arrive): the next delta starts here.
                self._baseline, self._baseline_ns = reading, now_ns
            if result is MetricExportResult.SUCCESS:
                return self._outcome(None, "")
            if result is None:
                return self._outcome("export_timeout",
                                     f"no answer within {self.timeout_s:g} s")
            return self._outcome("export_failed", "the exporter returned failure")
        finally:
            self._attempt.release()

    def _sources(self) -> Iterator[tuple[Collector, int]]:
        """The registry's spec_metrics collectors, in registry order, with start times."""
        with self.registry._lock:
            collectors = list(self.registry._collector_to_names)
        for collector in collectors:
            if isinstance(collector, (SpecDecodeCollector, _RegistryTotals, PushTotals)):
                yield collector, collector.created_ns

    def _outcome(self, reason: str | None, why: str) -> bool:
        self._totals.add(reason)
        now = time.monotonic()
        with self._counts_lock:
            self.counts["exported" if reason is None else reason] += 1
            if reason is None:
                return True
            last, unlogged = self._last_log.get(reason, (now - _LOG_EVERY_S, 0))
            log = now - last >= _LOG_EVERY_S
            self._last_log[reason] = (now, 0) if log else (last, unlogged + 1)
        if log:
            logger.warning("spec_metrics: OTLP metrics push to %s lost (%s: %s; %d more "
                           "since the last message); counted in %s{reason=%r}",
                           self.endpoint or "the exporter", reason, why, unlogged,
                           OTLP_METRIC_EXPORTS_FAILED.name, reason)
        return False

    def _reset_after_fork(self) -> None:
        # The parent's thread is not here, and the child's counts start from zero: a child
        # starts its own exporter if it should push.
        self._shut_down = True
        self._stop = threading.Event()
        self._attempt = threading.Lock()
        self._counts_lock = threading.Lock()
        self.counts = dict.fromkeys(self.counts, 0)
