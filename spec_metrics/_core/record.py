"""The per-step record the hooks fill and the sinks consume once."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from spec_metrics._core.cuda_timing import events_done
from spec_metrics.catalog import STAGES

__all__ = ["StepRecord"]


class StepRecord:
    """Timestamps and counts of one decode step. Plain slots: cheap to create and fill."""

    __slots__ = ("index", "method", "starts", "ends", "last_stage", "batch_size", "request_ids",
                 "traceparents", "request_sampled", "accepted", "draft_tokens", "groups",
                 "summary", "gpu_starts", "gpu_ends")

    def __init__(self, index: int, method: str, batch_size: int | None = None,
                 request_ids: Sequence[Any] | None = None,
                 traceparents: Sequence[str | None] | None = None) -> None:
        self.index = index
        self.method = method
        # perf_counter_ns per stage, indexed like STAGES; 0 = not recorded.
        self.starts = [0] * len(STAGES)
        self.ends = [0] * len(STAGES)
        self.last_stage = -1  # the stage started last in this step (index into STAGES)
        self.batch_size = batch_size
        self.request_ids = request_ids
        self.traceparents = traceparents
        self.request_sampled = False  # a request in the batch carries a sampled context
        # Host arrays, or DeviceArray copies still in flight, until the step is resolved.
        self.accepted: Any = None
        self.draft_tokens: Any = None
        # Checked request groups (host values, groups.RequestGroups) kept with counts that
        # are summarized later (device copies, batched steps); None without groups.
        self.groups: Any = None
        self.summary: Any = None  # AcceptSummary once the counts are checked
        # CUDA events per stage with timer="cuda", else None.
        self.gpu_starts: list[Any] | None = None
        self.gpu_ends: list[Any] | None = None

    def pending(self) -> bool:
        """Whether device data of this step has not arrived yet (polls, never waits)."""
        for value in (self.accepted, self.draft_tokens):
            if value is not None and not isinstance(value, (np.ndarray, int)) and not value.ready():
                return True
        if self.gpu_starts is not None:
            return not events_done(self.gpu_starts, self.gpu_ends)  # type: ignore[arg-type]
        return False

    def durations(self) -> tuple[list[float | None], float | None]:
        """Seconds per stage (None where not recorded) and of the step: first recorded
        start to last recorded end."""
        stages: list[float | None] = []
        first = last = 0
        for start, end in zip(self.starts, self.ends):
            if start and end:
                stages.append((end - start) / 1e9)
                if not first or start < first:
                    first = start
                if end > last:
                    last = end
            else:
                stages.append(None)
        return stages, ((last - first) / 1e9 if first else None)
