"""`stage_order`: an engine whose iteration verifies the previous drafts and then drafts
(vLLM) records verify -> draft steps with exact durations, spans and counts; the default
order still closes a step when a stage comes out of order."""

from __future__ import annotations

import pytest

from spec_metrics import StrictModeError
from spec_metrics._support.config import HooksConfig

from .conftest import sample_value, scrape

VERIFY_FIRST = ("verify", "draft", "draft_extend")


def verify_then_draft(hooks, clock, accepted, k):
    hooks.verify_start()
    clock.advance(0.010)
    hooks.verify_end(accepted, k)
    clock.advance(0.001)  # bookkeeping between the stages
    hooks.draft_start()
    clock.advance(0.004)
    hooks.draft_end()
    hooks.end_step()


def test_verify_then_draft_is_one_step(make_hooks, registry, exporter, clock):
    hooks = make_hooks("ngram", stage_order=VERIFY_FIRST, trace_ratio=1.0)
    verify_then_draft(hooks, clock, [2, 0, 3], 3)
    verify_then_draft(hooks, clock, [1, 1, 0], 3)
    families = scrape(registry)
    stage = "spec_decode_stage_duration_seconds"
    for name, seconds in (("verify", 0.020), ("draft", 0.008)):
        assert sample_value(families, stage, stage + "_count", stage=name) == 2
        assert sample_value(families, stage, stage + "_sum", stage=name) == pytest.approx(seconds)
    step = "spec_decode_step_duration_seconds"
    assert sample_value(families, step, step + "_count") == 2
    assert sample_value(families, step, step + "_sum") == pytest.approx(0.030)
    accepted = "spec_decode_accepted_tokens"
    assert sample_value(families, accepted, accepted + "_total") == 7
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="out_of_order") == 0
    spans = exporter.get_finished_spans()
    steps = [s for s in spans if s.name == "spec_decode.step"]
    assert len(steps) == 2
    for step_span in steps:
        children = sorted((s for s in spans if s.parent is not None
                           and s.parent.span_id == step_span.context.span_id),
                          key=lambda s: s.start_time)
        assert [s.name for s in children] == ["spec_decode.verify", "spec_decode.draft"]
        assert step_span.start_time == children[0].start_time
        assert step_span.end_time == children[1].end_time


def test_default_order_closes_the_step_at_verify_then_draft(make_hooks, registry, clock):
    hooks = make_hooks("ngram")
    verify_then_draft(hooks, clock, [1], 3)
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="out_of_order") == 1
    step = "spec_decode_step_duration_seconds"
    assert sample_value(families, step, step + "_count") == 2  # split in two


def test_out_of_order_in_the_configured_order_is_named(make_hooks, clock):
    hooks = make_hooks("ngram", stage_order=VERIFY_FIRST, strict=True)
    hooks.draft_start()
    hooks.draft_end()
    with pytest.raises(StrictModeError, match="verify started after draft"):
        hooks.verify_start()


@pytest.mark.parametrize("order", [("verify", "draft"), ("draft", "draft", "verify"),
                                   ("draft", "verify", "extend")])
def test_stage_order_must_name_every_stage_once(order):
    with pytest.raises(ValueError, match="stage_order must name each of"):
        HooksConfig.resolve(stage_order=order)
