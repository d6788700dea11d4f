"""`demo --baseline`: the measured speedup of speculation over plain greedy decoding.

The hooks' payoff estimate (spec_metrics.payoff) is checked against a measurement that
shares nothing with it: after the run, plain greedy decoding (no drafter, K = 0) of the same
workload generator is timed at every batch size the speculative run used, and the time it
would have needed for the speculative run's tokens at those batch sizes is compared with
the time the speculative steps took. Batch-matched, because per-token cost falls steeply
with batch size on a CPU: an unmatched comparison would measure the batching, not the
speculation. Both sides count decode steps only (prefill of joining requests excluded),
wall time, host bookkeeping included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

__all__ = ["measure_plain_costs", "measured_speedup"]


def measure_plain_costs(batch_sizes: Iterable[int], config: Any, device: str,
                        seconds: float = 1.0, min_steps: int = 50,
                        seed: int = 0) -> dict[int, float]:
    """Seconds per emitted token of plain greedy decoding, per batch size (batch kept full)."""
    from spec_metrics.demo.factory import build_engine

    costs: dict[int, float] = {}
    for b in sorted(set(batch_sizes)):
        plain_config = dataclasses.replace(config, batch_size=b, arrival_rate=None,
                                           num_requests=None, dynamic_k=False,
                                           plain_every=0, seed=seed)
        engine = build_engine("none", device=device, config=plain_config, seed=seed,
                              num_threads=1 if device == "cpu" else None)
        engine.run(steps=10)  # warm-up: first steps allocate and fill caches
        engine.counters = type(engine.counters)(k=engine.counters.k)
        while engine.counters.steps < min_steps or engine.counters.decode_seconds < seconds:
            engine.run(steps=min_steps)
        costs[b] = engine.counters.decode_seconds / engine.counters.emitted_tokens
    return costs


def measured_speedup(steps: Sequence[tuple[int, float, int]],
                     plain_costs: dict[int, float]) -> float | None:
    """Plain time for the same tokens at the same batch sizes over the speculative time.
    `steps`: (rows, decode seconds, emitted tokens) per speculative step."""
    spent = sum(seconds for _, seconds, _ in steps)
    if spent <= 0:
        return None
    plain = sum(tokens * plain_costs[rows] for rows, _, tokens in steps)
    return plain / spent
