"""Stage timing from CUDA events, read later without synchronizing the device.

On a GPU the hooks run when work is *enqueued*; the CPU clock says little about how long
the device spent on a stage. With `timer="cuda"` each stage boundary also records a CUDA
event on the current stream. A finished step waits in the hooks' queue until its last
event has completed (`event.query()`, polled at later steps), then durations come from
`elapsed_time` between events. Events are pooled: creating them costs more than reusing.
"""

from __future__ import annotations

from typing import Any

from spec_metrics._support.forking import keep_forever

__all__ = ["CudaEventTimer", "StreamLookup"]


class StreamLookup:
    """`torch.cuda.current_stream(device)`, minus most of its cost.

    The public call builds a new Python Stream object every time (about 6 µs of the 9 µs an
    `Event.record()` costs). Here the current stream's id is read through torch's C binding
    (`torch._C._cuda_getCurrentStream`, what current_stream() itself calls) and the Stream
    object is reused while the id is unchanged, so an engine that switches streams still
    gets its events on the stream current at the hook. Without that binding (another torch
    version), it falls back to the public call.
    """

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._raw = getattr(torch._C, "_cuda_getCurrentStream", None)
        self._cached: dict[int, tuple[Any, Any]] = {}  # device index -> (stream data, stream)

    def current(self, device_index: int | None = None) -> Any:
        torch = self._torch
        if self._raw is None:
            return torch.cuda.current_stream(device_index)
        index = torch.cuda.current_device() if device_index is None else device_index
        data = self._raw(index)
        cached = self._cached.get(index)
        if cached is not None and cached[0] == data:
            return cached[1]
        stream = torch.cuda.current_stream(index)
        self._cached[index] = (data, stream)
        return stream


class CudaEventTimer:
    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("spec_metrics: timer='cuda' needs a CUDA device, and torch sees "
                             "none; use timer='cpu'")
        self._torch = torch
        self._free: list[Any] = []
        self._streams = StreamLookup(torch)

    def _reset_after_fork(self) -> None:
        """In a forked child: set the parent's events aside, unfreed (forking.py says why)."""
        keep_forever((self._free, self._streams))
        self._free = []
        self._streams = StreamLookup(self._torch)

    def mark(self) -> Any:
        """Record an event on the current stream now (asynchronous)."""
        event = self._free.pop() if self._free else self._torch.cuda.Event(enable_timing=True)
        event.record(self._streams.current())
        return event

    def reserve(self, count: int) -> None:
        while len(self._free) < count:
            self._free.append(self._torch.cuda.Event(enable_timing=True))

    def release(self, events: list[Any]) -> None:
        self._free.extend(e for e in events if e is not None)


def events_done(starts: list[Any], ends: list[Any]) -> bool:
    """Whether every recorded event has completed (polls, never waits)."""
    for event in (*starts, *ends):
        if event is not None and not event.query():
            return False
    return True


def wait_events(starts: list[Any], ends: list[Any]) -> None:
    for event in (*starts, *ends):
        if event is not None:
            event.synchronize()


def gpu_times_ns(starts: list[Any], ends: list[Any],
                 cpu_starts: list[int]) -> tuple[list[int], list[int]]:
    """Stage start/end times on the CPU clock's scale, from completed events.

    The first recorded start event is anchored at the CPU time of its hook; every other
    boundary is placed by the device time elapsed since that event. Stages without both
    events get 0 (not recorded).
    """
    anchor_index = next((i for i, e in enumerate(starts) if e is not None and ends[i] is not None),
                        None)
    out_starts = [0] * len(starts)
    out_ends = [0] * len(ends)
    if anchor_index is None:
        return out_starts, out_ends
    anchor_event, anchor_ns = starts[anchor_index], cpu_starts[anchor_index]
    for index, (start, end) in enumerate(zip(starts, ends)):
        if start is None or end is None:
            continue
        # elapsed_time is in milliseconds with ~0.5 µs resolution
        out_starts[index] = anchor_ns + round(anchor_event.elapsed_time(start) * 1e6)
        out_ends[index] = anchor_ns + round(anchor_event.elapsed_time(end) * 1e6)
    return out_starts, out_ends
