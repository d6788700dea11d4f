"""The plain-step baseline: steps without any draft token (K = 0 for the whole batch) count
their time without the draft and draft_extend stages, and their tokens (one per request),
so that "is speculation paying off" can be measured against the engine's own plain steps."""

from __future__ import annotations

import numpy as np
from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics

import spec_metrics
from spec_metrics._prometheus.exposition import render
from spec_metrics._support.summary import AcceptSummary

from .conftest import run_step, sample_value, scrape

SECONDS = "spec_decode_plain_step_duration_seconds"
TOKENS = "spec_decode_plain_step_tokens"


def plain(registry, method="eagle"):
    families = scrape(registry)
    return (sample_value(families, SECONDS, SECONDS + "_total", method=method),
            sample_value(families, TOKENS, TOKENS + "_total", method=method))


def test_plain_steps_count_their_time_without_draft_stages_and_their_tokens(
        make_hooks, registry, clock) -> None:
    hooks = make_hooks(labels={"engine": "e"})
    assert scrape(registry)[SECONDS].samples == []  # no method, no series yet
    # Durations in powers of two: the sums below are exact in binary floating point.
    # draft 0.25 s, gap 0.0625, verify 0.5, gap 0.0625, draft_extend 0.125: step 1.0 s,
    # of which 1.0 - 0.25 - 0.125 = 0.625 s is not drafting.
    run_step(hooks, clock, [0, 0, 0], 0, durations=(0.25, 0.5, 0.125), gap=0.0625)
    assert plain(registry) == (0.625, 3)
    # A step with drafts is no baseline, whatever it costs.
    run_step(hooks, clock, [1, 2], 4, durations=(0.25, 0.5, 0.125))
    assert plain(registry) == (0.625, 3)
    # Per-request K all 0, and only a verify stage (an engine that skips drafting): 0.5 s.
    hooks.verify_start()
    clock.advance(0.5)
    hooks.verify_end([0, 0], np.array([0, 0]))
    hooks.end_step()
    assert plain(registry) == (0.625 + 0.5, 3 + 2)
    # One request with drafts makes the step speculative.
    run_step(hooks, clock, [0, 1], [0, 1], durations=(0.25, 0.5, 0.125))
    families = scrape(registry)
    assert plain(registry) == (1.125, 5)
    assert sample_value(families, "spec_decode_steps_without_drafts",
                        "spec_decode_steps_without_drafts_total", method="eagle") == 2
    for encoder in (openmetrics.generate_latest, classic.generate_latest):
        assert render(registry, encoder) == encoder(registry)
    text = render(registry, openmetrics.generate_latest).decode()
    assert f"# UNIT {SECONDS} seconds\n" in text
    assert f'{SECONDS}_total{{engine="e",method="eagle"}} 1.125\n' in text
    assert f'{TOKENS}_total{{engine="e",method="eagle"}} 5.0\n' in text


def test_a_method_without_plain_steps_shows_zero(make_hooks, registry, clock) -> None:
    hooks = make_hooks()
    run_step(hooks, clock, [1], 2)
    assert plain(registry) == (0.0, 0)


def test_per_method_and_never_grouped(make_hooks, registry, clock) -> None:
    hooks = make_hooks("eagle", group_label="tenant")
    ngram = spec_metrics.SpecDecodeHooks("ngram", collector=hooks.collector,
                                         group_label="tenant", max_draft_tokens=4,
                                         tracing=False)
    hooks.verify_start()
    clock.advance(0.25)
    hooks.verify_end([0, 0, 0], 0, ["a", "b", "a"])
    hooks.end_step()
    run_step(ngram, clock, [0], 0, durations=(0.5, 0.125, 0.25))
    assert plain(registry, "eagle") == (0.25, 3)
    assert plain(registry, "ngram") == (0.125, 1)
    families = scrape(registry)
    assert all("tenant" not in s.labels for s in families[SECONDS].samples)


def test_untimed_steps_are_no_baseline_and_time_is_never_negative(registry) -> None:
    """A summary without timing (the vLLM stat logger's) counts as a step without drafts
    but gives no baseline; a step shorter than its draft stages (clocks of different
    devices) adds no negative time."""
    collector = spec_metrics.SpecDecodeCollector(max_draft_tokens=4, registry=registry)
    k0 = AcceptSummary(np.zeros(5, dtype=np.int64), np.array([2, 0, 0, 0, 0]))
    collector._consume("eagle", (None, None, None), None, k0, None)
    collector._consume("eagle", (0.3, 0.1, 0.2), 0.4, k0, None)
    collector._consume("eagle", (0.25, 0.5, None), 1.0, k0, None)
    families = scrape(registry)
    assert plain(registry) == (0.75, 4)
    assert sample_value(families, "spec_decode_steps_without_drafts",
                        "spec_decode_steps_without_drafts_total", method="eagle") == 3
