"""Exemplar slots with a replacement policy that keeps a spike's exemplar until it is scraped,
and shows an exemplar only once the spans it points at were exported.

prometheus_client keeps the newest exemplar per bucket. Here each bucket (and each counter)
has one slot. A slot holds a *visible* exemplar (its spans are known to be exported, or
their fate cannot be known) and at most one *candidate* whose spans are still in the export
queue (span_fate.py). A new exemplar becomes the candidate only if it may replace both: a
held exemplar is replaced when it was shown, or the new one has at least its priority, or
the held one is older than the hold time. Slow and outlier steps have the highest
priorities, so an ordinary sampled step cannot wipe the only exemplar of a slow bucket
before Prometheus has seen it. A scrape settles candidates: exported ones become visible,
lost ones are discarded (the loss is counted by the ticket) and the visible one stays.

Only the OpenMetrics format carries exemplars, so only an OpenMetrics response marks them
shown: spec_metrics' own /metrics apps mark the exemplars of the response they sent (see
`ShownExemplars`). A classic-text scrape, a `curl` without the Accept header or a test
reading the registry does not. Where /metrics is served by other code, the hold time bounds
how long a held exemplar blocks lower-priority ones.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.samples import Exemplar

from spec_metrics._tracing.span_fate import LOST, ExportTicket

__all__ = ["ExemplarSlots", "ShownExemplars"]


class ExemplarSlots:
    __slots__ = ("_exemplars", "_priority", "_shown", "_since", "_candidate", "_ticket",
                 "_candidate_priority", "_candidate_since", "hold")

    def __init__(self, size: int, hold_seconds: float = 60.0) -> None:
        self._exemplars: list[Exemplar | None] = [None] * size
        self._priority = [0] * size
        self._shown = [False] * size
        self._since = [0.0] * size
        self._candidate: list[Exemplar | None] = [None] * size
        self._ticket: list[ExportTicket | None] = [None] * size
        self._candidate_priority = [0] * size
        self._candidate_since = [0.0] * size
        self.hold = hold_seconds

    def offer(self, index: int, exemplar: Exemplar, priority: int, now: float,
              ticket: ExportTicket | None = None) -> bool:
        """Keep `exemplar` in slot `index` if the policy allows; return whether it was kept.
        `now` is time.monotonic(); `ticket` tells when its spans were exported (None: at
        once)."""
        if self._candidate[index] is not None:
            self._settle(index)
        held = self._exemplars[index]
        if held is not None and not (self._shown[index] or priority >= self._priority[index]
                                     or now - self._since[index] >= self.hold):
            return False
        if self._candidate[index] is not None and not (
                priority >= self._candidate_priority[index]
                or now - self._candidate_since[index] >= self.hold):
            return False
        self._candidate[index] = exemplar
        self._ticket[index] = ticket
        self._candidate_priority[index] = priority
        self._candidate_since[index] = now
        if ticket is None or ticket.visible:
            self._settle(index)
        return True

    def _settle(self, index: int) -> None:
        ticket = self._ticket[index]
        if ticket is not None and not ticket.visible:
            if ticket.state != LOST:
                return  # still in the export queue
            self._candidate[index] = self._ticket[index] = None
            return
        self._exemplars[index] = self._candidate[index]
        self._priority[index] = self._candidate_priority[index]
        self._since[index] = self._candidate_since[index]
        self._shown[index] = False
        self._candidate[index] = self._ticket[index] = None

    def peek(self, index: int) -> Exemplar | None:
        """The exemplar a scrape may show now (candidates settled first)."""
        if self._candidate[index] is not None:
            self._settle(index)
        return self._exemplars[index]

    def mark_shown(self, index: int, exemplar: Exemplar) -> None:
        """An OpenMetrics response showed `exemplar`; newer ones may now replace it."""
        if self._exemplars[index] is exemplar:
            self._shown[index] = True

    def __len__(self) -> int:
        return len(self._exemplars)


class ShownExemplars:
    """The exemplars one rendered response carries, to be marked shown once it was sent as
    OpenMetrics. One object per response, so overlapping scrapes (threads, or one event
    loop) never mark each other's."""

    __slots__ = ("_lock", "_entries")

    def __init__(self, lock: Any, entries: list[tuple[ExemplarSlots, int, Exemplar]]) -> None:
        self._lock = lock  # the collector's: slots change only under it
        self._entries = entries

    def mark(self) -> None:
        entries, self._entries = self._entries, []
        if entries:
            with self._lock:
                for slots, index, exemplar in entries:
                    slots.mark_shown(index, exemplar)
