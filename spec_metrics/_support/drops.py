"""Rejected input: counted by reason, warned about at a bounded rate, or raised in strict mode."""

from __future__ import annotations

import threading
import time

from spec_metrics._support.log import logger
from spec_metrics.catalog import DROP_REASONS

__all__ = ["DropCounter", "InputRejected", "StrictModeError", "Tally"]



class InputRejected(Exception):
    """Raised inside the library to abandon one input; never escapes a hook in default mode."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class StrictModeError(ValueError):
    """Bad input in strict mode. A ValueError whose message names the hook and the value."""


class DropCounter:
    """Counts rejected inputs per reason; shared by every hooks object of one collector.

    Counts are plain ints read by the scrape thread without a lock (a dict read is atomic).
    They are bumped under a lock: `counts[key] += 1` is a read and a write that two engine
    threads sharing a collector could interleave; rejections are rare, the lock is cheap.
    """

    def __init__(self, warn_interval_seconds: float = 60.0) -> None:
        self.counts: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._interval = warn_interval_seconds
        self._last_warned: dict[str, float] = {}
        self._since_warned: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._lock = threading.Lock()

    def _reset_after_fork(self) -> None:
        """In a forked child (the collector's reset): zero counts and a new lock."""
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(DROP_REASONS, 0)
        self._last_warned = {}
        self._since_warned = dict.fromkeys(DROP_REASONS, 0)

    def count(self, reason: str) -> None:
        """Count one drop without a warning (the caller logs, e.g. with the traceback)."""
        with self._lock:
            self.counts[reason] += 1

    def reject(self, hook: str, reason: str, message: str, strict: bool = False) -> None:
        """Count one rejected input; raise ValueError in strict mode, else warn (rate limited)."""
        if reason not in self.counts:
            reason = "internal_error"
        text = f"spec_metrics.{hook}: {message}"
        with self._lock:
            self.counts[reason] += 1
            if strict:
                raise StrictModeError(text)
            self._since_warned[reason] += 1
            now = time.monotonic()
            last = self._last_warned.get(reason)
            if last is not None and now - last < self._interval:
                return
            suppressed = self._since_warned[reason] - 1
            self._since_warned[reason] = 0
            self._last_warned[reason] = now
        tail = f" ({suppressed} more like it since the last warning)" if suppressed else ""
        logger.warning(
            "%s — input dropped, counted in spec_metrics_dropped_total{reason=%r}%s; "
            "further warnings for this reason at most every %gs",
            text, reason, tail, self._interval,
        )


class Tally:
    """Counts by reason of what the library decided not to do (a step not traced, an
    exemplar withheld), for /metrics. Bumped under a lock: engine threads sharing a
    collector and export threads both count; read without it (a dict read is atomic)."""

    def __init__(self, reasons: tuple[str, ...] | dict[str, str]) -> None:
        self.counts: dict[str, int] = dict.fromkeys(reasons, 0)
        self._lock = threading.Lock()

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.counts[reason] += n

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.counts, 0)
