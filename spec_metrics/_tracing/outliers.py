"""A cheap running high-quantile estimate, to trace latency outliers whatever the ratio.

Values go into fine log-spaced buckets (each 5% wider than the last): one bisect and one
integer increment per value. Every `refresh` values the threshold is recomputed from the
counts and the counts are halved, so the estimate follows the recent distribution (about the
last few thousand values). The threshold is the upper edge of the quantile's bucket, so a
steady distribution never flags its own values. Between refreshes only integers are added
(exact in any order), so a batch of values gives the same estimate as the values one by one.
"""

from __future__ import annotations

import math
from bisect import bisect_left

import numpy as np

__all__ = ["RunningQuantile"]

_LOW, _HIGH, _GROWTH = 1e-6, 1e3, 1.05
_EDGES: list[float] = [
    _LOW * _GROWTH**i for i in range(int(math.log(_HIGH / _LOW) / math.log(_GROWTH)) + 2)
]
_EDGES_ARRAY = np.array(_EDGES)


class RunningQuantile:
    __slots__ = ("quantile", "min_samples", "refresh", "threshold", "_history", "_fresh",
                 "_total", "_since_refresh")

    def __init__(self, quantile: float, min_samples: int = 200, refresh: int = 256) -> None:
        self.quantile = quantile
        self.min_samples = min_samples
        self.refresh = refresh
        self.threshold = math.inf  # nothing is an outlier until min_samples values were seen
        # Counts up to the last refresh (floats: halving keeps thin tails), and the integer
        # counts of the values since, added to them at the next refresh.
        self._history = np.zeros(len(_EDGES) + 1)
        self._fresh = [0] * (len(_EDGES) + 1)
        self._total = 0
        self._since_refresh = 0

    def observe(self, value: float) -> bool:
        """Record `value` (seconds); return whether it lies above the current threshold."""
        self._fresh[bisect_left(_EDGES, value)] += 1
        self._total += 1
        self._since_refresh += 1
        if self._since_refresh >= self.refresh or self._total == self.min_samples:
            self._recompute()
        return value > self.threshold

    def observe_many(self, values: np.ndarray) -> np.ndarray:
        """`observe` of each value in turn, vectorized between threshold refreshes: the
        same counts, refreshes and answers (an array of bools)."""
        n = values.shape[0]
        out = np.zeros(n, dtype=bool)
        start = 0
        while start < n:
            # Values up to and including the next one that triggers a refresh.
            until = self.refresh - self._since_refresh
            if self._total < self.min_samples:
                until = min(until, self.min_samples - self._total)
            stop = min(n, start + max(1, until))
            segment = values[start:stop]
            bins = np.bincount(np.searchsorted(_EDGES_ARRAY, segment, side="left"),
                               minlength=len(self._fresh))
            fresh = self._fresh
            for index in np.flatnonzero(bins).tolist():
                fresh[index] += int(bins[index])
            self._total += stop - start
            self._since_refresh += stop - start
            if self._since_refresh >= self.refresh or self._total == self.min_samples:
                out[start:stop - 1] = segment[:-1] > self.threshold
                self._recompute()
                out[stop - 1] = segment[-1] > self.threshold
            else:
                out[start:stop] = segment > self.threshold
            start = stop
        return out

    def _recompute(self) -> None:
        self._since_refresh = 0
        counts = self._history + np.array(self._fresh, dtype=np.float64)
        self._fresh = [0] * len(self._fresh)
        if self._total < self.min_samples:
            self._history = counts
            return
        index = int(np.searchsorted(np.cumsum(counts), self.quantile * counts.sum(),
                                    side="left"))  # the first bucket at the quantile
        self.threshold = _EDGES[index] if index < len(_EDGES) else math.inf
        # Halve the history so the estimate follows the recent distribution.
        self._history = counts * 0.5
