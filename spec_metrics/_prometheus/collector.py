"""Aggregated metric state and the prometheus_client custom collector that exposes it.

The sinks hand each finished step to `_consume()`: a few list increments for the latency
histograms and one numpy add per histogram of the batch. `collect()` yields ordinary metric
families from a snapshot taken under a short lock (the Collector contract); spec_metrics'
own /metrics apps write the same snapshot with `_render_text`, the fast writer of
textformat.py (same bytes). Content negotiation stays prometheus_client's.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from spec_metrics._prometheus.exemplars import ShownExemplars
from spec_metrics._prometheus.groups import GroupTable
from spec_metrics._prometheus.series import (
    AcceptRow,
    MethodSeries,
    MethodSnapshot,
    Snapshot,
    peek_all,
)
from spec_metrics._prometheus.textformat import (
    SeriesText,
    family_header,
    label_text,
    render_snapshot,
)
from spec_metrics._support.config import check_group_label
from spec_metrics._support.drops import DropCounter, Tally
from spec_metrics._support.forking import reset_after_fork
from spec_metrics._support.log import logger
from spec_metrics._support.summary import AcceptSummary
from spec_metrics._tracing.step_exemplars import StepExemplars
from spec_metrics.catalog import (
    ACCEPTED_LENGTH,
    COUNTERS_WITH_EXEMPLARS,
    DEFAULT_MAX_DRAFT_TOKENS,
    DEFAULT_STAGE_BUCKETS,
    DEFAULT_STEP_BUCKETS,
    DRAFT_LENGTH,
    DRAFTER_INFO,
    DROPPED,
    EXEMPLARS_WITHHELD,
    LABEL_VALUES_FOLDED,
    METRICS,
    OTHER_LABEL_VALUE,
    PER_POSITION_COUNTERS,
    PLAIN_STEP_DURATION,
    PLAIN_STEP_TOKENS,
    REASON_COUNTERS,
    SKIP_REASONS,
    STAGE_DURATION,
    STAGES,
    STEP_DURATION,
    STEPS_WITHOUT_DRAFTS,
    TRACED_STEPS_SKIPPED,
    WITHHELD_REASONS,
    MetricSpec,
)

if TYPE_CHECKING:
    from spec_metrics._support.config import HooksConfig

__all__ = ["Snapshot", "SpecDecodeCollector"]

_DRAFT, _EXTEND = STAGES.index("draft"), STAGES.index("draft_extend")


class SpecDecodeCollector(Collector):
    """Holds the aggregated metrics of one engine; register it once in a registry.

    Several `SpecDecodeHooks` (one per engine loop, thread or method) may share one
    collector; its constant labels, bucket layouts and group label are fixed here. Its
    public surface is prometheus_client's Collector (`collect`, `describe`) and, read-only:
    `const_labels`, `max_draft_tokens`, `max_methods`, `group_label`, `max_groups`,
    `stage_buckets`, `step_buckets`, and the counters
    /metrics shows by reason: `drops` (rejected input), `skipped` (steps selected for
    tracing, not traced), `withheld` (traced steps whose exemplars were withheld), each
    with a `.counts` dict. Everything else is internal.
    """

    def __init__(
        self,
        labels: Mapping[str, str] | None = None,
        *,
        max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
        stage_buckets: Sequence[float] = DEFAULT_STAGE_BUCKETS,
        step_buckets: Sequence[float] = DEFAULT_STEP_BUCKETS,
        drops: DropCounter | None = None,
        exemplar_hold_seconds: float = 60.0,
        max_methods: int = 32,
        group_label: str | None = None,
        max_groups: int = 16,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.const_labels = dict(labels or {})
        check_group_label(group_label, max_groups, self.const_labels)
        # Wall clock when the counts started from zero: the start time of cumulative OTLP
        # points (_prometheus/otlp_data.py).
        self.created_ns = time.time_ns()
        self.max_draft_tokens = max_draft_tokens
        self.max_methods = max_methods
        self.folded = 0  # steps recorded under method="other" (cardinality cap)
        # With a group label: the acceptance families get it, one series per (method,
        # group); the table of group values kept is shared by every method.
        self.group_label = group_label
        self.max_groups = max_groups
        self._groups = GroupTable(max_groups) if group_label is not None else None
        self.stage_buckets = tuple(stage_buckets)
        self.step_buckets = tuple(step_buckets)
        self.drops = drops or DropCounter()
        # What the trace sinks decided not to do: selected steps not traced, exemplars of
        # steps whose spans were lost.
        self.skipped = Tally(SKIP_REASONS)
        self.withheld = Tally(WITHHELD_REASONS)
        self._series: dict[str, MethodSeries] = {}
        # method -> (target, drafter, num_speculative_tokens) as the engine declared them
        self._drafters: dict[str, tuple[str, str, str]] = {}
        self._drafter_prefixes: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()
        self._hold = exemplar_hold_seconds
        self._label_names = tuple(self.const_labels)
        self._label_values = tuple(self.const_labels.values())
        self._deferred: deque = deque()  # steps that found the lock held (see consume)
        # Queues of finished steps feeding this collector (hooks with a worker): a scrape
        # consumes them first, so it shows every step ended before it.
        self._feeders: "weakref.WeakSet[Any]" = weakref.WeakSet()
        # Text prefixes per method, family headers per format (True: OpenMetrics).
        self._texts: dict[str, SeriesText] = {}
        self._reason_prefixes: dict[tuple[MetricSpec, str], str] = {}
        self._folded_prefixes: dict[str, str] = {}
        self._headers = {om: {spec: family_header(self._family(spec), om) for spec in METRICS}
                         for om in (True, False)}
        if registry is not None:
            registry.register(self)
        reset_after_fork(self)

    def _reset_after_fork(self) -> None:
        """In a forked child: start from zero, with a new lock (a scrape thread of the
        parent may have held the old one; it does not exist here). Stays registered."""
        self._lock = threading.Lock()
        self.created_ns = time.time_ns()
        self._series = {}
        self._drafters = {}
        self.folded = 0
        if self._groups is not None:
            self._groups = GroupTable(self.max_groups)
        self._deferred = deque()  # the feeders stay: each resets its own queue
        self._texts = {}
        self._reason_prefixes = {}
        self.drops._reset_after_fork()
        self.skipped._reset_after_fork()
        self.withheld._reset_after_fork()

    def _check_shared(self, config: "HooksConfig", explicit: set[str]) -> None:
        """Another hooks object shares this collector: refuse settings it would ignore
        (labels and buckets are the collector's; `explicit` names the options passed)."""
        mismatches = []
        if "max_methods" in explicit and config.max_methods != self.max_methods:
            mismatches.append(f"max_methods={config.max_methods} "
                              f"(collector: {self.max_methods})")
        # The hooks check groups against their own group label: it must be the collector's.
        if config.group_label != self.group_label:
            mismatches.append(f"group_label={config.group_label!r} "
                              f"(collector: {self.group_label!r})")
        if "max_groups" in explicit and config.max_groups != self.max_groups:
            mismatches.append(f"max_groups={config.max_groups} "
                              f"(collector: {self.max_groups})")
        if self.max_draft_tokens != config.max_draft_tokens:
            mismatches.append(f"max_draft_tokens={config.max_draft_tokens} "
                              f"(collector: {self.max_draft_tokens})")
        if "labels" in explicit and dict(config.labels) != self.const_labels:
            mismatches.append(f"labels={dict(config.labels)} (collector: {self.const_labels})")
        for name in ("stage_buckets", "step_buckets"):
            if name in explicit and getattr(config, name) != getattr(self, name):
                mismatches.append(f"{name}={getattr(config, name)} "
                                  f"(collector: {getattr(self, name)})")
        if mismatches:
            raise ValueError("spec_metrics: a shared collector keeps its own settings; these "
                             "differ: " + "; ".join(mismatches) + ". Pass the same values, or "
                             "give this engine its own collector and registry.")

    def declare_drafter(self, method: str, target: str, drafter: str,
                        num_speculative_tokens: int) -> None:
        """Set `spec_decode_drafter_info` of `method` (replacing its previous declaration).
        Methods beyond `max_methods` share method="other", as their steps do."""
        with self._lock:
            if method not in self._drafters and len(self._drafters) >= self.max_methods:
                method = OTHER_LABEL_VALUE
            self._drafters[method] = (target, drafter, str(int(num_speculative_tokens)))

    def _feed(self, queue: Any) -> None:
        """Register a queue of finished steps (`PendingSteps`) consumed before each scrape."""
        self._feeders.add(queue)

    def _consume_feeders(self) -> None:
        for queue in list(self._feeders):
            try:
                queue.drain()
            except Exception:  # a scrape must answer whatever a sink does
                self.drops.count("internal_error")
                logger.exception("spec_metrics: consuming finished steps before a scrape "
                                 "failed (please report)")

    def _series_locked(self, method: str) -> MethodSeries:
        series = self._series.get(method)
        if series is None:
            if len(self._series) >= self.max_methods and method != OTHER_LABEL_VALUE:
                # Cardinality cap: one more method would be one more set of ~130 series.
                self.folded += 1
                return self._series_locked(OTHER_LABEL_VALUE)
            series = self._series[method] = MethodSeries(
                self.stage_buckets, self.step_buckets, self.max_draft_tokens, self._hold,
                self.max_groups if self._groups is not None else None)
        return series

    def _consume(
        self,
        method: str,
        stage_seconds: Sequence[float | None],
        step_seconds: float | None,
        summary: AcceptSummary | None,
        exemplars: StepExemplars | None,
    ) -> None:
        """Add one finished step. Called by the hooks, once per step; never waits.

        If a scrape (or another engine thread) holds the lock, the step is queued and the
        next holder applies it before anything else, so a scraper that the GIL pre-empted
        mid-snapshot cannot stall the engine, and no step is lost or reordered."""
        step = (method, stage_seconds, step_seconds, summary, exemplars)
        if not self._lock.acquire(blocking=False):
            self._deferred.append(step)  # deque.append is atomic
            return
        try:
            if self._deferred:
                self._apply_deferred()
            self._apply(*step)
        finally:
            self._lock.release()

    def _consume_many(self, method: str, stage_seconds: np.ndarray, recorded: np.ndarray,
                      step_seconds: np.ndarray, timed: np.ndarray,
                      accepted_hist: np.ndarray, draft_hist: np.ndarray) -> None:
        """Add consecutive untraced steps of one method at once (the worker's batches):
        stage and step seconds (N x stages and N, with what was recorded), and the sums of
        their accepted and draft-length histograms. Every one had draft tokens (no plain
        step) and no request groups (group "default" with a group label). Waits for the
        lock: it runs off the engine thread."""
        with self._lock:
            if self._deferred:
                self._apply_deferred()
            series = self._series.get(method) or self._series_locked(method)
            for index, histogram in enumerate(series.stages):
                histogram.observe_many(stage_seconds[recorded[:, index], index])
            series.step.observe_many(step_seconds[timed])
            grouped = series.grouped
            if grouped is None or self._groups is None:
                series.accepted_hist += accepted_hist
                series.draft_hist += draft_hist
            else:
                rows, accepted, draft = self._groups.rows(AcceptSummary(accepted_hist,
                                                                        draft_hist))
                grouped.add(rows, accepted, draft)

    def _apply_deferred(self) -> None:
        popleft = self._deferred.popleft
        while True:
            try:
                step = popleft()
            except IndexError:
                return
            self._apply(*step)

    def _apply(
        self,
        method: str,
        stage_seconds: Sequence[float | None],
        step_seconds: float | None,
        summary: AcceptSummary | None,
        exemplars: StepExemplars | None,
    ) -> None:
        # Caller holds self._lock.
        series = self._series.get(method) or self._series_locked(method)
        now = time.monotonic() if exemplars is not None else 0.0
        for stage_index, seconds in enumerate(stage_seconds):
            if seconds is None:
                continue
            histogram = series.stages[stage_index]
            bucket = histogram.observe(seconds)
            if exemplars is not None:
                span_id = exemplars.stage_span_ids[stage_index]
                if span_id is not None:
                    histogram.exemplars.offer(bucket, exemplars.exemplar(span_id, seconds),
                                              exemplars.priority, now, exemplars.ticket)
        if step_seconds is not None:
            bucket = series.step.observe(step_seconds)
            if exemplars is not None:
                series.step.exemplars.offer(
                    bucket, exemplars.exemplar(exemplars.step_span_id, step_seconds),
                    exemplars.priority, now, exemplars.ticket,
                )
        if summary is not None:
            grouped = series.grouped
            if grouped is None or self._groups is None:
                series.accepted_hist += summary.accepted_hist
                series.draft_hist += summary.draft_hist
                if exemplars is not None:
                    self._offer_accept_exemplars(series, summary, exemplars, now)
            else:
                rows, accepted, draft = self._groups.rows(summary)
                grouped.add(rows, accepted, draft)
                if exemplars is not None:
                    grouped.offer_exemplars(rows, accepted, draft, exemplars,
                                            _verify_span(exemplars), now)
            if not summary.draft_hist[1:].any():  # a plain decode step: the baseline
                series.steps_without_drafts += 1
                if step_seconds is not None:
                    plain = (step_seconds - (stage_seconds[_DRAFT] or 0.0)
                             - (stage_seconds[_EXTEND] or 0.0))
                    series.plain_seconds += plain if plain > 0.0 else 0.0
                    series.plain_tokens += summary.requests

    @staticmethod
    def _offer_accept_exemplars(series: MethodSeries, summary: AcceptSummary,
                                exemplars: StepExemplars, now: float) -> None:
        verify_span = _verify_span(exemplars)
        for length in np.flatnonzero(summary.accepted_hist).tolist():
            series.accepted_exemplars.offer(
                length, exemplars.exemplar(verify_span, float(length)), exemplars.priority, now,
                exemplars.ticket,
            )
        increments = (summary.drafts, summary.draft_tokens, summary.accepted, summary.emitted)
        for index, value in enumerate(increments):
            series.counter_exemplars.offer(
                index, exemplars.exemplar(verify_span, float(value)), exemplars.priority, now,
                exemplars.ticket,
            )

    # ---- exposition ------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        # Lets the registry detect name clashes at register() time without collecting.
        return [self._family(spec) for spec in METRICS]

    def _family(self, spec: MetricSpec) -> Metric:
        labels = [*spec.labels, *self._group_names(spec), *self._label_names]
        if spec.type == "histogram":
            return HistogramMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)
        if spec.type == "info":
            return InfoMetricFamily(spec.family, spec.help, labels=labels)
        return CounterMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)

    def _group_names(self, spec: MetricSpec) -> tuple[str, ...]:
        """The group label name, for the families that carry it when one is set."""
        return (self.group_label,) if spec.grouped and self.group_label is not None else ()

    def _snapshot(self, shown: list) -> Snapshot:
        """Copy everything a scrape renders, under the lock (deferred steps first); the
        exemplars read are appended to `shown` as (slots, index, exemplar)."""
        self._consume_feeders()
        with self._lock:
            if self._deferred:
                self._apply_deferred()
            raw = [
                (
                    method,
                    [(list(h.counts), h.sum, peek_all(h.exemplars, shown))
                     for h in (*series.stages, series.step)],
                    self._accept_rows(series, shown),
                    series.steps_without_drafts,
                    series.plain_seconds,
                    series.plain_tokens,
                )
                for method, series in self._series.items()
            ]
            reasons = {DROPPED: dict(self.drops.counts),
                       TRACED_STEPS_SKIPPED: dict(self.skipped.counts),
                       EXEMPLARS_WITHHELD: dict(self.withheld.counts)}
            folded: tuple[tuple[str, int], ...] = (("method", self.folded),)
            if self._groups is not None and self.group_label is not None:
                folded += ((self.group_label, self._groups.folded),)
            drafters = tuple((method, *info) for method, info in self._drafters.items())
        series_data = []
        for method, latency, rows, plain_steps, plain_seconds, plain_tokens in raw:
            accept_rows = []
            for group, accepted_hist, draft_hist, length_ex, counter_ex in rows:
                summary = AcceptSummary(accepted_hist, draft_hist)
                totals = ((summary.drafts, summary.draft_tokens, summary.accepted,
                           summary.emitted),
                          summary.per_position(draft_hist), summary.per_position(accepted_hist))
                accept_rows.append(AcceptRow(group, accepted_hist, draft_hist, length_ex,
                                             counter_ex, totals))
            series_data.append(MethodSnapshot(method, latency, accept_rows, plain_steps,
                                              plain_seconds, plain_tokens))
        return Snapshot(series_data, reasons, folded, drafters)

    def _accept_rows(self, series: MethodSeries, shown: list) -> list[tuple]:
        # Caller holds self._lock.
        if series.grouped is not None and self._groups is not None:
            return series.grouped.snapshot(self._groups, shown)
        return [(None, series.accepted_hist.copy(), series.draft_hist.copy(),
                 peek_all(series.accepted_exemplars, shown),
                 peek_all(series.counter_exemplars, shown))]

    def collect(self) -> Iterator[Metric]:
        """Metric families, as the Collector contract says. Read by prometheus_client's
        writers (or any code): nothing is marked shown; the hold time bounds how long these
        exemplars block lower-priority ones. spec_metrics' own /metrics apps write this
        collector with `_render_text` instead (same bytes, faster)."""
        # Histogram and counter families: their add_metric signatures differ.
        families: dict[MetricSpec, Any] = {spec: self._family(spec) for spec in METRICS}
        const = self._label_values
        snapshot = self._snapshot([])
        stage_les, step_les, length_les, positions = self._layout()
        no_exemplars: list[Exemplar | None] = [None] * (self.max_draft_tokens + 2)
        for data in snapshot.series:
            method = data.method
            for stage, (counts, total, ex) in zip(STAGES, data.latency[:-1]):
                families[STAGE_DURATION].add_metric([method, stage, *const],
                                                    _buckets(stage_les, counts, ex), total)
            counts, total, ex = data.latency[-1]
            families[STEP_DURATION].add_metric(
                [method, *const], _buckets(step_les, counts, ex), total)
            for row in data.rows:
                group = () if row.group is None else (row.group,)
                length_counts = [*row.accepted_hist.tolist(), 0]
                families[ACCEPTED_LENGTH].add_metric(
                    [method, *group, *const],
                    _buckets(length_les, length_counts, row.length_exemplars),
                    float(sum(i * n for i, n in enumerate(length_counts))))
                draft_counts = [*row.draft_hist.tolist(), 0]
                families[DRAFT_LENGTH].add_metric(
                    [method, *group, *const], _buckets(length_les, draft_counts, no_exemplars),
                    float(sum(i * n for i, n in enumerate(draft_counts))))
                for spec, value, exemplar in zip(COUNTERS_WITH_EXEMPLARS, row.totals[0],
                                                 row.counter_exemplars):
                    families[spec].add_metric([method, *group, *const], float(value),
                                              exemplar=exemplar)
                for spec, values in zip(PER_POSITION_COUNTERS, row.totals[1:]):
                    for position, value in zip(positions, values):
                        families[spec].add_metric([method, position, *group, *const],
                                                  float(value))
            families[STEPS_WITHOUT_DRAFTS].add_metric([method, *const],
                                                      float(data.plain_steps))
            families[PLAIN_STEP_DURATION].add_metric([method, *const], data.plain_seconds)
            families[PLAIN_STEP_TOKENS].add_metric([method, *const], float(data.plain_tokens))
        for drafter in snapshot.drafters:
            families[DRAFTER_INFO].add_metric([*drafter, *const], {})
        for label, value in snapshot.folded:
            families[LABEL_VALUES_FOLDED].add_metric([label, *const], float(value))
        for spec in REASON_COUNTERS:
            for reason, value in snapshot.reasons[spec].items():
                families[spec].add_metric([reason, *const], float(value))
        yield from families.values()

    def _render_text(self, openmetrics: bool) -> tuple[str, ShownExemplars]:
        """The fast writer: this collector's families as prometheus_client would write them
        (OpenMetrics 1.0 or classic text, legacy name escaping), from cached per-series
        prefixes, and the exemplars the text carries, to be marked shown once the response
        was sent. exposition.py calls it for the collectors in the registry it serves."""
        shown: list = []
        snapshot = self._snapshot(shown)
        texts = self._texts
        for data in snapshot.series:
            if data.method not in texts:
                texts[data.method] = SeriesText(data.method, self.const_labels, *self._layout(),
                                                group_label=self.group_label)
        prefixes = self._reason_prefixes
        for spec, counts in snapshot.reasons.items():
            for reason in counts:
                if (spec, reason) not in prefixes:
                    labels = label_text({"reason": reason, **self.const_labels})
                    prefixes[(spec, reason)] = f"{spec.name}{labels} "
        folded_prefixes = self._folded_prefixes
        for label, _ in snapshot.folded:
            if label not in folded_prefixes:
                labels = label_text({"label": label, **self.const_labels})
                folded_prefixes[label] = f"{LABEL_VALUES_FOLDED.name}{labels} "
        drafter_prefixes = self._drafter_prefixes
        for drafter in snapshot.drafters:
            if drafter not in drafter_prefixes:
                labels = label_text({**dict(zip(DRAFTER_INFO.labels, drafter)),
                                     **self.const_labels})
                drafter_prefixes[drafter] = f"{DRAFTER_INFO.name}{labels} "
        out: list[str] = []
        render_snapshot(snapshot, texts, self._headers[openmetrics], prefixes,
                        folded_prefixes, openmetrics, out,
                        [drafter_prefixes[d] for d in snapshot.drafters])
        return "".join(out), ShownExemplars(self._lock, shown if openmetrics else [])

    def _layout(self) -> tuple[list[str], list[str], list[str], list[str]]:
        stage_les = [floatToGoString(b) for b in self.stage_buckets] + ["+Inf"]
        step_les = [floatToGoString(b) for b in self.step_buckets] + ["+Inf"]
        k = self.max_draft_tokens
        length_les = [floatToGoString(float(i)) for i in range(k + 1)] + ["+Inf"]
        return stage_les, step_les, length_les, [str(p) for p in range(k)]


def _verify_span(exemplars: StepExemplars) -> str:
    """The span acceptance exemplars point at: verify's, else the step's."""
    return exemplars.stage_span_ids[STAGES.index("verify")] or exemplars.step_span_id


def _buckets(les: list[str], counts: list[int], exemplars: list[Exemplar | None]) -> list[tuple]:
    """prometheus_client's bucket tuples: (le, cumulative count[, exemplar])."""
    out: list[tuple] = []
    for le, cumulative, exemplar in zip(les, accumulate(counts), exemplars):
        if exemplar is None:
            out.append((le, float(cumulative)))
        else:
            out.append((le, float(cumulative), exemplar))
    return out
