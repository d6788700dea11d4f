"""Span contract: names, parent/child, links, attributes, timestamps equal to the recorded ones."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import run_step

TP_SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP_UNSAMPLED = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00"


def _by_name(spans):
    return {span.name: span for span in spans}


def test_step_span_tree_attributes_and_times(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=1.0, labels={"model": "tiny"})
    t0 = clock.now
    run_step(hooks, clock, np.array([0, 2, 4]), 4, durations=(0.002, 0.010, 0.001), gap=0.0005,
             request_ids=["r1", "r2", "r3"], traceparents=[TP_SAMPLED, None, TP_UNSAMPLED])
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == sorted(
        ["spec_decode.step", "spec_decode.draft", "spec_decode.verify", "spec_decode.draft_extend"])
    named = _by_name(spans)
    step = named["spec_decode.step"]
    assert step.parent is None
    for name in ("spec_decode.draft", "spec_decode.verify", "spec_decode.draft_extend"):
        assert named[name].parent.span_id == step.context.span_id
        assert named[name].context.trace_id == step.context.trace_id
    offset = hooks._tracer._epoch_offset_ns
    ms = 1_000_000
    assert named["spec_decode.draft"].start_time == t0 + offset
    assert named["spec_decode.draft"].end_time == t0 + 2 * ms + offset
    assert named["spec_decode.verify"].start_time == t0 + 2 * ms + ms // 2 + offset
    assert named["spec_decode.verify"].end_time == t0 + 12 * ms + ms // 2 + offset
    assert named["spec_decode.draft_extend"].start_time == t0 + 13 * ms + offset
    assert named["spec_decode.draft_extend"].end_time == t0 + 14 * ms + offset
    assert step.start_time == t0 + offset and step.end_time == t0 + 14 * ms + offset
    attrs = dict(step.attributes)
    assert attrs["spec_decode.method"] == "eagle"
    assert attrs["spec_decode.batch_size"] == 3
    assert attrs["spec_decode.draft_tokens"] == 12
    assert attrs["spec_decode.accepted_tokens"] == 6
    assert attrs["spec_decode.emitted_tokens"] == 9
    assert attrs["spec_decode.acceptance_rate"] == pytest.approx(0.5)
    assert attrs["spec_decode.step"] == 0
    assert attrs["spec_decode.sample_reason"] == "request"
    assert list(attrs["spec_decode.request_ids"]) == ["r1", "r2", "r3"]
    verify = dict(named["spec_decode.verify"].attributes)
    assert list(verify["spec_decode.accepted_per_position"]) == [2, 2, 1, 1]
    assert list(verify["spec_decode.draft_tokens_per_position"]) == [3, 3, 3, 3]
    assert verify["spec_decode.accepted_tokens"] == 6
    # links: one per valid trace context, carrying the request id
    links = step.links
    assert [format(link.context.trace_id, "032x") for link in links] == [
        TP_SAMPLED[3:35], TP_UNSAMPLED[3:35]]
    assert [format(link.context.span_id, "016x") for link in links] == [
        TP_SAMPLED[36:52], TP_UNSAMPLED[36:52]]
    assert [dict(link.attributes)["spec_decode.request_id"] for link in links] == ["r1", "r3"]
    assert [link.context.trace_flags.sampled for link in links] == [True, False]


def test_ratio_zero_traces_nothing_ordinary(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=None)
    for _ in range(50):
        run_step(hooks, clock, [1, 1], 2, traceparents=[TP_UNSAMPLED, None])
    assert exporter.get_finished_spans() == ()


def test_sampled_request_context_forces_a_trace(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=None)
    run_step(hooks, clock, [1, 1], 2, traceparents=[TP_UNSAMPLED, None])
    run_step(hooks, clock, [1, 1], 2, traceparents=[None, TP_SAMPLED])
    steps = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert len(steps) == 1
    assert steps[0].attributes["spec_decode.step"] == 1


def test_slow_step_threshold_forces_a_trace(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=None, slow_step_seconds=0.05)
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.02, 0.001))
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.06, 0.001))
    steps = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert [s.attributes["spec_decode.step"] for s in steps] == [1]
    assert steps[0].attributes["spec_decode.sample_reason"] == "slow"


def test_slow_stage_threshold_per_stage(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=None,
                       slow_stage_seconds={"draft": 0.005})
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.5, 0.001))  # slow verify: no limit set
    run_step(hooks, clock, [1], 2, durations=(0.006, 0.01, 0.001))
    steps = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert [s.attributes["spec_decode.step"] for s in steps] == [1]


def test_running_quantile_catches_a_spike(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=0.99, outlier_min_samples=100)
    for _ in range(150):
        run_step(hooks, clock, [1], 2, durations=(0.002, 0.010, 0.001))
    assert exporter.get_finished_spans() == ()
    run_step(hooks, clock, [1], 2, durations=(0.002, 0.200, 0.001))  # a 20x verify spike
    steps = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert [s.attributes["spec_decode.step"] for s in steps] == [150]
    assert steps[0].attributes["spec_decode.sample_reason"] == "outlier"


def test_missing_stage_has_no_span(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=1.0)
    hooks.verify_start()
    clock.advance(0.01)
    hooks.verify_end([1], 1)
    hooks.end_step()
    assert sorted(s.name for s in exporter.get_finished_spans()) == [
        "spec_decode.step", "spec_decode.verify"]


def test_no_sdk_no_spans_no_exemplars(registry, clock):
    # With only the API's default (no-op) provider nothing is exported, and no exemplar may
    # point at a span that does not exist.
    from opentelemetry.trace import NoOpTracerProvider

    import spec_metrics

    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, trace_ratio=1.0,
                                         tracer_provider=NoOpTracerProvider())
    run_step(hooks, clock, [1], 2)
    from prometheus_client.openmetrics.exposition import generate_latest

    assert b"trace_id" not in generate_latest(registry)


def test_on_step_listener_sees_each_step_and_its_trace(registry, provider, exporter, clock):
    import spec_metrics

    results = []
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         trace_ratio=0.0, outlier_quantile=None,
                                         slow_step_seconds=0.05, max_draft_tokens=4,
                                         on_step=results.append)
    run_step(hooks, clock, [1, 2], 4, durations=(0.002, 0.010, 0.001))
    run_step(hooks, clock, [0, 4], 4, durations=(0.002, 0.090, 0.001))
    assert [r.index for r in results] == [0, 1]
    first, second = results
    assert first.trace_id is None and first.sample_reason is None
    assert (first.requests, first.draft_tokens, first.accepted_tokens) == (2, 8, 3)
    assert first.stage_seconds == pytest.approx([0.002, 0.010, 0.001])
    assert first.step_seconds == pytest.approx(0.013)
    step_span = next(s for s in exporter.get_finished_spans() if s.name == "spec_decode.step")
    assert second.trace_id == format(step_span.context.trace_id, "032x")
    assert second.sample_reason == "slow"
