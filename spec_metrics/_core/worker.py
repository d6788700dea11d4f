"""The one thread per process that takes finished steps off the engine thread.

Every `SpecDecodeHooks` with `consumer="worker"` (the default) hands its finished steps to a
`PendingSteps` queue and attaches it here. The thread (`spec-metrics-steps`) wakes when a
queue reaches `WAKE_AT` steps or every `INTERVAL_S`, and consumes each queue in chunks of
`CHUNK` steps: checks, trace decisions, span building, aggregation. Between chunks it
sleeps briefly, so that an engine thread waiting for the GIL gets it within about a chunk's
time (tens to hundreds of µs) rather than after CPython's 5 ms switch interval. Most of
its work happens while the engine thread has released the GIL (waiting on the device, or
in torch's kernels).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable

from spec_metrics._core.pending import CHUNK
from spec_metrics._support.forking import reset_after_fork
from spec_metrics._support.log import logger

if TYPE_CHECKING:
    from spec_metrics._core.pending import PendingSteps

__all__ = ["StepWorker", "WORKER", "WAKE_AT", "INTERVAL_S", "CHUNK"]

WAKE_AT = 128  # queued steps that wake the worker at once
INTERVAL_S = 0.05  # otherwise it looks every 50 ms (devices results, quiet engines)
_YIELD_S = 20e-6


class StepWorker:
    def __init__(self) -> None:
        self._queues: "weakref.WeakSet[PendingSteps]" = weakref.WeakSet()
        self._wake = threading.Event()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._at_exit = False
        self.turns = 0  # wake-ups that found work (for tests and benchmarks)
        reset_after_fork(self)

    def _reset_after_fork(self) -> None:
        """In a forked child: the thread does not exist there; start a new one for the
        queues attached (each queue resets itself: the parent's steps are not consumed)."""
        self._wake = threading.Event()
        self._guard = threading.Lock()
        self._thread = None
        if len(self._queues):
            self._start()

    def attach(self, queue: "PendingSteps") -> None:
        with self._guard:
            self._queues.add(queue)
            if self._thread is None or not self._thread.is_alive():
                self._start()
            if not self._at_exit:
                self._at_exit = True
                _before_exit(self.drain_all)

    def drain_all(self) -> None:
        """Consume every queue now (at interpreter exit: the steps of the last moments
        reach the sinks, and their spans the span processor, before it shuts down)."""
        with self._guard:
            queues = list(self._queues)
        for queue in queues:
            try:
                queue.drain()
            except Exception:
                logger.exception("spec_metrics: consuming the last steps at exit failed")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spec-metrics-steps",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait(INTERVAL_S)
            wake.clear()
            with self._guard:
                queues = list(self._queues)
            worked = False
            for queue in queues:
                try:
                    while queue.handed or len(queue):
                        before = len(queue)
                        if not queue.drain(blocking=False, limit=CHUNK):
                            break  # a scrape or flush() is consuming it
                        worked = True
                        if len(queue) >= before:
                            break  # only steps waiting for the device are left
                        time.sleep(_YIELD_S)
                except Exception:  # the thread must survive whatever a sink does
                    logger.exception("spec_metrics: the worker thread failed to hand steps to "
                                     "the sinks (please report)")
            del queues
            if worked:
                self.turns += 1


def _before_exit(callback: Callable[[], None]) -> None:
    """Run `callback` when the interpreter exits, before the atexit handlers (where tracer
    providers shut down): threading's own exit hook where it has one (CPython 3.9+, as
    concurrent.futures uses), else atexit."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(callback)
            return
        except RuntimeError:  # already shutting down
            pass
    import atexit

    atexit.register(callback)


WORKER = StepWorker()
