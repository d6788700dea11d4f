"""Finished steps waiting for their device results, handed to the sinks in step order.

A step whose accepted counts are a CUDA tensor, or whose stages were timed with CUDA events,
cannot be read when it ends without synchronizing the device. It waits here; every later
`end_step()` (or `poll()`) polls the oldest one and passes on those whose copies and events
have completed. The queue is bounded: past the limit the oldest step is dropped, never
waited for.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from spec_metrics._core.cuda_timing import wait_events
from spec_metrics._core.inputs import DeviceArray
from spec_metrics._core.record import StepRecord
from spec_metrics._support.forking import keep_forever

__all__ = ["PendingSteps"]


class PendingSteps:
    """`batch`: finished steps are passed on once this many wait (see HooksConfig.batch_steps);
    1 passes each on at its own end_step."""

    def __init__(self, consume: Callable[[StepRecord], None], limit: int,
                 reject: Callable[[str, str, str], None], batch: int = 1) -> None:
        self._consume = consume
        self._limit = limit
        self._reject = reject
        self._batch = batch
        self._queue: deque[StepRecord] = deque()

    def _reset_after_fork(self) -> None:
        """In a forked child: set the parent's queued steps aside, unread and unfreed (their
        device data cannot be read nor freed here, see forking.py; the parent reports them)."""
        keep_forever(self._queue)
        self._queue = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, record: StepRecord) -> None:
        """Pass a finished step on now if nothing is waiting and steps are not batched, else
        queue it (in order) and pass on what is ready once a batch is complete."""
        queue = self._queue
        if self._batch == 1 and not queue and not record.pending():
            self._consume(record)
            return
        if record.pending() and len(queue) >= self._limit:
            self.drain()  # ready steps first: only device waits may be dropped
            if len(queue) >= self._limit:
                _discard_device_data(queue.popleft())
                self._reject("end_step", "pending_overflow",
                             f"more than {self._limit} steps wait for device results; the "
                             "oldest was dropped (is the device stream stalled?)")
        queue.append(record)  # in order behind older ones
        if len(queue) >= self._batch:
            self.drain()

    def drain(self) -> None:
        """Pass on the steps at the head whose device results have landed (never waits)."""
        queue = self._queue
        while queue and not queue[0].pending():
            self._consume(queue.popleft())

    def flush(self) -> None:
        """Wait for every queued step's device results and pass them all on (shutdown)."""
        while self._queue:
            record = self._queue.popleft()
            for value in (record.accepted, record.draft_tokens):
                if isinstance(value, DeviceArray):
                    value.wait()
            if record.gpu_starts is not None:
                wait_events(record.gpu_starts, record.gpu_ends)  # type: ignore[arg-type]
            self._consume(record)


def _discard_device_data(record: StepRecord) -> None:
    for value in (record.accepted, record.draft_tokens):
        if isinstance(value, DeviceArray):
            value.discard()
