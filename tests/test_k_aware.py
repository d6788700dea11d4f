"""K-aware series: the draft length of every request verified (0 included) as a histogram,
and verify passes in which no request had drafts (plain decode steps) counted; acceptance by
position keeps its own denominator when K varies."""

from __future__ import annotations

import numpy as np

from .conftest import sample_value, scrape


def verify(hooks, accepted, draft_tokens):
    hooks.verify_start()
    hooks.verify_end(accepted, draft_tokens)
    hooks.end_step()


def test_draft_length_and_plain_steps_exact(make_hooks, registry):
    hooks = make_hooks("ngram", max_draft_tokens=4)
    verify(hooks, [2, 0, 1], [4, 0, 2])          # K varies per request, one without drafts
    verify(hooks, [0, 0], [0, 0])                # dynamic speculation turned K down to 0
    verify(hooks, np.array([3]), np.array([3]))  # K = 3 for the only request
    verify(hooks, [0], 0)                        # K = 0 given as one int
    families = scrape(registry)
    hist = "spec_decode_draft_length"
    lengths = [4, 0, 2, 0, 0, 3, 0]  # every request verified
    for le in range(5):
        assert sample_value(families, hist, hist + "_bucket", method="ngram",
                            le=f"{float(le)}") == sum(n <= le for n in lengths)
    assert sample_value(families, hist, hist + "_bucket", method="ngram", le="+Inf") == 7
    assert sample_value(families, hist, hist + "_count", method="ngram") == 7
    assert sample_value(families, hist, hist + "_sum", method="ngram") == 9
    plain = "spec_decode_steps_without_drafts"
    assert sample_value(families, plain, plain + "_total", method="ngram") == 2
    # Requests without drafts emit the target's token and count in no acceptance series.
    assert sample_value(families, "spec_decode_emitted_tokens",
                        "spec_decode_emitted_tokens_total", method="ngram") == 6 + 7
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total",
                        method="ngram") == 3
    acc = "spec_decode_accepted_length"
    assert sample_value(families, acc, acc + "_count", method="ngram") == 3
    # Acceptance by position: each position's denominator is the drafts that reached it.
    drafted = "spec_decode_draft_tokens_per_position"
    accepted = "spec_decode_accepted_tokens_per_position"
    want_drafted = [3, 3, 2, 1]   # lengths 4, 2, 3
    want_accepted = [3, 2, 1, 0]  # accepted 2 (of 4), 1 (of 2), 3 (of 3)
    for position in range(4):
        assert sample_value(families, drafted, drafted + "_total", method="ngram",
                            position=str(position)) == want_drafted[position]
        assert sample_value(families, accepted, accepted + "_total", method="ngram",
                            position=str(position)) == want_accepted[position]


def drafter_info(registry) -> list[dict]:
    families = scrape(registry)
    return [dict(s.labels) for s in families["spec_decode_drafter"].samples if s.value == 1]


def test_declared_drafter_is_an_info_metric_and_a_change_replaces_it(make_hooks, registry):
    hooks = make_hooks("eagle", labels={"model": "m"})
    assert drafter_info(registry) == []
    hooks.declare_drafter("llama-3-8b", "eagle-head-v1", 4)
    assert drafter_info(registry) == [{"method": "eagle", "target": "llama-3-8b",
                                       "drafter": "eagle-head-v1",
                                       "num_speculative_tokens": "4", "model": "m"}]
    hooks.declare_drafter("llama-3-8b", "eagle-head-v2", 2)  # a drafter swap, K lowered
    hooks.declare_drafter("llama-3-8b", "prompt-lookup", 3, method="ngram")
    assert drafter_info(registry) == [
        {"method": "eagle", "target": "llama-3-8b", "drafter": "eagle-head-v2",
         "num_speculative_tokens": "2", "model": "m"},
        {"method": "ngram", "target": "llama-3-8b", "drafter": "prompt-lookup",
         "num_speculative_tokens": "3", "model": "m"}]


def test_bad_declarations_are_counted_or_raised(make_hooks, registry):
    import pytest

    from spec_metrics import StrictModeError

    hooks = make_hooks("eagle")
    hooks.declare_drafter("", "d", 4)
    hooks.declare_drafter("t", "d", 65)
    hooks.declare_drafter("t", "d", True)
    assert sample_value(scrape(registry), "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="wrong_type") == 3
    assert drafter_info(registry) == []
    import spec_metrics

    strict = spec_metrics.SpecDecodeHooks("eagle", strict=True, registry=None)
    with pytest.raises(StrictModeError, match="declare_drafter.*num_speculative_tokens"):
        strict.declare_drafter("t", "d", -1)


def test_disabled_hooks_declare_nothing(registry):
    import spec_metrics

    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, enabled=False)
    hooks.declare_drafter("t", "d", 4)
    assert list(registry.collect()) == []
