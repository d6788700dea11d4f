"""batch_steps: finished steps reach the sinks in batches. The metrics are exactly those of
one-by-one processing once a batch is in (or poll() was called); only when they arrive differs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import spec_metrics
from spec_metrics import StrictModeError

from .conftest import run_step, sample_value, scrape


def _values(registry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in scrape(registry).values() for s in family.samples}


def _steps(registry, clock) -> float:
    """Steps that reached the metrics (the series appears with the first one)."""
    samples = scrape(registry)["spec_decode_step_duration_seconds"].samples
    if not samples:
        return 0
    return sample_value(scrape(registry), "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count", method="eagle")


@pytest.mark.parametrize("tensors", [False, True], ids=["numpy", "torch"])
def test_batched_metrics_equal_one_by_one(clock, provider, tensors) -> None:
    # Every third step hands over a torch tensor where torch is installed, an array otherwise.
    as_tensor = pytest.importorskip(
        "torch", reason="the torch variant needs torch").as_tensor if tensors else np.asarray
    registries = [CollectorRegistry(), CollectorRegistry()]
    hooks = [spec_metrics.SpecDecodeHooks("eagle", registry=r, tracer_provider=provider,
                                          trace_ratio=0.0, max_draft_tokens=4, batch_steps=b)
             for r, b in zip(registries, (1, 8))]
    rng = np.random.default_rng(7)
    for step in range(37):
        batch = int(rng.integers(1, 9))
        accepted = rng.integers(0, 5, batch)
        drafts = rng.integers(accepted, 5) if step % 3 == 0 else 4
        value = [accepted.tolist(), accepted, as_tensor(accepted)][step % 3]
        durations = tuple(float(x) for x in rng.uniform(0.001, 0.02, 3))
        for h in hooks:
            run_step(h, clock, value, drafts, durations=durations)
    assert _steps(registries[1], clock) == 32  # 4 full batches of 8; 5 steps wait
    hooks[1].poll()
    assert _values(registries[0]) == _values(registries[1])


def test_metrics_lag_until_the_batch_is_complete_or_polled(make_hooks, registry, clock) -> None:
    hooks = make_hooks(batch_steps=4)
    for _ in range(3):
        run_step(hooks, clock, [1, 2], 2)
    assert _steps(registry, clock) == 0
    run_step(hooks, clock, [1, 2], 2)
    assert _steps(registry, clock) == 4
    run_step(hooks, clock, [1, 2], 2)
    assert _steps(registry, clock) == 4
    hooks.poll()
    assert _steps(registry, clock) == 5
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 15


def test_counts_are_copied_before_the_engine_reuses_its_buffer(make_hooks, registry,
                                                                clock) -> None:
    hooks = make_hooks(batch_steps=4)
    buffer = np.array([2, 2, 2])
    for _ in range(4):
        run_step(hooks, clock, buffer, 2)
        buffer[:] = 0  # the engine overwrites its buffer for the next step
        buffer[:] = 2 if _ % 2 else 1
    # steps saw [2,2,2], [1,1,1], [2,2,2], [1,1,1]
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 18


def test_bad_counts_in_a_batch_are_dropped_when_reduced(make_hooks, registry, clock,
                                                        caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spec_metrics")
    hooks = make_hooks(batch_steps=2)
    run_step(hooks, clock, [3], 2)  # accepted > drafted: found when the batch is reduced
    run_step(hooks, clock, [1], 2)
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="accepted_exceeds_drafted") == 1
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 1
    assert "reduced in a batch" in caplog.text


def test_strict_mode_still_raises_at_the_hook(make_hooks, clock) -> None:
    hooks = make_hooks(batch_steps=8, strict=True)
    hooks.begin_step()
    hooks.verify_start()
    with pytest.raises(StrictModeError, match="spec_metrics.verify_end"):
        hooks.verify_end([3], 2)


@pytest.mark.parametrize("bad", [0, 4097, 2.0, "8"])
def test_batch_steps_must_be_a_sane_integer(registry, bad) -> None:
    with pytest.raises(ValueError, match="batch_steps"):
        spec_metrics.SpecDecodeHooks("eagle", registry=registry, batch_steps=bad)
