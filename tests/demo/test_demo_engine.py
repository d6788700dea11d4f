"""Engine: hook protocol, exact counters, acceptance/collapse, continuous batching, spike."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Callable, Optional

import pytest
import torch

from spec_metrics.demo import engine as engine_module
from spec_metrics.demo.drafters import ModelDrafter, NgramDrafter
from spec_metrics.demo.engine import Engine, SpecCounters
from spec_metrics.demo.factory import build_engine
from spec_metrics.demo.models import GPT, plain_greedy_generate
from spec_metrics.demo.records import EngineConfig

STEP_PATTERN = ["begin_step", "draft_start", "draft_end", "verify_start", "verify_end",
                "draft_extend_start", "draft_extend_end", "end_step"]


class FakeTime:
    """Stands in for the engine module's `time`: only sleep() and advance() move its clock,
    so stage durations and run(seconds=...) are exact whatever the machine's speed. It starts
    at 0: the engine sleeps until `t0 + arrival`, and with a large t0 the float sum can land
    an ulp short of the arrival, forever (a real clock moves on by itself)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingHooks:
    """Duck-typed stand-in for spec_metrics' hooks that records every call (and when, on
    `clock`); `on_end_step` runs after each end_step."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 on_end_step: Optional[Callable[[], None]] = None) -> None:
        self._clock, self._on_end_step = clock, on_end_step
        self.calls: list[str] = []
        self.ids: list[list[str]] = []
        self.accepted: list[torch.Tensor] = []  # references as passed in
        self.accepted_copy: list[torch.Tensor] = []
        self.draft_tokens: list[Any] = []
        self.t: dict[str, list[float]] = {}

    def _mark(self, name: str) -> None:
        self.calls.append(name)
        self.t.setdefault(name, []).append(self._clock())
        if name == "end_step" and self._on_end_step is not None:
            self._on_end_step()

    def begin_step(self, request_ids: Optional[list[str]] = None, traceparents: Any = None) -> None:
        assert traceparents is None
        self.ids.append(list(request_ids or []))
        self._mark("begin_step")

    def verify_end(self, accepted: torch.Tensor, draft_tokens: Any) -> None:
        self.accepted.append(accepted)
        self.accepted_copy.append(accepted.clone())
        self.draft_tokens.append(draft_tokens)
        self._mark("verify_end")

    def __getattr__(self, name: str) -> Any:
        if name in STEP_PATTERN:
            return lambda: self._mark(name)
        raise AttributeError(name)


def check_counters(c: SpecCounters) -> None:
    assert c.emitted_tokens == c.accepted_tokens + c.verified
    assert sum(c.accepted_per_pos) == c.accepted_tokens
    assert sum(c.draft_tokens_per_pos) == c.draft_tokens
    assert c.draft_tokens_per_pos[0] == c.drafts <= c.verified
    assert all(a >= b for a, b in zip(c.accepted_per_pos, c.accepted_per_pos[1:]))
    assert all(a <= d for a, d in zip(c.accepted_per_pos, c.draft_tokens_per_pos))
    assert c.output_tokens <= c.emitted_tokens


def check_hooks(h: RecordingHooks, eng: Engine, c: SpecCounters) -> None:
    assert h.calls == STEP_PATTERN * c.steps
    assert sum(len(i) for i in h.ids) == c.verified
    total_acc = total_draft = 0
    for ids, acc, copy, dt in zip(h.ids, h.accepted, h.accepted_copy, h.draft_tokens):
        assert acc.dtype == torch.int64 and acc.device == eng.device
        assert acc.shape == (len(ids),)
        assert torch.equal(acc, copy)  # the engine never mutates what it handed out
        if isinstance(dt, int):
            assert dt == eng.cfg.k
            dt_t = torch.full_like(acc, dt)
        else:
            assert dt.shape == acc.shape and dt.device == eng.device
            dt_t = dt
        assert bool((acc <= dt_t).all())
        total_acc += int(acc.sum())
        total_draft += int(dt_t.sum())
    assert total_acc == c.accepted_tokens
    assert total_draft == c.draft_tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind,temperature", [("model", 0.0), ("ngram", 0.0), ("model", 1.0)])
def test_default_acceptance_then_collapse(kind: str, temperature: float) -> None:
    hooks = RecordingHooks()
    eng = build_engine(kind, config=EngineConfig(clock="virtual", temperature=temperature),
                       hooks=hooks)
    before = eng.run(steps=100)
    assert before.acceptance_rate > 0.5, before
    eng.collapse()
    after = eng.run(steps=50)
    rate = (after.accepted_tokens - before.accepted_tokens) / (
        after.draft_tokens - before.draft_tokens)
    assert rate < 0.2, rate
    check_counters(after)
    check_hooks(hooks, eng, after)
    assert max(len(i) for i in hooks.ids) == eng.cfg.batch_size


@pytest.mark.slow
def test_continuous_batching_poisson(target: GPT) -> None:
    hooks = RecordingHooks()
    cfg = EngineConfig(batch_size=4, k=3, arrival_rate=40.0, num_requests=24, clock="virtual",
                       prompt_len=(4, 32), max_new_tokens=(8, 32), seed=5)
    eng = Engine(target, ModelDrafter(target), cfg, hooks=hooks)
    c = eng.run()  # finite workload: runs until every request is done
    assert eng.idle()
    done = list(eng.finished)
    assert len(done) == c.requests_finished == c.requests_started == c.requests_arrived == 24
    assert len({r.id for r in done}) == 24
    for r in done:
        assert 1 <= len(r.output) <= r.max_new_tokens
        if r.finish_reason == "length":
            assert len(r.output) == r.max_new_tokens
        else:
            assert r.finish_reason == "eos" and r.output[-1] == eng.eos_id
        assert r.arrival_time <= r.start_time <= r.finish_time
    assert c.output_tokens == sum(len(r.output) for r in done)
    arrivals = sorted(r.arrival_time for r in done)
    mean_gap = arrivals[-1] / len(arrivals)
    assert 0.5 / 40 < mean_gap < 2 / 40
    # joins and leaves while the batch is running
    assert max(len(i) for i in hooks.ids) == 4
    joined = any(set(b) - set(a) and set(a) & set(b) for a, b in zip(hooks.ids, hooks.ids[1:]))
    left = any(set(a) - set(b) and set(b) for a, b in zip(hooks.ids, hooks.ids[1:]))
    assert joined and left
    check_counters(c)
    check_hooks(hooks, eng, c)
    for r in done[:4]:  # and the outputs are still exactly the target's greedy ones
        assert r.output == plain_greedy_generate(target, r.prompt, r.max_new_tokens, eos_id=0)


def test_ngram_variable_draft_lengths_reach_hooks(target: GPT) -> None:
    hooks = RecordingHooks()
    cfg = EngineConfig(arrival_rate=None, num_requests=10, clock="virtual", batch_size=5)
    eng = Engine(target, NgramDrafter(), cfg, hooks=hooks)
    c = eng.run()
    assert any(not isinstance(d, int) and int(d.min()) < cfg.k for d in hooks.draft_tokens)
    assert c.drafts < c.verified  # some request-steps had no n-gram match at all
    check_counters(c)
    check_hooks(hooks, eng, c)


def test_spike_delays_verify_stage_only_while_active(target: GPT,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine's clock and sleep are the fake's: a stage lasts exactly what the engine
    # slept inside it (computation takes no time on it), on any machine.
    fake = FakeTime()
    monkeypatch.setattr(engine_module, "time", fake)
    hooks = RecordingHooks(clock=fake.monotonic)
    eng = Engine(target, ModelDrafter(target), EngineConfig(arrival_rate=None), hooks=hooks)
    eng.run(steps=1)
    eng.set_spike(60, steps=2)
    eng.run(steps=4)
    assert fake.slept == [0.06, 0.06]  # two spiked steps, then the spike is over
    verify = [e - s for s, e in zip(hooks.t["verify_start"], hooks.t["verify_end"])]
    assert verify == [0.0, pytest.approx(0.06, abs=1e-9), pytest.approx(0.06, abs=1e-9),
                      0.0, 0.0]
    draft = [e - s for s, e in zip(hooks.t["draft_start"], hooks.t["draft_end"])]
    extend = [e - s for s, e in zip(hooks.t["draft_extend_start"], hooks.t["draft_extend_end"])]
    assert draft == extend == [0.0] * 5  # the spike is in the verify stage only


def test_spike_waits_for_a_step_with_drafts(target: GPT,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Plain steps (K = 0) are the payoff estimate's baseline: a spike skips them.
    fake = FakeTime()
    monkeypatch.setattr(engine_module, "time", fake)
    hooks = RecordingHooks(clock=fake.monotonic)
    eng = Engine(target, ModelDrafter(target), EngineConfig(arrival_rate=None, plain_every=2),
                 hooks=hooks)
    eng.run(steps=1)
    eng.set_spike(60, steps=1)
    eng.run(steps=2)  # step 1 is plain, step 2 speculative
    assert eng.counters.steps_without_drafts == 1 and fake.slept == [0.06]
    verify = [e - s for s, e in zip(hooks.t["verify_start"], hooks.t["verify_end"])]
    assert verify == [0.0, 0.0, pytest.approx(0.06, abs=1e-9)]


def test_wall_clock_run_for_seconds(target: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    # The wall clock is the fake's: each step costs exactly step_s on it, idle waits for the
    # next Poisson arrival are fake sleeps; run(seconds=) must stop at the first step
    # boundary at or past its deadline, and never sleep past it.
    fake, step_s = FakeTime(), 0.01
    monkeypatch.setattr(engine_module, "time", fake)
    hooks = RecordingHooks(clock=fake.monotonic, on_end_step=lambda: fake.advance(step_s))
    eng = Engine(target, ModelDrafter(target), EngineConfig(arrival_rate=100.0), hooks=hooks)
    t0 = fake.now
    c = eng.run(seconds=0.5)
    assert 0.5 <= fake.now - t0 < 0.5 + step_s
    assert c.steps > 0 and c.requests_arrived > 0
    check_counters(c)
    check_hooks(hooks, eng, c)


def test_hooks_none_and_empty_workload(target: GPT) -> None:
    eng = Engine(target, NgramDrafter(), EngineConfig(num_requests=0, clock="virtual"))
    assert eng.run().steps == 0
    with pytest.raises(ValueError):
        Engine(target, NgramDrafter(), EngineConfig()).run()  # endless, no limit given


def test_demo_package_import_does_not_import_torch() -> None:
    code = "import sys, spec_metrics.demo; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
