"""Which steps are traced: a token bucket caps traced steps per second, ratio-sampled steps
give way to slow, outlier and request-sampled ones, and every step selected but not traced
is counted on /metrics by reason."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import spec_metrics
from spec_metrics._tracing.sink import TraceSink
from spec_metrics.catalog import SKIP_REASONS

from .conftest import run_step, sample_value, scrape

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The token bucket's clock, set by hand."""
    value = [500.0]
    monkeypatch.setattr(TraceSink, "monotonic", staticmethod(lambda: value[0]))
    return value


def _skipped(registry, reason: str) -> float:
    return sample_value(scrape(registry), "spec_metrics_traced_steps_skipped",
                        "spec_metrics_traced_steps_skipped_total", reason=reason)


def _step_spans(exporter) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]


def test_ratio_steps_leave_half_the_bucket_to_priority_steps(make_hooks, registry, exporter,
                                                             clock, now):
    hooks = make_hooks(trace_ratio=1.0, max_traced_steps_per_second=10, outlier_quantile=None)
    for _ in range(20):  # ratio-sampled: only tokens above the reserve of 5
        run_step(hooks, clock, [1], 2)
    assert len(_step_spans(exporter)) == 5
    assert _skipped(registry, "rate_limited") == 15
    for _ in range(8):  # request-sampled: may use the reserve
        run_step(hooks, clock, [1], 2, traceparents=[SAMPLED])
    reasons = [s.attributes["spec_decode.sample_reason"] for s in _step_spans(exporter)]
    assert reasons == ["ratio"] * 5 + ["request"] * 5
    assert _skipped(registry, "rate_limited") == 15 + 3
    now[0] += 0.3  # refills 3 tokens: below the reserve, ratio steps still give way
    for _ in range(4):
        run_step(hooks, clock, [1], 2)
    assert len(_step_spans(exporter)) == 10
    slow = make_hooks("slow", collector=hooks.collector, trace_ratio=1.0,
                      max_traced_steps_per_second=10, slow_step_seconds=0.5,
                      outlier_quantile=None)  # its own bucket, the same collector
    for _ in range(12):  # a burst of slow steps may use the whole bucket
        run_step(slow, clock, [1], 2, durations=(0.001, 0.6, 0.001))
    slow_spans = [s for s in _step_spans(exporter)
                  if s.attributes["spec_decode.sample_reason"] == "slow"]
    assert len(slow_spans) == 10
    assert _skipped(registry, "rate_limited") == 15 + 3 + 4 + 2


def test_ordinary_sampling_cannot_starve_a_spike(make_hooks, registry, exporter, clock, now):
    # A busy engine samples every ordinary step; a slow step arriving after a long run of
    # them still finds budget, because ordinary steps never dig into the reserve.
    hooks = make_hooks(trace_ratio=1.0, max_traced_steps_per_second=4,
                       slow_step_seconds=0.2, outlier_quantile=None)
    for _ in range(1000):
        run_step(hooks, clock, [1], 2)
        now[0] += 0.001
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.3, 0.001))
    assert _step_spans(exporter)[-1].attributes["spec_decode.sample_reason"] == "slow"
    traced = len(_step_spans(exporter))
    assert traced + _skipped(registry, "rate_limited") == 1001  # every step accounted for


def test_sampler_and_missing_sdk_are_counted(registry, exporter, clock, caplog):
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         trace_ratio=1.0, max_draft_tokens=4)
    for _ in range(3):
        run_step(hooks, clock, [1], 2)
    assert exporter.get_finished_spans() == ()
    assert _skipped(registry, "not_sampled") == 3
    hooks.close()
    from opentelemetry.trace import NoOpTracerProvider

    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry,
                                         tracer_provider=NoOpTracerProvider(), trace_ratio=1.0,
                                         max_draft_tokens=4)
    for _ in range(2):
        run_step(hooks, clock, [1], 2)
    assert _skipped(registry, "no_tracer") == 2
    assert {reason for reason in SKIP_REASONS} == {"rate_limited", "not_sampled", "no_tracer"}


def test_steps_without_a_timed_stage_are_not_candidates(make_hooks, registry, exporter, clock):
    hooks = make_hooks(trace_ratio=1.0)
    hooks.begin_step()
    hooks.end_step()  # nothing timed: nothing to trace, nothing skipped
    assert exporter.get_finished_spans() == ()
    families = scrape(registry)
    for reason in SKIP_REASONS:
        assert sample_value(families, "spec_metrics_traced_steps_skipped",
                            "spec_metrics_traced_steps_skipped_total", reason=reason) == 0
