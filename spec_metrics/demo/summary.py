"""What the demo prints: a live status line and the end-of-run summary.

Fed by the hooks' `on_step` listener, so the figures are the ones the metrics saw; the
engine's own counters supply the token totals.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from spec_metrics._core.sinks import StepResult
from spec_metrics.catalog import STAGES
from spec_metrics.payoff import PayoffTotals, speedup_estimate

__all__ = ["DemoSummary"]

_SLOWEST = 5


class DemoSummary:
    def __init__(self) -> None:
        self.stage_seconds: list[list[float]] = [[] for _ in STAGES]
        self.step_seconds: list[float] = []
        self.traced = 0
        self._slowest: list[tuple[float, int, str | None]] = []  # min-heap of the top steps
        self._window = [0, 0]  # accepted, drafted since the last status line
        # Payoff totals per phase of the run: from the start, then one per scheduled event.
        self.phases: list[tuple[str, PayoffTotals]] = [("from the start", PayoffTotals())]

    def start_phase(self, name: str) -> None:
        """Steps from now on count towards a new phase (e.g. after a draft slowdown)."""
        self.phases.append((name, PayoffTotals()))

    def observe(self, result: StepResult) -> None:
        """The hooks' on_step listener."""
        for index, seconds in enumerate(result.stage_seconds):
            if seconds is not None:
                self.stage_seconds[index].append(seconds)
        if result.step_seconds is not None:
            self.step_seconds.append(result.step_seconds)
            entry = (result.step_seconds, result.index, result.trace_id)
            if len(self._slowest) < _SLOWEST:
                heapq.heappush(self._slowest, entry)
            elif entry > self._slowest[0]:
                heapq.heapreplace(self._slowest, entry)
        if result.trace_id is not None:
            self.traced += 1
        self._window[0] += result.accepted_tokens
        self._window[1] += result.draft_tokens
        if result.step_seconds is not None and result.requests:
            seconds = result.stage_seconds
            drafter = sum(s for i, s in enumerate(seconds)
                          if s is not None and STAGES[i] != "verify")
            self.phases[-1][1].add_step(result.step_seconds, drafter, result.requests,
                                        result.accepted_tokens, result.draft_tokens)

    def payoff_lines(self, measured: list[float | None] | None = None) -> list[str]:
        """One line per phase: the hooks' speedup estimate, and the measured speedup of
        `demo --baseline` where given (one per phase)."""
        lines = []
        for i, (name, totals) in enumerate(self.phases):
            estimate = speedup_estimate(totals)
            text = "-" if estimate is None else f"{estimate[0]:.2f}x" + (
                " (measured baseline)" if estimate[1] == "measured" else " (upper bound)")
            line = f"  {name:<34} estimate {text}"
            if measured is not None:
                value = measured[i]
                line += f"   measured {'-' if value is None else f'{value:.2f}x'}"
            lines.append(line)
        return lines

    def status_line(self, elapsed: float, counters: Any) -> str:
        """One line for a terminal; acceptance over the steps since the last line."""
        accepted, drafted = self._window
        self._window = [0, 0]
        recent = f"{accepted / drafted:.2f}" if drafted else "  - "
        tokens_per_s = counters.emitted_tokens / elapsed if elapsed > 0 else 0.0
        return (f"{elapsed:6.1f}s  steps {counters.steps:6d}  {tokens_per_s:8.1f} tok/s  "
                f"acceptance {recent} (now)  {counters.acceptance_rate:.2f} (run)")

    def render(self, counters: Any, elapsed: float, k: int,
               skipped: dict[str, int] | None = None, withheld: dict[str, int] | None = None,
               spans: dict[str, int] | None = None,
               measured: list[float | None] | None = None) -> str:
        """The summary. `skipped`: steps selected for tracing and not traced, by reason;
        `withheld`: traced steps whose exemplars were withheld, by reason; `spans`: span
        export counts (exported, dropped_<reason>)."""
        lines = ["", "spec-metrics demo summary", "-" * 25]
        tokens_per_s = counters.emitted_tokens / elapsed if elapsed > 0 else 0.0
        mean_length = (1 + counters.accepted_tokens / counters.drafts) if counters.drafts else 1.0
        lines += [
            f"steps                 {counters.steps}  ({elapsed:.1f} s)",
            f"tokens/s              {tokens_per_s:.1f} emitted "
            f"({counters.emitted_tokens} tokens, {counters.requests_finished} requests finished)",
            f"acceptance rate       {counters.acceptance_rate:.3f} "
            f"({counters.accepted_tokens} of {counters.draft_tokens} draft tokens)",
            f"mean accepted length  {mean_length:.2f} tokens per verify (bonus included)",
            f"draft tokens/request  {counters.draft_tokens / counters.verified:.2f} "
            f"(steps without drafts: {counters.steps_without_drafts})"
            if counters.verified else "draft tokens/request  -",
        ]
        by_position = [
            f"{p}: {a / d:.2f}" if d else f"{p}: -"
            for p, (a, d) in enumerate(zip(counters.accepted_per_pos[:k],
                                           counters.draft_tokens_per_pos[:k]))
        ]
        lines.append("acceptance by position " + "  ".join(by_position))
        lines.append("speedup over plain decoding (hooks' estimate"
                     + (", measured against plain greedy decoding)" if measured else ")"))
        lines += self.payoff_lines(measured)
        for stage, values in zip((*STAGES, "step"), (*self.stage_seconds, self.step_seconds)):
            if values:
                p50, p99 = np.percentile(np.asarray(values), [50, 99]) * 1e3
                lines.append(f"{stage + ' latency':<22}p50 {p50:8.3f} ms   p99 {p99:8.3f} ms")
        lines.append(f"steps traced          {self.traced}")
        if skipped is not None:
            lines.append(f"steps not traced      {sum(skipped.values())}  (selected for "
                         f"tracing; {_reasons(skipped)})")
        if spans is not None:
            lost = {key[len("dropped_"):]: n for key, n in spans.items()
                    if key.startswith("dropped_")}
            lines.append(f"spans exported        {spans.get('exported', 0)}  (lost "
                         f"{sum(lost.values())}: {_reasons(lost)})")
        if withheld is not None:
            lines.append(f"exemplars withheld    {sum(withheld.values())} steps  "
                         f"({_reasons(withheld)})")
        lines.append("slowest steps:")
        for seconds, index, trace_id in sorted(self._slowest, reverse=True):
            where = f"trace_id {trace_id}" if trace_id else "not traced"
            lines.append(f"  step {index:6d}  {seconds * 1e3:9.3f} ms  {where}")
        return "\n".join(lines)


def _reasons(counts: dict[str, int]) -> str:
    nonzero = [f"{reason} {n}" for reason, n in counts.items() if n]
    return ", ".join(nonzero) if nonzero else "none"
