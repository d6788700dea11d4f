"""Acceptance by request group: the collector's bounded table of group values, and per
method one row of each acceptance histogram per group value kept.

`GroupTable` belongs to a collector (every method shares it): the first `max_groups`
distinct values recorded get a row each, in the order they are recorded; requests of
further values go to the row of group="other" (the last row, which takes no slot) and are
counted in `folded`. A step's values are looked up all at once (C-speed dict lookups over
the batch's distinct values); only a value seen for the first time while the table has room
costs a Python statement. `GroupedSeries` holds one method's rows: a numpy add per verify
pass, and an exemplar slot per bucket and counter of each (method, group) series.
"""

from __future__ import annotations

from itertools import repeat
from typing import Sequence

import numpy as np
from prometheus_client.samples import Exemplar

from spec_metrics._prometheus.exemplars import ExemplarSlots
from spec_metrics._support.summary import AcceptSummary
from spec_metrics._tracing.step_exemplars import StepExemplars
from spec_metrics.catalog import COUNTERS_WITH_EXEMPLARS, DEFAULT_GROUP, OTHER_LABEL_VALUE

__all__ = ["GroupTable", "GroupedSeries"]

_COUNTERS = len(COUNTERS_WITH_EXEMPLARS)


class GroupTable:
    """Group value -> row, for every method of one collector. Used under its lock."""

    __slots__ = ("max_groups", "other", "names", "_rows", "folded")

    def __init__(self, max_groups: int) -> None:
        self.max_groups = max_groups
        self.other = max_groups  # the row of group="other"
        self.names: list[str] = []  # the value of each row before `other`
        self._rows: dict[str, int] = {OTHER_LABEL_VALUE: self.other}
        self.folded = 0  # requests recorded under "other" because the table was full

    def name(self, row: int) -> str:
        return self.names[row] if row < self.other else OTHER_LABEL_VALUE

    def rows(self, summary: AcceptSummary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows a verify pass adds to, each once, and the accepted-length and
        draft-length histogram rows to add there. A summary without groups (verify_end
        without groups=, or an integration's) counts under group="default"."""
        values: Sequence[str]
        if (summary.groups is None or summary.group_accepted is None
                or summary.group_draft is None):
            values = (DEFAULT_GROUP,) if summary.requests else ()  # no requests, no group
            accepted = summary.accepted_hist[None, :][: len(values)]
            draft = summary.draft_hist[None, :][: len(values)]
        else:
            values = summary.groups
            accepted, draft = summary.group_accepted, summary.group_draft
        rows = np.fromiter(map(self._rows.get, values, repeat(-1)), dtype=np.intp,
                           count=len(values))
        unknown = rows < 0
        if unknown.any():
            self._place(values, rows, unknown, draft)
            at_other = np.flatnonzero(rows == self.other)
            if at_other.size > 1:  # several values share "other": add them up first
                keep = rows != self.other
                rows = np.append(rows[keep], self.other)
                accepted = np.vstack([accepted[keep], accepted[at_other].sum(axis=0)])
                draft = np.vstack([draft[keep], draft[at_other].sum(axis=0)])
        return rows, accepted, draft

    def _place(self, values: Sequence[str], rows: np.ndarray,
               unknown: np.ndarray, draft: np.ndarray) -> None:
        """Give new values rows while the table has room (first seen first); the rest fold
        into "other", their requests counted."""
        new = np.flatnonzero(unknown)
        room = self.max_groups - len(self.names)
        for index in new[:room].tolist():  # at most max_groups values, ever
            row = len(self.names)
            self.names.append(values[index])
            self._rows[values[index]] = rows[index] = row
        folded = new[room:]
        if folded.size:
            rows[folded] = self.other
            self.folded += int(draft[folded].sum())


class GroupedSeries:
    """One method's acceptance histograms, one row per group row of the collector's table,
    and their exemplar slots (per row: K+2 accepted-length buckets, then the counters of
    COUNTERS_WITH_EXEMPLARS)."""

    __slots__ = ("accepted", "draft", "seen", "length_exemplars", "counter_exemplars")

    def __init__(self, max_groups: int, max_k: int, hold: float) -> None:
        rows = max_groups + 1  # the last: "other"
        self.accepted = np.zeros((rows, max_k + 1), dtype=np.int64)
        self.draft = np.zeros((rows, max_k + 1), dtype=np.int64)
        self.seen = np.zeros(rows, dtype=bool)  # rows this method recorded requests in
        self.length_exemplars = ExemplarSlots(rows * (max_k + 2), hold)
        self.counter_exemplars = ExemplarSlots(rows * _COUNTERS, hold)

    def add(self, rows: np.ndarray, accepted: np.ndarray, draft: np.ndarray) -> None:
        """Add a verify pass (`rows` as GroupTable.rows gives them)."""
        np.add.at(self.accepted, rows, accepted)  # cheaper than a[rows] += on a few rows
        np.add.at(self.draft, rows, draft)
        self.seen[rows] = True

    def offer_exemplars(self, rows: np.ndarray, accepted: np.ndarray, draft: np.ndarray,
                        exemplars: StepExemplars, verify_span: str, now: float) -> None:
        """The verify span as exemplar of each bucket and counter a traced step added to,
        per group (a loop over the step's groups, on traced steps only)."""
        width = accepted.shape[1] + 1
        for row, accepted_row, draft_row in zip(rows.tolist(), accepted, draft):
            for length in np.flatnonzero(accepted_row).tolist():
                self.length_exemplars.offer(
                    row * width + length, exemplars.exemplar(verify_span, float(length)),
                    exemplars.priority, now, exemplars.ticket)
            step = AcceptSummary(accepted_row, draft_row)
            increments = (step.drafts, step.draft_tokens, step.accepted, step.emitted)
            for index, value in enumerate(increments):
                self.counter_exemplars.offer(
                    row * _COUNTERS + index, exemplars.exemplar(verify_span, float(value)),
                    exemplars.priority, now, exemplars.ticket)

    def snapshot(self, table: GroupTable, shown: list) -> list[tuple]:
        """Per row recorded, in row order: (group value, accepted hist, draft hist, length
        exemplars, counter exemplars), copied; exemplars read go to `shown`."""
        width = self.accepted.shape[1] + 1
        out = []
        for row in np.flatnonzero(self.seen).tolist():
            out.append((table.name(row), self.accepted[row].copy(), self.draft[row].copy(),
                        _peek(self.length_exemplars, row * width, width, shown),
                        _peek(self.counter_exemplars, row * _COUNTERS, _COUNTERS, shown)))
        return out


def _peek(slots: ExemplarSlots, start: int, size: int, shown: list) -> list[Exemplar | None]:
    exemplars = [slots.peek(i) for i in range(start, start + size)]
    shown.extend((slots, start + i, e) for i, e in enumerate(exemplars) if e is not None)
    return exemplars
