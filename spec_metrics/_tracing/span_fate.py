"""Whether a traced step's spans were really exported, so that its exemplars may be shown.

The trace sink makes one `ExportTicket` per traced step and ends the step's spans while the
ticket is current (`set_current`). A `SpanExportProcessor`, whose `on_end` runs inside
`span.end()` on the same thread, takes the current ticket with each span it queues and later
reports the span's fate from its export thread: exported, or lost (queue full, export failed
or timed out, shutdown). The collector shows the step's exemplars only once the ticket is
EXPORTED, or UNTRACKED when no fate-reporting processor saw its spans (an SDK
BatchSpanProcessor, an in-memory exporter: the library cannot know). A LOST ticket's
exemplars are never shown; the loss is counted once, through `on_lost`.

Only traced steps (about 1% by default) make tickets, so a module-wide lock is cheap.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

__all__ = ["ExportTicket", "PENDING", "EXPORTED", "LOST", "UNTRACKED", "current", "set_current"]

PENDING, EXPORTED, LOST, UNTRACKED = "pending", "exported", "lost", "untracked"

_lock = threading.Lock()
_local = threading.local()


class ExportTicket:
    """The export fate of one traced step's spans."""

    __slots__ = ("state", "_waiting", "_seen", "_sealed", "_on_lost")

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        self.state = PENDING
        self._waiting = 0  # spans queued by fate-reporting processors, not yet resolved
        self._seen = 0  # spans queued by fate-reporting processors, in all
        self._sealed = False  # every span of the step has ended: no more will be queued
        self._on_lost = on_lost

    @property
    def visible(self) -> bool:
        """Whether exemplars made from this step may be shown now."""
        return self.state == EXPORTED or self.state == UNTRACKED

    def expect(self) -> None:
        """A fate-reporting processor queued one span of this step."""
        with _lock:
            self._waiting += 1
            self._seen += 1

    def exported(self, spans: int = 1) -> None:
        """`spans` spans of this step were accepted by an exporter."""
        with _lock:
            self._waiting -= spans
            if self._sealed and self._waiting == 0 and self.state == PENDING:
                self.state = EXPORTED

    def lost(self, spans: int = 1) -> None:
        """`spans` spans of this step will never be exported; its exemplars are withheld."""
        with _lock:
            self._waiting -= spans
            first = self.state == PENDING
            self.state = LOST
        if first and self._on_lost is not None:
            self._on_lost()

    def seal(self) -> None:
        """All the step's spans have ended (called by the trace sink)."""
        with _lock:
            self._sealed = True
            if self.state == PENDING and self._waiting == 0:
                self.state = EXPORTED if self._seen else UNTRACKED

    def __repr__(self) -> str:
        return f"ExportTicket({self.state}, waiting={self._waiting})"


def current() -> ExportTicket | None:
    """The ticket of the step whose spans this thread is ending, if any."""
    return getattr(_local, "ticket", None)


def set_current(ticket: ExportTicket | None) -> None:
    _local.ticket = ticket


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
