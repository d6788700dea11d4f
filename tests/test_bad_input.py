"""Bad input never breaks the engine: dropped, counted and warned by default; in strict mode a
ValueError that names the hook and the value."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import spec_metrics
from spec_metrics.catalog import DROP_REASONS

from .conftest import run_step, sample_value, scrape

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _verify(accepted, draft_tokens):
    def action(hooks):
        hooks.verify_start()
        hooks.verify_end(accepted, draft_tokens)
        hooks.end_step()
    return action


def _calls(*names):
    def action(hooks):
        for name in names:
            getattr(hooks, name)()
    return action


def _bad_traceparent(hooks):
    run_step(hooks, None, [1], 1, traceparents=[TP[:-1] + "x"])


def _wrong_batch(hooks):
    hooks.begin_step(request_ids=["a", "b"], batch_size=3)
    hooks.end_step()


# reason -> (action, hook named in the message, text of the value in the message)
CASES = {
    "wrong_type": (_verify("1,2", 4), "verify_end", "'1,2'"),
    "wrong_type_dtype": (_verify(np.array(["a", "b"]), 4), "verify_end", "<U1"),
    "wrong_type_fraction": (_verify(np.array([1.5, 1.0]), 4), "verify_end", "1.5"),
    "wrong_shape": (_verify(np.zeros((2, 2), dtype=int), 4), "verify_end", "(2, 2)"),
    "wrong_shape_batch": (_wrong_batch, "begin_step", "[2, 3]"),
    "non_finite": (_verify(np.array([1.0, np.nan]), 4), "verify_end", "nan"),
    "negative": (_verify([2, -1], 4), "verify_end", "-1"),
    "negative_draft": (_verify([0, 0], [1, -2]), "verify_end", "-2"),
    "accepted_exceeds_drafted": (_verify([1, 5], 4), "verify_end", "accepted 5 of 4"),
    "accepted_exceeds_drafted_per_request": (_verify([1, 3], [4, 2]), "verify_end", "3 of 2"),
    "draft_tokens_exceed_max": (_verify([1], 9), "verify_end", "9"),
    "end_without_start": (_calls("draft_end"), "draft_end", "draft_start"),
    "stage_not_ended": (_calls("draft_start", "verify_start", "verify_end", "end_step"),
                        "verify_start", "draft"),
    "stage_not_ended_at_end_step": (_calls("draft_start", "end_step"), "end_step", "draft"),
    "out_of_order": (_calls("verify_start", "verify_end", "draft_start", "draft_end", "end_step"),
                     "draft_start", "draft started after verify"),
    "out_of_order_begin_step": (_calls("draft_start", "draft_end", "begin_step", "end_step"),
                                "begin_step", "before end_step()"),
    "end_without_start_step": (_calls("end_step"), "end_step", "end_step() without a step"),
    "bad_traceparent": (_bad_traceparent, "begin_step", TP[:-1] + "x"),
}


def _reason(case: str) -> str:
    return next(r for r in sorted(DROP_REASONS, key=len, reverse=True) if case.startswith(r))


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_mode_drops_counts_and_warns(case, make_hooks, registry, caplog):
    action, hook, value_text = CASES[case]
    hooks = make_hooks(trace_ratio=1.0)
    with caplog.at_level(logging.WARNING, logger="spec_metrics"):
        action(hooks)
        action(hooks)  # the second one is counted but not warned again
    reason = _reason(case)
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason=reason) == 2
    others = [s for s in families["spec_metrics_dropped"].samples
              if s.labels["reason"] != reason and s.value]
    assert others == []
    warnings = [r for r in caplog.records if r.name == "spec_metrics"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"spec_metrics.{hook}" in message and value_text in message, message
    assert f"reason='{reason}'" in message


@pytest.mark.parametrize("case", sorted(CASES))
def test_strict_mode_raises_naming_hook_and_value(case, make_hooks):
    action, hook, value_text = CASES[case]
    hooks = make_hooks(trace_ratio=1.0, strict=True)
    with pytest.raises(ValueError) as info:
        action(hooks)
    assert isinstance(info.value, spec_metrics.StrictModeError)
    assert str(info.value).startswith(f"spec_metrics.{hook}:"), str(info.value)
    assert value_text in str(info.value)


def test_good_data_after_bad_data_is_still_recorded(make_hooks, registry):
    hooks = make_hooks()
    run_step(hooks, None, [1, 9], 4)  # rejected
    run_step(hooks, None, [1, 2], 4)
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 3
    # The rejected step still has its latencies: only its counts were dropped.
    stage = "spec_decode_stage_duration_seconds"
    assert sample_value(families, stage, stage + "_count", stage="verify") == 2


def test_warnings_are_rate_limited_and_report_suppressed(make_hooks, caplog, monkeypatch):
    hooks = make_hooks(warn_interval_seconds=60.0)
    now = [1000.0]
    monkeypatch.setattr("spec_metrics._support.drops.time.monotonic", lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="spec_metrics"):
        for _ in range(5):
            hooks.draft_end()
        now[0] += 61
        hooks.draft_end()
    messages = [r.getMessage() for r in caplog.records if r.name == "spec_metrics"]
    assert len(messages) == 2
    assert "4 more like it" in messages[1]


def test_internal_error_is_contained_and_counted(make_hooks, registry, monkeypatch, caplog):
    hooks = make_hooks()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hooks.collector, "_consume", broken)
    with caplog.at_level(logging.ERROR, logger="spec_metrics"):
        run_step(hooks, None, [1], 1)  # must not raise
    monkeypatch.undo()
    assert hooks.collector.drops.counts["internal_error"] == 1


def test_empty_batch_is_not_an_error(make_hooks, registry):
    hooks = make_hooks()
    run_step(hooks, None, np.array([], dtype=np.int64), 4)
    families = scrape(registry)
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total") == 0


def test_huge_values_do_not_allocate(make_hooks, registry):
    hooks = make_hooks()
    run_step(hooks, None, np.array([10**15]), 4)  # bincount on this would need petabytes
    assert hooks.collector.drops.counts["accepted_exceeds_drafted"] == 1
