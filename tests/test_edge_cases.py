"""Edge cases found in review: sampler interplay, span-rate cap, option semantics, shared
collectors, reused lists, dtypes, accepted length over drafts only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, TraceIdRatioBased

import spec_metrics
from spec_metrics._support.config import HooksConfig

from .conftest import run_step, sample_value, scrape

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00"


class StepSpansOnly(Sampler):
    """A per-span sampler (as some users run): keeps only the step spans."""

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None):
        keep = name == "spec_decode.step"
        return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP)

    def get_description(self):
        return "StepSpansOnly"


def test_exemplars_never_point_at_spans_the_sampler_dropped(registry, exporter, clock, caplog):
    provider = TracerProvider(sampler=StepSpansOnly())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with caplog.at_level(logging.WARNING, logger="spec_metrics"):
        hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry,
                                             tracer_provider=provider, trace_ratio=1.0,
                                             max_draft_tokens=4)
    assert any("StepSpansOnly" in r.getMessage() for r in caplog.records)  # warned once
    for _ in range(3):
        run_step(hooks, clock, [1, 2], 4)
    exported = {format(s.context.span_id, "016x") for s in exporter.get_finished_spans()}
    assert {s.name for s in exporter.get_finished_spans()} == {"spec_decode.step"}
    seen = [s.exemplar for f in scrape(registry).values() for s in f.samples if s.exemplar]
    assert seen and all(e.labels["span_id"] in exported for e in seen)


def test_root_dropping_sampler_is_warned_about(registry, caplog):
    provider = TracerProvider(sampler=TraceIdRatioBased(0.5))
    with caplog.at_level(logging.WARNING, logger="spec_metrics"):
        spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider)
    assert any("TraceIdRatioBased" in r.getMessage() for r in caplog.records)


def test_default_sampler_is_not_warned_about(registry, provider, caplog):
    with caplog.at_level(logging.WARNING, logger="spec_metrics"):
        spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider)
    assert not caplog.records


def test_explicit_none_turns_a_check_off():
    env = {"SPEC_METRICS_SLOW_STEP_SECONDS": "0.5"}
    assert HooksConfig.resolve(env).slow_step_seconds == 0.5
    assert HooksConfig.resolve(env, slow_step_seconds=None).slow_step_seconds is None
    assert HooksConfig.resolve({}, outlier_quantile=None).outlier_quantile is None
    assert HooksConfig.resolve({}, labels=None).labels == {}


def test_quantile_off_means_no_outlier_traces_even_after_warm_up(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=None, outlier_min_samples=10)
    for index in range(300):
        run_step(hooks, clock, [1], 2, durations=(0.001, 0.01 * (1 + index % 7), 0.001))
    assert exporter.get_finished_spans() == ()


def test_reused_traceparent_list_is_read_as_it_was_at_begin_step(make_hooks, exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=None)
    contexts, ids = [SAMPLED, None], ["a", "b"]
    hooks.begin_step(request_ids=ids, traceparents=contexts)
    contexts[0], ids[0] = UNSAMPLED, "z"  # the engine reuses its lists in place
    hooks.verify_start()
    hooks.verify_end([1, 1], 2)
    hooks.end_step()
    (step,) = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert step.attributes["spec_decode.sample_reason"] == "request"
    assert [format(link.context.trace_id, "032x") for link in step.links] == [SAMPLED[3:35]]
    assert list(step.attributes["spec_decode.request_ids"]) == ["a", "b"]


def test_shared_collector_refuses_settings_it_would_ignore(registry, provider):
    first = spec_metrics.SpecDecodeHooks("eagle", registry=registry, labels={"model": "A"},
                                         tracer_provider=provider)
    with pytest.raises(ValueError, match="labels="):
        spec_metrics.SpecDecodeHooks("ngram", collector=first.collector, labels={"model": "B"})
    with pytest.raises(ValueError, match="stage_buckets="):
        spec_metrics.SpecDecodeHooks("ngram", collector=first.collector, stage_buckets=(1.0,))
    shared = spec_metrics.SpecDecodeHooks("ngram", collector=first.collector)  # inherits
    assert shared.collector.const_labels == {"model": "A"}
    with pytest.raises(ValueError, match="collector=first.collector"):
        spec_metrics.SpecDecodeHooks("ngram", registry=registry)


def test_accepted_length_counts_drafts_only(make_hooks, registry, clock):
    hooks = make_hooks("ngram")
    run_step(hooks, clock, np.array([0, 2, 0, 1]), np.array([0, 3, 4, 1]))
    run_step(hooks, clock, [0, 0], 0)  # nothing drafted at all
    families = scrape(registry)
    m = {"method": "ngram"}
    drafts = sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total", **m)
    count = sample_value(families, "spec_decode_accepted_length",
                         "spec_decode_accepted_length_count", **m)
    assert drafts == count == 3
    assert sample_value(families, "spec_decode_accepted_length",
                        "spec_decode_accepted_length_bucket", le="0.0", **m) == 1
    assert sample_value(families, "spec_decode_accepted_length",
                        "spec_decode_accepted_length_sum", **m) == 3
    assert sample_value(families, "spec_decode_emitted_tokens",
                        "spec_decode_emitted_tokens_total", **m) == 3 + 4 + 2


def test_begin_step_while_a_stage_is_open(make_hooks, registry):
    hooks = make_hooks()
    hooks.draft_start()
    hooks.begin_step()
    hooks.draft_end()  # the draft of the previous step was dropped: this end has no start
    counts = hooks.collector.drops.counts
    assert (counts["stage_not_ended"], counts["out_of_order"], counts["end_without_start"]) == (
        1, 1, 1)


def test_tensor_dtypes_numpy_cannot_hold_are_wrong_type(make_hooks, registry):
    torch = pytest.importorskip("torch")
    hooks = make_hooks()
    for dtype in (torch.bfloat16, torch.bool, torch.complex64):
        run_step(hooks, None, torch.ones(2, dtype=dtype), 2)
    counts = hooks.collector.drops.counts
    assert counts["wrong_type"] == 3 and counts["internal_error"] == 0
