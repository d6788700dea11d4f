"""`demo --baseline`: the measured speedup of speculation over plain greedy decoding.

The hooks' payoff estimate (spec_metrics.payoff) is checked against a measurement that
shares nothing with it. After every speculative step of b requests, a plain greedy engine
(no drafter, K = 0) running the same workload generator with a full batch of b takes one
step, and both are timed by wall clock (decode only: prefill of joining requests excluded,
host bookkeeping included). Interleaved step by step, so both see the same machine (a
shared CPU drifts by tens of percent within a minute), and batch-matched, because per-token
cost falls steeply with batch size: an unmatched comparison would measure batching, not
speculation. The measured speedup of a phase is the plain time for the speculative steps'
tokens at their batch sizes over the speculative steps' time. Plain steps of a drafter-free
engine do not slow down with the drafter (`--draft-slowdown-at`), as plain decoding would
not.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Optional

__all__ = ["InterleavedBaseline"]

WARM_UP_STEPS = 5  # first steps of each plain engine: allocation and cold caches


class InterleavedBaseline:
    """Plain engines, one per batch size, stepped after each speculative step."""

    def __init__(self, config: Any, device: str, seed: int = 0) -> None:
        self._config = dataclasses.replace(
            config, arrival_rate=None, num_requests=None, dynamic_k=False, plain_every=0,
            report_groups=False, seed=seed + 1)
        self._device, self._seed = device, seed
        self._engines: dict[int, Any] = {}
        # per phase: plain seconds and tokens per batch size; speculative tokens per batch
        # size and seconds.
        self._phases: list[dict[str, Any]] = []
        self.start_phase()

    def start_phase(self) -> None:
        self._phases.append({"plain_s": defaultdict(float), "plain_tok": defaultdict(int),
                             "spec_tok": defaultdict(int), "spec_s": 0.0})

    def _engine(self, rows: int) -> Any:
        engine = self._engines.get(rows)
        if engine is None:
            from spec_metrics.demo.factory import build_engine

            engine = build_engine("none", device=self._device, seed=self._seed,
                                  config=dataclasses.replace(self._config, batch_size=rows))
            engine.run(steps=WARM_UP_STEPS)
            self._engines[rows] = engine
        return engine

    def after_step(self, rows: int, seconds: float, tokens: int) -> None:
        """A speculative step of `rows` requests took `seconds` for `tokens` tokens: time one
        plain step with a batch of `rows`."""
        phase = self._phases[-1]
        phase["spec_tok"][rows] += tokens
        phase["spec_s"] += seconds
        engine = self._engine(rows)
        counters = engine.counters
        before_s, before_tok = counters.decode_seconds, counters.emitted_tokens
        engine.step()
        phase["plain_s"][rows] += counters.decode_seconds - before_s
        phase["plain_tok"][rows] += counters.emitted_tokens - before_tok

    def speedups(self) -> list[Optional[float]]:
        """Measured speedup per phase (None for a phase without steps)."""
        out: list[Optional[float]] = []
        for phase in self._phases:
            if phase["spec_s"] <= 0:
                out.append(None)
                continue
            plain = sum(tokens * phase["plain_s"][rows] / phase["plain_tok"][rows]
                        for rows, tokens in phase["spec_tok"].items()
                        if phase["plain_tok"][rows])
            out.append(plain / phase["spec_s"])
        return out
