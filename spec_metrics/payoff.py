"""Is speculation paying off? The speedup estimate over plain decoding, from hook totals.

The recording rule `spec_decode:speedup:...` (spec_metrics.ops.rules) computes the same
number from the same counters in PromQL; the demo prints it. Two cases:

* **Measured baseline.** When the engine ran plain decode steps (K = 0 for the whole batch:
  dynamic speculation at high load, or a deliberate holdout such as the demo's
  `--plain-every`), their cost per token is measured: the plain steps' time without their
  draft and draft_extend stages (a drafter that only caches the token costs nothing in an
  engine that does not speculate), over the tokens they emitted (one per request). The
  speedup is that cost over the cost per token of all steps: step time over emitted tokens.
* **Upper bound** when there are no plain steps. A plain decode step runs the target over
  one token per request; a verify pass runs it over K + 1, so a plain step costs at most a
  step without its draft and draft_extend stages. The estimate is therefore mean emitted
  tokens per request-step (accepted + 1) times (step - draft - draft_extend) / step. It never
  reports a loss when speculation wins; it over-reports the gain where verifying K + 1
  tokens costs clearly more than decoding one (compute-bound targets: CPUs, large batches).
  Below 1 it is certain that speculation loses.

Both exclude what happens outside the stages (scheduling, host bookkeeping) and prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PayoffTotals", "speedup_estimate"]


@dataclass
class PayoffTotals:
    """Sums over a window of steps (seconds, counts), as the hooks record them."""

    step_seconds: float = 0.0
    draft_seconds: float = 0.0  # draft and draft_extend stages together
    requests: int = 0  # requests verified (one emitted token each, plus their accepted)
    accepted: int = 0
    plain_seconds: float = 0.0  # steps without drafts, their draft stages excluded
    plain_tokens: int = 0  # tokens those steps emitted

    def add_step(self, step_seconds: float, drafter_seconds: float, requests: int,
                 accepted: int, draft_tokens: int) -> None:
        """One step: `drafter_seconds` = its draft + draft_extend stage time."""
        self.step_seconds += step_seconds
        self.draft_seconds += drafter_seconds
        self.requests += requests
        self.accepted += accepted
        if draft_tokens == 0 and requests:
            self.plain_seconds += max(0.0, step_seconds - drafter_seconds)
            self.plain_tokens += requests


def speedup_estimate(t: PayoffTotals) -> tuple[float, str] | None:
    """(speedup, "measured" or "upper_bound"), or None without verified steps."""
    emitted = t.requests + t.accepted
    if t.step_seconds <= 0 or emitted == 0:
        return None
    if t.plain_tokens > 0 and t.plain_seconds > 0:
        return (t.plain_seconds / t.plain_tokens) / (t.step_seconds / emitted), "measured"
    per_request = emitted / t.requests
    return per_request * (t.step_seconds - t.draft_seconds) / t.step_seconds, "upper_bound"
