"""Trace-context parsing and the running quantile."""

from __future__ import annotations

import math

import numpy as np

from spec_metrics._tracing.outliers import RunningQuantile
from spec_metrics._tracing.traceparent import any_sampled, parse_traceparent

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def test_parse_valid_and_invalid():
    context = parse_traceparent(SAMPLED)
    assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert context.span_id == 0xB7AD6B7169203331
    assert context.trace_flags.sampled and context.is_remote
    assert not parse_traceparent(UNSAMPLED).trace_flags.sampled
    for bad in ["", "00-" + "0" * 32 + "-b7ad6b7169203331-01",  # all-zero trace id
                SAMPLED.replace("b7ad", "zzzz"), "ff" + SAMPLED[2:], SAMPLED + "-extra",
                SAMPLED[:-1], None, 42]:
        assert parse_traceparent(bad) is None, bad


def test_any_sampled_fast_and_slow_paths_agree():
    assert any_sampled([UNSAMPLED] * 200 + [SAMPLED])
    assert not any_sampled([UNSAMPLED] * 200)
    assert any_sampled([None, SAMPLED, None])
    assert not any_sampled([None, None])
    odd = UNSAMPLED[:-2] + "03"  # another flag bit set along with sampled
    assert any_sampled([UNSAMPLED, odd])
    # malformed entries push the check to the slow path, which still finds the sampled one
    assert any_sampled(["garbage", SAMPLED, 17])
    assert not any_sampled(["garbage", UNSAMPLED])


def test_running_quantile_waits_then_flags_spikes():
    estimate = RunningQuantile(0.99, min_samples=100, refresh=50)
    assert not any(estimate.observe(0.010) for _ in range(99))
    assert estimate.threshold == math.inf
    assert not estimate.observe(0.010)
    assert 0.010 <= estimate.threshold < 0.0106  # upper edge of the 5%-wide bucket of 10 ms
    assert estimate.observe(0.05)
    assert not estimate.observe(0.0101)


def test_running_quantile_follows_a_shift():
    estimate = RunningQuantile(0.99, min_samples=100, refresh=100)
    for _ in range(500):
        estimate.observe(0.010)
    for _ in range(3000):
        estimate.observe(0.030)  # the workload got slower for good
    assert not estimate.observe(0.030)
    assert 0.030 <= estimate.threshold < 0.0316


def test_running_quantile_in_batches_equals_one_by_one():
    """The worker feeds runs of steps at once: the same answers, thresholds and counts as
    one value at a time, across min_samples and refresh boundaries and a shift."""
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.lognormal(-5, 0.3, 1500), rng.lognormal(-3, 0.5, 1500)])
    values[rng.integers(0, values.size, 12)] = 0.5  # spikes
    single = RunningQuantile(0.99, min_samples=200, refresh=256)
    batched = RunningQuantile(0.99, min_samples=200, refresh=256)
    start, thresholds = 0, set()
    while start < values.size:
        stop = min(values.size, start + int(rng.integers(1, 300)))
        one = [single.observe(float(v)) for v in values[start:stop]]
        assert batched.observe_many(values[start:stop]).tolist() == one
        assert batched.threshold == single.threshold
        thresholds.add(single.threshold)
        start = stop
    assert np.array_equal(batched._history, single._history)
    assert batched._fresh == single._fresh
    assert len(thresholds) > 3 and math.inf in thresholds  # it waited, then moved
