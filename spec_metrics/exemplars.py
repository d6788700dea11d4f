"""Exemplar slots with a replacement policy that keeps a spike's exemplar until it is scraped.

prometheus_client keeps the newest exemplar per bucket. Here each bucket (and each counter)
has one slot holding an exemplar, its priority, when it was set and whether an OpenMetrics
scrape has shown it yet. A new exemplar replaces the held one only if the held one was
shown, or the new one has at least its priority, or the held one is older than the hold
time. Slow and outlier steps have the highest priorities, so an ordinary sampled step cannot
wipe the only exemplar of a slow bucket before Prometheus has seen it.

Only the OpenMetrics format carries exemplars, so only an OpenMetrics response marks them
shown: spec_metrics' own /metrics apps do that after rendering (`mark_rendered_shown`). A
classic-text scrape, a `curl` without the Accept header or a test reading the registry
does not. Where /metrics is served by other code, the hold time bounds how long a held
exemplar blocks lower-priority ones.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client.samples import Exemplar

__all__ = ["ExemplarSlots", "PRIORITY", "RenderLog", "mark_rendered_shown"]

# Why the step was traced -> how much its exemplar is worth keeping.
PRIORITY: dict[str, int] = {"ratio": 1, "request": 2, "outlier": 3, "slow": 4}


class ExemplarSlots:
    __slots__ = ("_exemplars", "_priority", "_shown", "_since", "hold")

    def __init__(self, size: int, hold_seconds: float = 60.0) -> None:
        self._exemplars: list[Exemplar | None] = [None] * size
        self._priority = [0] * size
        self._shown = [False] * size
        self._since = [0.0] * size
        self.hold = hold_seconds

    def offer(self, index: int, exemplar: Exemplar, priority: int, now: float) -> bool:
        """Keep `exemplar` in slot `index` if the policy allows; return whether it was kept.
        `now` is time.monotonic()."""
        if (
            self._exemplars[index] is None
            or self._shown[index]
            or priority >= self._priority[index]
            or now - self._since[index] >= self.hold
        ):
            self._exemplars[index] = exemplar
            self._priority[index] = priority
            self._shown[index] = False
            self._since[index] = now
            return True
        return False

    def peek(self, index: int) -> Exemplar | None:
        return self._exemplars[index]

    def mark_shown(self, index: int, exemplar: Exemplar) -> None:
        """An OpenMetrics response showed `exemplar`; newer ones may now replace it."""
        if self._exemplars[index] is exemplar:
            self._shown[index] = True

    def __len__(self) -> int:
        return len(self._exemplars)


class RenderLog:
    """Per thread, the exemplars the last collect() read, so the response that rendered
    them can mark them shown once it knows its format."""

    _instances: "weakref.WeakSet[RenderLog]" = weakref.WeakSet()

    def __init__(self, lock: Any) -> None:
        self._lock = lock  # the collector's: slots change only under it
        self._local = threading.local()
        RenderLog._instances.add(self)

    def _reset_after_fork(self, lock: Any) -> None:
        """In a forked child (the collector's reset): its new lock, nothing recorded."""
        self._lock = lock
        self._local = threading.local()

    def record(self, entries: list[tuple[ExemplarSlots, int, Exemplar]]) -> None:
        self._local.entries = entries

    def mark_shown(self) -> None:
        entries = getattr(self._local, "entries", None)
        if not entries:
            return
        self._local.entries = None
        with self._lock:
            for slots, index, exemplar in entries:
                slots.mark_shown(index, exemplar)


def mark_rendered_shown() -> None:
    """Called by spec_metrics' /metrics apps after an OpenMetrics response, on the thread
    that rendered it."""
    for log in list(RenderLog._instances):
        log.mark_shown()
