"""Exact metric values for known steps, read back through prometheus_client's parser."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import run_step, sample_value, scrape


def test_counters_and_accepted_length_exact(make_hooks, registry, clock):
    hooks = make_hooks(labels={"model": "tiny", "engine": "test"})
    run_step(hooks, clock, np.array([0, 1, 4, 2]), 4)
    run_step(hooks, clock, [3, 3, 0], 4)
    families = scrape(registry)
    labels = {"method": "eagle", "model": "tiny", "engine": "test"}
    # 7 requests, each had 4 draft tokens.
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total", **labels) == 7
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total", **labels) == 28
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", **labels) == 13
    assert sample_value(families, "spec_decode_emitted_tokens",
                        "spec_decode_emitted_tokens_total", **labels) == 13 + 7
    # accepted > p for p = 0..3: [1,4,2,3,3] -> 5; [4,2,3,3] -> 4 (>=2); [4,3,3] -> 3; [4] -> 1
    expected_accepted = [5, 4, 3, 1]
    for position, value in enumerate(expected_accepted):
        assert sample_value(
            families, "spec_decode_accepted_tokens_per_position",
            "spec_decode_accepted_tokens_per_position_total", position=str(position), **labels,
        ) == value
        assert sample_value(
            families, "spec_decode_draft_tokens_per_position",
            "spec_decode_draft_tokens_per_position_total", position=str(position), **labels,
        ) == 7
    # accepted-length histogram, cumulative le buckets 0..4 and +Inf
    cumulative = {"0.0": 2, "1.0": 3, "2.0": 4, "3.0": 6, "4.0": 7, "+Inf": 7}
    for le, value in cumulative.items():
        assert sample_value(families, "spec_decode_accepted_length",
                            "spec_decode_accepted_length_bucket", le=le, **labels) == value
    assert sample_value(families, "spec_decode_accepted_length",
                        "spec_decode_accepted_length_count", **labels) == 7
    assert sample_value(families, "spec_decode_accepted_length",
                        "spec_decode_accepted_length_sum", **labels) == 13


def test_per_request_draft_tokens(make_hooks, registry, clock):
    # An n-gram drafter finds no match for some requests: they get 0 draft tokens.
    hooks = make_hooks("ngram")
    run_step(hooks, clock, np.array([0, 2, 0, 1]), np.array([0, 3, 4, 1]))
    families = scrape(registry)
    m = {"method": "ngram"}
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total", **m) == 3
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total", **m) == 8
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", **m) == 3
    assert sample_value(families, "spec_decode_emitted_tokens",
                        "spec_decode_emitted_tokens_total", **m) == 3 + 4
    drafted = [3, 2, 2, 1]  # requests with > p draft tokens
    accepted = [2, 1, 0, 0]
    for p in range(4):
        assert sample_value(families, "spec_decode_draft_tokens_per_position",
                            "spec_decode_draft_tokens_per_position_total",
                            position=str(p), **m) == drafted[p]
        assert sample_value(families, "spec_decode_accepted_tokens_per_position",
                            "spec_decode_accepted_tokens_per_position_total",
                            position=str(p), **m) == accepted[p]


def test_stage_and_step_durations_land_in_exact_buckets(make_hooks, registry, clock):
    hooks = make_hooks()
    # draft 2 ms, verify 10 ms, draft_extend 1 ms, with 0.5 ms gaps: step = 14 ms.
    run_step(hooks, clock, [1], 4, durations=(0.002, 0.010, 0.001), gap=0.0005)
    run_step(hooks, clock, [1], 4, durations=(0.004, 0.060, 0.0001), gap=0.0)
    families = scrape(registry)
    stage = "spec_decode_stage_duration_seconds"
    for name, le, value in [
        ("draft", "0.001", 0), ("draft", "0.0025", 1), ("draft", "0.005", 2),
        ("verify", "0.0075", 0), ("verify", "0.01", 1), ("verify", "0.05", 1),
        ("verify", "0.075", 2), ("draft_extend", "0.0001", 1), ("draft_extend", "0.001", 2),
    ]:
        assert sample_value(families, stage, stage + "_bucket", stage=name, le=le) == value
    assert sample_value(families, stage, stage + "_sum", stage="verify") == pytest.approx(0.070)
    assert sample_value(families, stage, stage + "_count", stage="draft") == 2
    step = "spec_decode_step_duration_seconds"
    assert sample_value(families, step, step + "_bucket", le="0.01") == 0
    assert sample_value(families, step, step + "_bucket", le="0.015") == 1
    assert sample_value(families, step, step + "_bucket", le="0.075") == 2
    assert sample_value(families, step, step + "_sum") == pytest.approx(0.014 + 0.0641)


def test_value_equal_to_bound_counts_in_that_bucket(make_hooks, registry, clock):
    hooks = make_hooks()
    run_step(hooks, clock, [0], 1, durations=(0.005, 0.01, 0.001))
    families = scrape(registry)
    stage = "spec_decode_stage_duration_seconds"
    assert sample_value(families, stage, stage + "_bucket", stage="draft", le="0.0025") == 0
    assert sample_value(families, stage, stage + "_bucket", stage="draft", le="0.005") == 1


def test_methods_are_separate_series_and_stages_may_be_skipped(make_hooks, registry, clock):
    hooks = make_hooks("eagle")
    run_step(hooks, clock, [2, 2], 2)
    # An n-gram step in the same engine: verify only, method given per step.
    hooks.begin_step(method="ngram", batch_size=3)
    hooks.verify_start()
    clock.advance(0.02)
    hooks.verify_end([1, 0, 1], 1)
    hooks.end_step()
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 4
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="ngram") == 2
    stage = "spec_decode_stage_duration_seconds"
    assert sample_value(families, stage, stage + "_count", method="ngram", stage="draft") == 0
    assert sample_value(families, stage, stage + "_count", method="ngram", stage="verify") == 1
    step = "spec_decode_step_duration_seconds"
    assert sample_value(families, step, step + "_sum", method="ngram") == pytest.approx(0.02)


def test_context_manager_form_records_the_same(make_hooks, registry, clock):
    hooks = make_hooks()
    with hooks.step(request_ids=["a", "b"]):
        with hooks.draft():
            clock.advance(0.003)
        with hooks.verify() as verify:
            clock.advance(0.02)
            verify.set_accepted(np.array([1, 2]), 2)
        with hooks.draft_extend():
            clock.advance(0.001)
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 3
    step = "spec_decode_step_duration_seconds"
    assert sample_value(families, step, step + "_sum") == pytest.approx(0.024)


def test_exception_inside_a_stage_drops_that_stage_quietly(make_hooks, registry, clock):
    hooks = make_hooks()
    with pytest.raises(RuntimeError):
        with hooks.step():
            with hooks.draft():
                clock.advance(0.003)
            with hooks.verify():
                raise RuntimeError("engine failure")
    families = scrape(registry)
    stage = "spec_decode_stage_duration_seconds"
    assert sample_value(families, stage, stage + "_count", stage="draft") == 1
    assert sample_value(families, stage, stage + "_count", stage="verify") == 0
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0


def test_torch_cpu_tensor_counts(make_hooks, registry, clock):
    torch = pytest.importorskip("torch")
    hooks = make_hooks()
    run_step(hooks, clock, torch.tensor([4, 0, 3], dtype=torch.int32), torch.tensor([4, 4, 3]))
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 7
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total") == 11


def test_float_counts_that_are_whole_numbers_are_accepted(make_hooks, registry, clock):
    hooks = make_hooks()
    run_step(hooks, clock, np.array([1.0, 2.0]), 2)
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 3


def test_shared_collector_sums_two_hooks(registry, provider, clock):
    import spec_metrics

    first = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         max_draft_tokens=4)
    second = spec_metrics.SpecDecodeHooks("eagle", collector=first.collector,
                                          tracer_provider=provider, max_draft_tokens=4)
    run_step(first, clock, [1, 1], 2)
    run_step(second, clock, [2], 2)
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 4
    with pytest.raises(ValueError, match="max_draft_tokens"):
        spec_metrics.SpecDecodeHooks("eagle", collector=first.collector, max_draft_tokens=8)
