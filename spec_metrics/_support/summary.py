"""One verify pass reduced to two histograms: what both sinks (metrics and spans) read.

Made by `spec_metrics._core.inputs.summarize` once the accepted counts are checked; a
plain value, so that the tracing and metrics layers depend on it and not on the hooks.
"""

from __future__ import annotations

from operator import mul
from typing import Sequence

import numpy as np

__all__ = ["AcceptSummary"]


class AcceptSummary:
    """One verify pass, reduced to histograms over draft length and accepted length; with
    request groups, also one row of each histogram per group value of the batch."""

    __slots__ = ("accepted_hist", "draft_hist", "requests", "accepted", "draft_tokens", "drafts",
                 "groups", "group_accepted", "group_draft")

    def __init__(self, accepted_hist: np.ndarray, draft_hist: np.ndarray,
                 groups: Sequence[str] | None = None, group_accepted: np.ndarray | None = None,
                 group_draft: np.ndarray | None = None) -> None:
        # accepted_hist[i]: requests that accepted exactly i tokens;
        # draft_hist[k]: requests that were given exactly k draft tokens.
        self.accepted_hist = accepted_hist
        self.draft_hist = draft_hist
        # Python ints on K+1 values beat numpy's per-call overhead here.
        accepted, drafted = accepted_hist.tolist(), draft_hist.tolist()
        self.requests = sum(drafted)
        self.accepted = sum(map(mul, accepted, range(len(accepted))))
        self.draft_tokens = sum(map(mul, drafted, range(len(drafted))))
        self.drafts = self.requests - drafted[0]
        # The distinct group values of the batch (first seen first), and per value a row of
        # each histogram (shape: groups x K+1; the rows sum to the histograms above). None
        # when verify_end had no groups.
        self.groups = groups
        self.group_accepted = group_accepted
        self.group_draft = group_draft

    @property
    def emitted(self) -> int:
        return self.accepted + self.requests

    @staticmethod
    def per_position(hist: np.ndarray) -> list[int]:
        """Per position p (0..K-1), the requests whose value exceeds p: sum(hist[p+1:])."""
        out: list[int] = []
        running = 0
        for count in reversed(hist.tolist()[1:]):
            running += count
            out.append(running)
        out.reverse()
        return out
