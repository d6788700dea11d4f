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
