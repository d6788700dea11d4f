"""A demo where speculation pays (issue 15, items 1-2): the distilled drafter, plain decode
steps, workload classes, the payoff estimate and `demo --baseline`."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest
import torch

from spec_metrics.demo.distill import DRAFT_CONFIG, load_or_distill
from spec_metrics.demo.drafters import ModelDrafter, NoDrafter
from spec_metrics.demo.engine import Engine
from spec_metrics.demo.factory import build_engine, generate
from spec_metrics.demo.models import plain_greedy_generate
from spec_metrics.demo.records import EngineConfig
from spec_metrics.payoff import PayoffTotals, speedup_estimate


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_upper_bound_estimate_exact() -> None:
    t = PayoffTotals()
    # Two steps of 2 requests: 10 ms each, 4 ms of drafter stages; 6 and 2 tokens accepted.
    t.add_step(0.010, 0.004, 2, 6, 8)
    t.add_step(0.010, 0.004, 2, 2, 8)
    # emitted per request-step = (4 + 8) / 4 = 3; (20 - 8) / 20 = 0.6 -> 1.8
    assert speedup_estimate(t) == pytest.approx((1.8, "upper_bound"))
    assert t.plain_tokens == 0


def test_measured_estimate_exact() -> None:
    t = PayoffTotals()
    t.add_step(0.010, 0.004, 2, 6, 8)  # speculative: 8 tokens in 10 ms
    t.add_step(0.003, 0.001, 2, 0, 0)  # plain: 2 tokens in 2 ms once the drafter is taken out
    assert (t.plain_seconds, t.plain_tokens) == (pytest.approx(0.002), 2)
    # plain 1 ms/token; all steps 13 ms / 10 tokens = 1.3 ms/token -> 1/1.3
    value, basis = speedup_estimate(t)  # type: ignore[misc]
    assert basis == "measured" and value == pytest.approx(1 / 1.3)
    assert speedup_estimate(PayoffTotals()) is None


def test_distilled_drafter_is_small_and_agrees(target) -> None:
    base = load_or_distill(target)
    assert base.cfg == DRAFT_CONFIG
    assert _params(base) * 4 < _params(target)
    assert load_or_distill(target) is not base  # from the disk cache: same weights
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                 load_or_distill(target).state_dict().values()))
    engine = build_engine("model", config=EngineConfig(clock="virtual", arrival_rate=None,
                                                       num_requests=40, seed=1))
    assert engine.drafter.base.cfg == DRAFT_CONFIG
    counters = engine.run()
    assert counters.acceptance_rate > 0.6, counters  # ~0.74 measured
    engine.collapse()  # --collapse-at keeps working with the small drafter
    engine.counters = type(counters)(k=counters.k)
    engine.cfg.num_requests = None
    assert engine.run(steps=40).acceptance_rate < 0.1


def test_plain_engine_is_greedy_decoding(target, prompts) -> None:
    outs, counters = generate(target, NoDrafter(), prompts, 24, stop_at_eos=False, k=4)
    assert outs == [plain_greedy_generate(target, p, 24) for p in prompts]
    assert counters.draft_tokens == 0 and counters.steps_without_drafts == counters.steps
    assert counters.emitted_tokens == counters.verified


def test_plain_every_runs_exactly_every_nth_step(target) -> None:
    engine = Engine(target, ModelDrafter(target), EngineConfig(
        clock="virtual", arrival_rate=None, plain_every=5, seed=2))
    engine.step_log = []
    counters = engine.run(steps=42)
    assert counters.steps_without_drafts == 42 // 5
    # Steps 4, 9, 14, ... drafted nothing; every request of the others got K draft tokens.
    plain_rows = sum(rows for i, (rows, _, _) in enumerate(engine.step_log) if i % 5 == 4)
    assert counters.drafts == counters.verified - plain_rows
    assert counters.draft_tokens == 4 * counters.drafts


def test_workload_classes_have_visibly_different_acceptance(target) -> None:
    rates = {}
    for name in ("prose", "hex"):
        engine = build_engine("model", config=EngineConfig(
            clock="virtual", arrival_rate=None, num_requests=40, seed=4,
            workloads=((name, 1.0),)))
        rates[name] = engine.run().acceptance_rate
        assert {r.workload for r in engine.finished} == {name}
    assert rates["hex"] < rates["prose"] - 0.12, rates  # measured: 0.49 against 0.74
    assert rates["hex"] > 0.35, rates  # still above SpecDecodeAcceptanceRateLow's 25 %


def test_workload_mix_is_drawn_by_share(target) -> None:
    engine = build_engine("model", config=EngineConfig(
        clock="virtual", arrival_rate=None, num_requests=200, seed=5,
        workloads=(("prose", 0.75), ("hex", 0.25))))
    engine.run()
    share = sum(r.workload == "hex" for r in engine.finished) / len(engine.finished)
    assert 0.15 < share < 0.35
    engine.set_workloads((("prose", 0.0), ("hex", 1.0)))
    engine.cfg.num_requests = None
    before = len(engine.finished)
    engine.run(steps=200)
    assert {r.workload for r in list(engine.finished)[before:]} == {"hex"}
    with pytest.raises(ValueError, match="workloads must be"):
        engine.set_workloads((("poetry", 1.0),))


def test_draft_slowdown_slows_the_draft_stage_only(target) -> None:
    from prometheus_client import CollectorRegistry

    import spec_metrics
    from spec_metrics._core.sinks import StepResult  # noqa: F401  (the listener's type)

    results: list = []
    hooks = spec_metrics.SpecDecodeHooks("draft_model", registry=CollectorRegistry(),
                                         on_step=results.append, tracing=False)
    engine = build_engine("model", hooks=hooks, config=EngineConfig(
        arrival_rate=None, seed=6, batch_size=4))
    engine.run(steps=30)
    fast = results[10:30]
    engine.set_draft_slowdown(4.0)
    engine.run(steps=20)
    slow = results[30:50]

    def mean(rs, i):
        return sum(r.stage_seconds[i] for r in rs) / len(rs)

    assert mean(slow, 0) > 2.5 * mean(fast, 0)  # x4 asked; sleep granularity and noise
    assert mean(slow, 1) < 2.0 * mean(fast, 1)  # verify untouched
    with pytest.raises(ValueError, match=">= 1"):
        engine.set_draft_slowdown(0.5)


def _speedups(output: str) -> list[tuple[float, float]]:
    pairs = re.findall(r"estimate ([\d.]+)x \(measured baseline\)\s+measured ([\d.]+)x",
                       output)
    return [(float(a), float(b)) for a, b in pairs]


def test_demo_baseline_agrees_with_estimate_and_both_fall_after_slowdown(target) -> None:
    """`demo --baseline`: on the healthy run the hooks' estimate is within 15% of plain greedy
    decoding measured at the same batch sizes; after --draft-slowdown-at both are below 1."""
    load_or_distill(target)  # cached: the demo below starts without training
    out = subprocess.run(
        [sys.executable, "-m", "spec_metrics", "demo", "--duration", "36", "--port", "0",
         "--quiet", "--device", "cpu", "--baseline", "--draft-slowdown-at", "20",
         "--sample-ratio", "0"],
        capture_output=True, text=True, timeout=240, check=True).stdout
    (healthy_est, healthy_meas), (slow_est, slow_meas) = _speedups(out)
    assert healthy_meas > 1.0, out  # speculation really pays on the CPU default
    assert abs(healthy_est - healthy_meas) <= 0.15 * healthy_meas, out
    assert slow_est < 1.0 and slow_meas < 1.0, out


def test_demo_rejects_bad_payoff_flags() -> None:
    for flags, message in ((["--plain-every", "1"], "--plain-every"),
                           (["--draft-slowdown", "0.5"], "--draft-slowdown")):
        proc = subprocess.run([sys.executable, "-m", "spec_metrics", "demo", *flags],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr


def test_seeded_prose_workload_is_unchanged_by_classes(target) -> None:
    # One workload class draws nothing extra from the workload RNG: seeded runs of the
    # default configuration see the same prompts as before workload classes existed.
    engine = build_engine("model", config=EngineConfig(clock="virtual", arrival_rate=None,
                                                       num_requests=3, seed=9))
    engine.run()
    rng = random.Random(9)
    lo, hi = engine.cfg.prompt_len
    first = engine.corpus.sample_prompt(rng, lo, hi)
    assert sorted(engine.finished, key=lambda r: r.id)[0].prompt == first
