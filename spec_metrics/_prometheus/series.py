"""What a collector aggregates for one `method`, and the copy a scrape renders from.

Latency histograms keep plain Python ints (fastest for one value per step); the accepted and
draft-length histograms are numpy arrays (one vectorized add per verify pass), per request
group with a group label (groups.py). Every bucket and counter has an exemplar slot
(exemplars.py).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import NamedTuple

import numpy as np
from prometheus_client.samples import Exemplar

from spec_metrics._prometheus.exemplars import ExemplarSlots
from spec_metrics._prometheus.groups import GroupedSeries
from spec_metrics.catalog import COUNTERS_WITH_EXEMPLARS, STAGES, MetricSpec

__all__ = ["AcceptRow", "MethodSeries", "MethodSnapshot", "Snapshot", "peek_all"]


class AcceptRow(NamedTuple):
    """The acceptance series of one method, or of one (method, group) with a group label."""

    group: str | None  # None: the collector has no group label
    accepted_hist: np.ndarray
    draft_hist: np.ndarray
    length_exemplars: list[Exemplar | None]
    counter_exemplars: list[Exemplar | None]  # COUNTERS_WITH_EXEMPLARS' order
    # ((drafts, draft_tokens, accepted, emitted), draft tokens per position, accepted per
    # position)
    totals: tuple


class MethodSnapshot(NamedTuple):
    method: str
    latency: list[tuple]  # (counts, sum, exemplars) per stage, then of the step
    rows: list[AcceptRow]  # one without a group label, else one per group recorded
    plain_steps: int  # verify passes without any draft token
    plain_seconds: float  # their time, draft and draft_extend stages excluded
    plain_tokens: int  # their requests verified: one token each


class Snapshot(NamedTuple):
    series: list[MethodSnapshot]
    # catalog.REASON_COUNTERS' values: dropped input, steps selected for tracing and not
    # traced, traced steps whose exemplars were withheld; each by reason.
    reasons: dict[MetricSpec, dict[str, int]]
    # (label, count) of spec_metrics_label_values_folded_total: ("method", steps), then
    # (the group label, requests) when there is one
    folded: tuple[tuple[str, int], ...]
    # (method, target, drafter, num_speculative_tokens) as last declared per method
    drafters: tuple[tuple[str, str, str, str], ...] = ()


class LatencyHistogram:
    """Bucket counts of one latency series, as plain Python ints (fastest for one value)."""

    __slots__ = ("bounds", "bounds_array", "counts", "sum", "exemplars")

    def __init__(self, bounds: tuple[float, ...], hold: float) -> None:
        self.bounds = bounds
        self.bounds_array = np.array(bounds)
        self.counts = [0] * (len(bounds) + 1)  # last slot: above the highest bound (+Inf)
        self.sum = 0.0
        self.exemplars = ExemplarSlots(len(bounds) + 1, hold)

    def observe(self, value: float) -> int:
        index = bisect_left(self.bounds, value)  # first bound >= value: the "le" bucket
        self.counts[index] += 1
        self.sum += value
        return index

    def observe_many(self, values: np.ndarray) -> None:
        """`observe` of each value, in order (the sum is added value by value, so it is
        the same float as N calls would make)."""
        bins = np.bincount(np.searchsorted(self.bounds_array, values, side="left"),
                           minlength=len(self.counts))
        counts = self.counts
        for index in np.flatnonzero(bins).tolist():
            counts[index] += int(bins[index])
        total = self.sum
        for value in values.tolist():
            total += value
        self.sum = total


class MethodSeries:
    """Everything aggregated for one method. With a group label, the acceptance
    histograms and their exemplars are kept per group in `grouped` instead."""

    __slots__ = ("stages", "step", "accepted_hist", "draft_hist", "accepted_exemplars",
                 "counter_exemplars", "steps_without_drafts", "plain_seconds", "plain_tokens",
                 "grouped")

    def __init__(self, stage_bounds: tuple[float, ...], step_bounds: tuple[float, ...],
                 max_k: int, hold: float, max_groups: int | None = None) -> None:
        self.stages = [LatencyHistogram(stage_bounds, hold) for _ in STAGES]
        self.step = LatencyHistogram(step_bounds, hold)
        self.accepted_hist = np.zeros(max_k + 1, dtype=np.int64)
        self.draft_hist = np.zeros(max_k + 1, dtype=np.int64)
        self.accepted_exemplars = ExemplarSlots(max_k + 2, hold)
        self.counter_exemplars = ExemplarSlots(len(COUNTERS_WITH_EXEMPLARS), hold)
        self.steps_without_drafts = 0  # verify passes in which no request had drafts
        # The timed ones among them: their seconds without draft and draft_extend (what a
        # plain decode step costs here), and their tokens (one per request).
        self.plain_seconds = 0.0
        self.plain_tokens = 0
        self.grouped = (GroupedSeries(max_groups, max_k, hold) if max_groups is not None
                        else None)


def peek_all(slots: ExemplarSlots, shown: list) -> list[Exemplar | None]:
    exemplars = [slots.peek(i) for i in range(len(slots))]
    shown.extend((slots, i, e) for i, e in enumerate(exemplars) if e is not None)
    return exemplars
