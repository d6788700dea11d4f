"""What the OTLP metrics push did, on /metrics: pushes accepted, and lost by reason.

One collector per registry (like the span export's `_RegistryTotals`), summing every
`OtlpMetricsExporter` on it, registered by the first; its series are pushed too.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from spec_metrics._support.forking import reset_after_fork
from spec_metrics.catalog import (
    OTLP_EXPORT_FAILURE_REASONS,
    OTLP_METRIC_EXPORTS,
    OTLP_METRIC_EXPORTS_FAILED,
)

__all__ = ["PushTotals", "totals_for"]


class PushTotals(Collector):
    """The push counters of one registry: the sums over every exporter on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.created_ns = time.time_ns()
        self.counts = dict.fromkeys(("exported", *OTLP_EXPORT_FAILURE_REASONS), 0)
        reset_after_fork(self)

    def add(self, reason: str | None) -> None:
        with self._lock:
            self.counts["exported" if reason is None else reason] += 1

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = dict(self.counts)
        return self._families(counts)

    @staticmethod
    def _families(counts: dict[str, int] | None) -> Iterator[Metric]:
        exported = CounterMetricFamily(OTLP_METRIC_EXPORTS.name, OTLP_METRIC_EXPORTS.help)
        failed = CounterMetricFamily(OTLP_METRIC_EXPORTS_FAILED.name,
                                     OTLP_METRIC_EXPORTS_FAILED.help, labels=["reason"])
        if counts is not None:
            exported.add_metric([], float(counts["exported"]))
            for reason in OTLP_EXPORT_FAILURE_REASONS:
                failed.add_metric([reason], float(counts[reason]))
        yield exported
        yield failed

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self.created_ns = time.time_ns()
        self.counts = dict.fromkeys(self.counts, 0)


_TOTALS: "weakref.WeakKeyDictionary[CollectorRegistry, PushTotals]" = (
    weakref.WeakKeyDictionary())
_TOTALS_LOCK = threading.Lock()


def totals_for(registry: CollectorRegistry) -> PushTotals:
    with _TOTALS_LOCK:
        totals = _TOTALS.get(registry)
        if totals is None:
            totals = _TOTALS[registry] = PushTotals()
            registry.register(totals)
        return totals


