"""Fresh state in a forked child.

A child made by `os.fork()` (multiprocessing's "fork" start method, gunicorn-style
pre-fork servers) inherits a copy of every object, including locks that a thread of the
parent held at that instant: that thread does not exist in the child, so such a lock would
never be released there. Objects that hold such state register here; in the child, right
after the fork, each one's `_reset_after_fork()` gives it new locks and empty aggregates,
so the child reports only what it records itself and never waits on the parent's threads.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from spec_metrics._support.log import logger

__all__ = ["keep_forever", "reset_after_fork"]

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
# The parent's CUDA objects (pinned buffers, events) that a child drops: never freed there.
# Freeing one calls into CUDA, which fails in a forked child, and the error escapes a C++
# destructor: the child aborts (SIGABRT; checked with torch 2.11 on an H100). Held, they cost
# nothing, and a child that leaves by os._exit (as multiprocessing's do) never frees them.
_INHERITED: list[Any] = []


def keep_forever(obj: Any) -> None:
    """Keep `obj` referenced for the rest of this (forked child) process."""
    _INHERITED.append(obj)


def reset_after_fork(obj: Any) -> None:
    """Call `obj._reset_after_fork()` in every child forked while `obj` is alive."""
    _LIVE.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_LIVE):
        try:
            obj._reset_after_fork()
        except Exception:  # one object's failure must not leave the others stale
            logger.exception("spec_metrics: resetting %s after fork failed", type(obj).__name__)


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
