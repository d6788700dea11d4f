"""The sglang-style adapter, driven the way sglang's EAGLE worker calls its time stats.

`sglang_set_time_batch` below is a stand-in for sglang's helper of that name (written here
from its documented behaviour: one `perf_counter()` for the batch, then the named setter on
every request's time stats); `TimeStatsStandIn` records what sglang's per-request stats
would receive. Each step: draft, verify, draft_extend, with exact durations from the clock.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spec_metrics import SpecDecodeHooks, StrictModeError
from spec_metrics._tracing.sink import SPAN_NAMES
from spec_metrics.integrations.sglang import STAGE_LEVELS, SglangSpecAdapter

from ..conftest import sample_value, scrape

DURATIONS = {"draft": 0.002, "verify": 0.010, "draft_extend": 0.001}


class TimeStatsStandIn:
    """Stand-in for sglang's per-request SchedulerReqTimeStats: records the setters called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("set_"):
            raise AttributeError(name)
        return lambda ts=None, attrs=None: self.calls.append(name)


class Req:
    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.time_stats = TimeStatsStandIn()


def sglang_set_time_batch(reqs, set_func, trace_only=False, attrs=None):
    """Stand-in for sglang's set_time_batch: the named setter on every request."""
    for req in reqs:
        method = getattr(req.time_stats, set_func)
        method(0.0) if attrs is None else method(0.0, attrs)


def eagle_step(spec: SglangSpecAdapter, reqs: list[Req], clock, accepted: Any) -> None:
    """One decode step of an EAGLE worker, with the adapter's lines in place."""
    set_time_batch = spec.set_time_batch
    set_time_batch(reqs, "set_spec_draft_start_time", trace_only=True)
    clock.advance(DURATIONS["draft"])  # self.draft(batch)
    set_time_batch(reqs, "set_spec_draft_end_time", trace_only=True)
    set_time_batch(reqs, "set_spec_verify_start_time", trace_only=True)
    clock.advance(DURATIONS["verify"])  # self.verify(batch, spec_info)
    spec.verify_end_batch(reqs, accepted)  # accept_length_per_req_cpu
    set_time_batch(reqs, "set_spec_draft_extend_start_time", trace_only=True)
    clock.advance(DURATIONS["draft_extend"])  # self.forward_draft_extend_after_decode(batch)
    set_time_batch(reqs, "set_spec_draft_extend_end_time", trace_only=True)
    clock.advance(0.005)  # scheduler work between steps: not part of the step


def stage_count_and_sum(families, stage: str) -> tuple[float, float]:
    labels = {"method": "eagle", "stage": stage}
    return (sample_value(families, "spec_decode_stage_duration_seconds",
                         "spec_decode_stage_duration_seconds_count", **labels),
            sample_value(families, "spec_decode_stage_duration_seconds",
                         "spec_decode_stage_duration_seconds_sum", **labels))


def step_count_and_sum(families) -> tuple[float, float]:
    return (sample_value(families, "spec_decode_step_duration_seconds",
                         "spec_decode_step_duration_seconds_count", method="eagle"),
            sample_value(families, "spec_decode_step_duration_seconds",
                         "spec_decode_step_duration_seconds_sum", method="eagle"))


def test_stage_vocabulary_matches_sglang():
    assert STAGE_LEVELS == {"spec_draft": 2, "spec_verify": 2, "spec_draft_extend": 3}


def test_eagle_worker_all_stages(make_hooks, registry, clock, exporter):
    hooks = make_hooks(trace_ratio=1.0)
    spec = SglangSpecAdapter(hooks, draft_tokens=4, request_id_attr="rid",
                             forward=sglang_set_time_batch)
    batch1 = [Req(f"r{i}") for i in range(4)]
    batch2 = [Req(f"s{i}") for i in range(3)]
    eagle_step(spec, batch1, clock, [0, 1, 4, 2])  # accept_length_per_req_cpu
    eagle_step(spec, batch2, clock, np.array([3, 3, 0]))
    families = scrape(registry)
    m = {"method": "eagle"}
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total", **m) == 7
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", **m) == 13
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total", **m) == 28
    for position, value in enumerate([5, 4, 3, 1]):
        assert sample_value(families, "spec_decode_accepted_tokens_per_position",
                            "spec_decode_accepted_tokens_per_position_total",
                            position=str(position), **m) == value
    for stage, seconds in DURATIONS.items():
        count, total = stage_count_and_sum(families, stage)
        assert count == 2 and total == pytest.approx(2 * seconds, abs=1e-12)
    count, total = step_count_and_sum(families)
    assert count == 2 and total == pytest.approx(2 * sum(DURATIONS.values()), abs=1e-12)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="out_of_order") == 0

    # Spans: one step span per batch, its three stages as children, request ids attached.
    spans = exporter.get_finished_spans()
    steps = [s for s in spans if s.name == SPAN_NAMES["step"]]
    assert len(steps) == 2
    assert list(steps[0].attributes["spec_decode.request_ids"]) == ["r0", "r1", "r2", "r3"]
    assert steps[0].attributes["spec_decode.batch_size"] == 4
    for step in steps:
        children = [s for s in spans if s.parent is not None
                    and s.parent.span_id == step.context.span_id]
        assert [c.name for c in children] == [SPAN_NAMES[s] for s in DURATIONS]
        assert all(c.context.trace_id == step.context.trace_id for c in children)
        for child, seconds in zip(children, DURATIONS.values()):
            assert child.end_time - child.start_time == round(seconds * 1e9)

    # sglang's own per-request slices still got every call.
    assert batch1[0].time_stats.calls == [
        "set_spec_draft_start_time", "set_spec_draft_end_time", "set_spec_verify_start_time",
        "set_spec_draft_extend_start_time", "set_spec_draft_extend_end_time"]


def test_trace_level_2_leaves_draft_extend_out(make_hooks, registry, clock, exporter):
    hooks = make_hooks(trace_ratio=1.0)
    spec = SglangSpecAdapter(hooks, trace_level=2, draft_tokens=4,
                             forward=sglang_set_time_batch)
    assert spec.enabled and not spec.records_draft_extend
    reqs = [Req("a"), Req("b")]
    eagle_step(spec, reqs, clock, [2, 4])
    eagle_step(spec, reqs, clock, [0, 1])
    families = scrape(registry)
    assert stage_count_and_sum(families, "draft_extend") == (0, 0)
    assert stage_count_and_sum(families, "verify")[0] == 2
    count, total = step_count_and_sum(families)  # steps end at verify end
    assert count == 2
    assert total == pytest.approx(2 * (DURATIONS["draft"] + DURATIONS["verify"]), abs=1e-12)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 7
    names = [s.name for s in exporter.get_finished_spans()]
    assert SPAN_NAMES["draft_extend"] not in names
    assert names.count(SPAN_NAMES["step"]) == 2
    assert "set_spec_draft_extend_end_time" in reqs[0].time_stats.calls  # still forwarded


class Untouchable:
    """Fails the test if the adapter looks at it (a batch or a device tensor)."""

    def __getattribute__(self, name: str) -> Any:
        raise AssertionError(f"touched .{name}")

    def __len__(self) -> int:
        raise AssertionError("touched len()")

    def __iter__(self):
        raise AssertionError("touched iter()")

    def __bool__(self) -> bool:
        raise AssertionError("touched bool()")


class HooksSpy:
    """Answers `enabled` like real hooks; any other use fails the test."""

    enabled = True

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"hooks.{name} used")


@pytest.mark.parametrize("level", [0, 1])
def test_low_trace_level_is_one_flag_check(level):
    spec = SglangSpecAdapter(HooksSpy(), trace_level=level)  # type: ignore[arg-type]
    assert not spec.enabled
    # Nothing of the batch, the counts or the hooks is looked at.
    for set_func in ("set_spec_draft_start_time", "set_spec_draft_extend_end_time"):
        spec.set_time_batch(Untouchable(), set_func, trace_only=True)
    spec.verify_end_batch(Untouchable(), Untouchable(), Untouchable())
    spec.verify_end_batch(reqs=Untouchable(), num_correct_drafts=Untouchable())
    spec.set_spec_verify_end_time_batch(Untouchable(), Untouchable(), Untouchable())
    spec.end_step()
    # With sglang's helper given, the call is that helper itself: no layer of ours.
    forwarded = SglangSpecAdapter(HooksSpy(), trace_level=level,  # type: ignore[arg-type]
                                  forward=sglang_set_time_batch)
    assert forwarded.set_time_batch is sglang_set_time_batch


def test_disabled_hooks_disable_the_adapter(make_hooks, registry):
    spec = SglangSpecAdapter(make_hooks(enabled=False))
    assert not spec.enabled
    spec.set_time_batch(Untouchable(), "set_spec_draft_start_time")


def test_ngram_worker_without_draft_extend(make_hooks, registry, clock):
    spec = SglangSpecAdapter(make_hooks("ngram"), draft_extend=False)
    reqs = [Req("a"), Req("b"), Req("c")]
    for accepted, drafted in (([0, 2, 0], [0, 3, 4]), ([1, 1, 1], [1, 2, 2])):
        spec.set_time_batch(reqs, "set_spec_draft_start_time")
        clock.advance(0.001)
        spec.set_time_batch(reqs, "set_spec_draft_end_time")
        spec.set_time_batch(reqs, "set_spec_verify_start_time")
        clock.advance(0.004)
        spec.verify_end_batch(reqs, accepted, np.array(drafted))
    families = scrape(registry)
    m = {"method": "ngram"}
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total", **m) == 5
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total", **m) == 12
    assert sample_value(families, "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count", **m) == 2
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0


def test_accept_lens_with_bonus_like_sglangs_batch_helper(make_hooks, registry, clock):
    spec = SglangSpecAdapter(make_hooks(), draft_tokens=4)
    reqs = [Req("a"), Req("b"), Req("c")]
    spec.set_time_batch(reqs, "set_spec_verify_start_time")
    clock.advance(0.010)
    spec.set_spec_verify_end_time_batch(reqs, [3, 2, 5])  # accept_lens: accepted + 1
    spec.end_step()
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 2 + 1 + 4
    assert sample_value(families, "spec_decode_emitted_tokens",
                        "spec_decode_emitted_tokens_total", method="eagle") == 10


def test_step_left_open_is_closed_by_the_next_draft(make_hooks, registry, clock):
    # A worker that skipped draft_extend on one step (e.g. nothing to extend).
    spec = SglangSpecAdapter(make_hooks(), draft_tokens=4)
    reqs = [Req("a")]
    spec.set_time_batch(reqs, "set_spec_draft_start_time")
    clock.advance(0.002)
    spec.set_time_batch(reqs, "set_spec_draft_end_time")
    spec.set_time_batch(reqs, "set_spec_verify_start_time")
    clock.advance(0.010)
    spec.verify_end_batch(reqs, [1])
    eagle_step(spec, reqs, clock, [4])
    families = scrape(registry)
    count, total = step_count_and_sum(families)
    assert count == 2
    assert total == pytest.approx(0.012 + sum(DURATIONS.values()), abs=1e-12)
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0


def test_other_set_funcs_are_only_forwarded(make_hooks, registry):
    spec = SglangSpecAdapter(make_hooks(), forward=sglang_set_time_batch)
    req = Req("a")
    spec.set_time_batch([req], "set_last_decode_finish_time")
    assert req.time_stats.calls == ["set_last_decode_finish_time"]
    assert "spec_decode_drafts" not in {n for n, f in scrape(registry).items() if f.samples}


def test_bad_counts_are_counted_not_raised(make_hooks, registry, clock):
    spec = SglangSpecAdapter(make_hooks(), draft_tokens=2)
    eagle_step(spec, [Req("a"), Req("b")], clock, [1, 3])  # 3 > K
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="accepted_exceeds_drafted") == 1
    assert stage_count_and_sum(families, "verify")[0] == 1  # the timing is kept


def test_bad_trace_level():
    with pytest.raises(ValueError, match="trace_level"):
        SglangSpecAdapter(HooksSpy(), trace_level=-1)  # type: ignore[arg-type]


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sglang_style_eagle_worker.py"


def run_example(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=True)


def test_example_runs_the_hooks():
    # Seeded numpy tables: the same acceptance every run.
    assert run_example("--steps", "100").stdout.strip() == (
        "100 decode steps, 100 recorded by spec_metrics, acceptance rate 0.564")
    assert run_example("--steps", "20", "--trace-level", "1").stdout.strip() == (
        "20 decode steps, 0 recorded by spec_metrics, acceptance rate 0.000")


def test_example_serves_metrics():
    # Port 0, and a long --duration ended by Ctrl-C (SIGINT) once /metrics was read: no
    # window to hit in time however slowly the example starts.
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1]), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--serve", "--duration", "600", "--port", "0",
         "--batch-size", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Its first line says where it serves ("serving URL for 600s"); give up after 60 s.
        ready, _, _ = select.select([process.stdout], [], [], 60)
        first = process.stdout.readline() if ready else ""
        assert first.startswith("serving "), (first, process.poll())
        url = first.split()[1]
        families = None
        deadline = time.monotonic() + 60  # give up then
        while time.monotonic() < deadline and process.poll() is None:
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            if "spec_decode_drafts" in families and families["spec_decode_drafts"].samples:
                break
            time.sleep(0.1)
        assert families is not None, "the example never served /metrics"
        labels = {"method": "eagle", "model": "numpy-table", "engine": "sglang-style"}
        drafts = sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total",
                              **labels)
        assert drafts > 0 and drafts % 8 == 0  # whole batches of 8
        assert sample_value(families, "spec_decode_draft_tokens",
                            "spec_decode_draft_tokens_total", **labels) == 4 * drafts
        process.send_signal(signal.SIGINT)  # the example stops on Ctrl-C and reports
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert "recorded by spec_metrics" in stdout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_unusable_accept_lens_are_counted_and_verify_still_timed(make_hooks, registry, clock):
    spec = SglangSpecAdapter(make_hooks(), draft_tokens=4, draft_extend=False)
    reqs = [Req("a")]
    spec.set_time_batch(reqs, "set_spec_verify_start_time")
    clock.advance(0.010)
    spec.set_spec_verify_end_time_batch(reqs, "3")  # not counts: cannot subtract the bonus
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="wrong_type") == 1
    assert stage_count_and_sum(families, "verify") == (1, pytest.approx(0.010, abs=1e-12))
    strict = SglangSpecAdapter(SpecDecodeHooks("strict", registry=None, strict=True))
    with pytest.raises(StrictModeError, match="accept_lens.*str"):
        strict.set_spec_verify_end_time_batch(reqs, "3")
