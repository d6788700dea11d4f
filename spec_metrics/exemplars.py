"""Exemplar slots with a replacement policy that keeps a spike's exemplar until it is scraped.

prometheus_client keeps the newest exemplar per bucket. Here each bucket (and each counter)
has one slot holding an exemplar, its priority and whether a scrape has shown it yet. A new
exemplar replaces the held one only if the held one was already scraped, or the new one has
at least its priority. Outlier steps have the highest priority, so an ordinary sampled step
cannot wipe the only exemplar of a slow bucket before Prometheus has seen it.
"""

from __future__ import annotations

from prometheus_client.samples import Exemplar

__all__ = ["ExemplarSlots", "PRIORITY"]

# Why the step was traced -> how much its exemplar is worth keeping.
PRIORITY: dict[str, int] = {"ratio": 1, "request": 2, "outlier": 3}


class ExemplarSlots:
    __slots__ = ("_exemplars", "_priority", "_shown")

    def __init__(self, size: int) -> None:
        self._exemplars: list[Exemplar | None] = [None] * size
        self._priority = [0] * size
        self._shown = [False] * size

    def offer(self, index: int, exemplar: Exemplar, priority: int) -> bool:
        """Keep `exemplar` in slot `index` if the policy allows; return whether it was kept."""
        if (
            self._exemplars[index] is None
            or self._shown[index]
            or priority >= self._priority[index]
        ):
            self._exemplars[index] = exemplar
            self._priority[index] = priority
            self._shown[index] = False
            return True
        return False

    def take(self, index: int) -> Exemplar | None:
        """The exemplar to expose now; marks it shown so newer ones may replace it."""
        exemplar = self._exemplars[index]
        if exemplar is not None:
            self._shown[index] = True
        return exemplar

    def __len__(self) -> int:
        return len(self._exemplars)
