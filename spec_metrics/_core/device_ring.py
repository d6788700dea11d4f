"""CUDA counts handed over with one device-side copy per step, read back in blocks.

The per-step path of `DeviceArray` queues, on the engine thread, an event on the engine's
stream, a wait and a device-to-host copy on a side stream, a `record_stream`, a second
event, and at `end_step` a wait of the engine's stream for that copy: six CUDA calls, slow
while the launch queue is busy (tens of µs each on an H200 between graph replays), and a
dependency of the engine's stream on the side stream every step.

With the worker consuming steps, a `DeviceRing` replaces that with a single call on the
engine thread: the tensor is copied, on the engine's own stream, into a row of a device
buffer that belongs to spec_metrics (`ring[row, :n].copy_(tensor)`). The engine may reuse
its tensor at once: the copy is ordered before anything it queues next, and nothing of
ours ever makes its stream wait. The consumer (worker thread, scrape, flush) copies the
rows written so far to pinned host memory in one block, on a side stream, after an event it
records on the engine's stream, and reads a row once that block's copy has completed.

A row is written again only after it was read (or dropped) by the consumer; when every row
still waits (a stalled consumer), or a batch is wider than the rows, or the counts are not
integers, the hooks fall back to `DeviceArray` for that step.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from spec_metrics._core.cuda_timing import StreamLookup
from spec_metrics._core.inputs import DeviceArray, _check_array
from spec_metrics._support.forking import keep_forever

__all__ = ["DeviceRing", "DeviceRings", "RingSlot"]

# Count tensors in flight between the engine thread and the consumer. The worker wakes
# every 128 steps or 50 ms and reads a block one turn after it queued its copy: a step
# with per-request drafts takes two rows, so up to ~2 x 256 rows wait at high step rates.
ROWS = 1024


class DeviceRing:
    """Rows of int64 counts on one device, their pinned host twin, and the block copies.

    `put()` runs on the engine thread; every other method runs on the consumer that holds
    the hooks' PendingSteps lock (one at a time). The two sides share `written` (engine
    side) and `_freed` (consumer side), each written by one side only.
    """

    def __init__(self, torch: Any, device_index: int, width: int,
                 streams: StreamLookup | None = None) -> None:
        self._torch = torch
        self.device_index = device_index
        self.width = width
        device = torch.device("cuda", device_index)
        self._device_rows = torch.zeros((ROWS, width), dtype=torch.int64, device=device)
        self._host_rows = torch.zeros((ROWS, width), dtype=torch.int64, pin_memory=True)
        self._host = self._host_rows.numpy()
        self._side = torch.cuda.Stream(device=device)
        # Freed memory must wait for our side-stream reads (the ring outlives the copies
        # unless the hooks are dropped with copies in flight).
        self._device_rows.record_stream(self._side)
        self._views = [self._device_rows[row] for row in range(ROWS)]
        self._streams = streams or StreamLookup(torch)
        self._row_stream: list[Any] = [None] * ROWS  # the stream each row was written on
        self.written = 0  # rows whose device copy was queued (engine thread only)
        self._issued = 0  # rows whose block copy to the host was queued (consumer)
        self._freed = 0  # rows read or dropped, in order (consumer)
        self._done = [False] * ROWS  # read or dropped, not yet counted in _freed
        self._blocks: deque[tuple[int, Any]] = deque()  # (end row seq, event), in order
        self._events: list[Any] = []  # completed events, reused
        self._landed = 0  # rows before this one are known to be on the host (consumer)

    # ---- engine thread -------------------------------------------------------------------

    def put(self, tensor: Any, what: str) -> "RingSlot | None":
        """Queue the copy of a 1-D integer CUDA tensor into the next row; None (nothing
        queued) if it does not fit or every row still waits for the consumer."""
        length = int(tensor.shape[0])
        seq = self.written
        if length > self.width or seq - self._freed >= ROWS \
                or tensor.device.index != self.device_index:
            return None
        row = seq % ROWS
        stream = self._streams.current(self.device_index)
        self._views[row][:length].copy_(tensor)
        self._row_stream[row] = stream
        self.written = seq + 1
        return RingSlot(self, seq, length, what)

    # ---- consumer ------------------------------------------------------------------------

    def _event(self) -> Any:
        return self._events.pop() if self._events else self._torch.cuda.Event()

    def _issue(self) -> None:
        """Copy every row written and not yet copied to the host, as one block."""
        start, end = self._issued, self.written
        if end <= start:
            return
        torch, side = self._torch, self._side
        waited: set[int] = set()
        for seq in range(start, end):
            stream = self._row_stream[seq % ROWS]
            if id(stream) not in waited:
                waited.add(id(stream))
                written = self._event()
                written.record(stream)
                side.wait_event(written)
                self._events.append(written)  # the wait captured it: reusable
        first, last = start % ROWS, (end - 1) % ROWS
        with torch.cuda.stream(side):
            if first <= last:
                self._host_rows[first:last + 1].copy_(self._device_rows[first:last + 1],
                                                      non_blocking=True)
            else:  # the block wraps around the ring
                self._host_rows[first:].copy_(self._device_rows[first:], non_blocking=True)
                self._host_rows[:last + 1].copy_(self._device_rows[:last + 1],
                                                 non_blocking=True)
        copied = self._event()
        copied.record(side)
        self._blocks.append((end, copied))
        self._issued = end

    def _block(self, seq: int) -> tuple[int, Any]:
        if seq >= self._issued:
            self._issue()
        for block in self._blocks:
            if seq < block[0]:
                return block
        raise AssertionError(f"row {seq} was never copied")  # unreachable: _issue covers it

    def ready(self, seq: int) -> bool:
        # One query per block, not per row: the rows of a block land together.
        if seq < self._landed:
            return True
        end, event = self._block(seq)
        if not event.query():
            return False
        self._landed = end
        return True

    def wait(self, seq: int) -> None:
        end, event = self._block(seq)
        event.synchronize()
        self._landed = max(self._landed, end)

    def read(self, seq: int, length: int) -> np.ndarray:
        array = np.array(self._host[seq % ROWS, :length])  # a copy: the row is reused
        self.release(seq)
        return array

    def release(self, seq: int) -> None:
        """Row `seq` is no longer needed; rows are reused in order once all before are."""
        self._done[seq % ROWS] = True
        while self._freed < self.written and self._done[self._freed % ROWS]:
            self._done[self._freed % ROWS] = False
            self._freed += 1
        blocks = self._blocks
        while blocks and blocks[0][0] <= self._freed:
            self._events.append(blocks.popleft()[1])  # completed (its rows were read)


class RingSlot(DeviceArray):
    """One step's counts in a DeviceRing row: a DeviceArray to the rest of the library."""

    __slots__ = ("_ring", "_seq")

    def __init__(self, ring: DeviceRing, seq: int, length: int, what: str) -> None:
        # No DeviceArray.__init__: nothing is copied per step, the ring does it in blocks.
        self._ring = ring
        self._seq = seq
        self.length = length
        self.what = what

    def release_source(self) -> None:
        pass  # the copy ran on the engine's stream: its tensor is free already

    def ready(self) -> bool:
        return self._ring.ready(self._seq)

    def wait(self) -> None:
        self._ring.wait(self._seq)

    def discard(self) -> None:
        self._ring.release(self._seq)

    def result(self) -> np.ndarray:
        return _check_array(self._ring.read(self._seq, self.length), self.what)

    def take(self) -> np.ndarray:
        """The landed row as it is (int64, unchecked), for a consumer that checks a batch of
        steps at once; the row is free afterwards."""
        return self._ring.read(self._seq, self.length)


class DeviceRings:
    """The hooks' rings, one per device, made at warm-up or on the first CUDA counts."""

    def __init__(self) -> None:
        self._rings: dict[int, DeviceRing] = {}
        self._streams: StreamLookup | None = None

    def reserve(self, device_index: int, width: int) -> None:
        ring = self._rings.get(device_index)
        if ring is None or ring.width < width:
            import torch

            if self._streams is None:
                self._streams = StreamLookup(torch)
            # A narrower ring being replaced keeps its rows in flight until they are read.
            self._rings[device_index] = DeviceRing(torch, device_index, width, self._streams)

    def put(self, tensor: Any, what: str) -> RingSlot | None:
        """The tensor's counts in a ring row, or None: the caller copies them itself."""
        if tensor.dtype.is_floating_point:
            return None  # float counts are checked as floats on the host (inputs.py)
        index = tensor.device.index
        ring = self._rings.get(index)
        if ring is None:
            self.reserve(index, max(256, 1 << (int(tensor.shape[0]) - 1).bit_length()))
            ring = self._rings[index]
        return ring.put(tensor, what)

    def _reset_after_fork(self) -> None:
        """In a forked child: set the parent's rings aside, unfreed (forking.py says why)."""
        keep_forever((self._rings, self._streams))
        self._rings = {}
        self._streams = None
