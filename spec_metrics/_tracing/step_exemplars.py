"""Where a traced step's spans are: what the metrics side needs to attach exemplars.

Made by the trace sink for each traced step whose spans the SDK sampled, handed with the
step to the collector. `priority` says how much its exemplars are worth keeping (slow and
outlier steps most); `ticket` says whether the spans were exported yet.
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client.samples import Exemplar

from spec_metrics._tracing.span_fate import ExportTicket

__all__ = ["PRIORITY", "StepExemplars"]

# Why the step was traced -> how much its exemplar is worth keeping.
PRIORITY: dict[str, int] = {"ratio": 1, "request": 2, "outlier": 3, "slow": 4}


class StepExemplars:
    """Where a traced step's spans are, so its observations can carry exemplars."""

    __slots__ = ("trace_id", "step_span_id", "stage_span_ids", "priority", "timestamp",
                 "ticket")

    def __init__(self, trace_id: str, step_span_id: str, stage_span_ids: Sequence[str | None],
                 priority: int, timestamp: float, ticket: ExportTicket | None = None) -> None:
        self.trace_id = trace_id
        self.step_span_id = step_span_id
        self.stage_span_ids = stage_span_ids  # indexed like STAGES
        self.priority = priority
        self.timestamp = timestamp  # seconds since the epoch, the step's end
        self.ticket = ticket  # whether the spans were exported yet (None: assume so)

    def exemplar(self, span_id: str, value: float) -> Exemplar:
        return Exemplar({"trace_id": self.trace_id, "span_id": span_id}, value, self.timestamp)
