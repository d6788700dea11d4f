"""Turning what an engine passes to `verify_end` into checked integer counts.

Accepted counts arrive as a list, a numpy array or a torch tensor (CPU or CUDA). Everything
here is vectorized: a handful of numpy calls per step, whatever the batch size. torch is
never imported; a tensor is recognised by duck typing, so `import spec_metrics` stays light.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from spec_metrics._core.groups import RequestGroups, group_histograms
from spec_metrics._support.drops import InputRejected
from spec_metrics._support.forking import keep_forever
from spec_metrics._support.summary import AcceptSummary

__all__ = ["DeviceArray", "PinnedPool", "to_counts", "to_draft_tokens", "summarize",
           "AcceptSummary"]


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


class PinnedPool:
    """Pinned host buffers for device-to-host copies, reused across steps.

    Allocating pinned memory (cudaHostAlloc) can stall until the device is idle, so it must
    not happen per step: buffers are taken from here and given back once read. Call
    `reserve()` at start-up (SpecDecodeHooks.warm_up_device) so no allocation happens later.
    """

    def __init__(self) -> None:
        self._free: dict[Any, list[Any]] = {}
        self._cooling: list[tuple[Any, Any, int]] = []  # given back while a copy was in flight
        # Reusable events per device index: an event belongs to the device it was first
        # recorded on, and creating one costs more than reusing it.
        self._events: dict[int, list[Any]] = {}
        self._streams: Any = None  # cuda_timing.StreamLookup, made on first device copy
        self._copy_streams: dict[int, Any] = {}  # device index -> side stream for copies

    def _reset_after_fork(self) -> None:
        """In a forked child: set the parent's buffers aside, unfreed (forking.py says why)."""
        keep_forever((self._free, self._cooling, self._events, self._streams,
                      self._copy_streams))
        self._free = {}
        self._cooling = []
        self._events = {}
        self._streams = None
        self._copy_streams = {}

    def _event(self, index: int) -> Any:
        import torch

        free = self._events.get(index)
        return free.pop() if free else torch.cuda.Event()

    def prepare_device(self, index: int, events: int) -> None:
        """Create the side stream and `events` events for device `index` ahead (start-up)."""
        import torch

        if self._streams is None:
            from spec_metrics._core.cuda_timing import StreamLookup

            self._streams = StreamLookup(torch)
        if index not in self._copy_streams:
            self._copy_streams[index] = torch.cuda.Stream(device=index)
        free = self._events.setdefault(index, [])
        while len(free) < events:
            free.append(torch.cuda.Event())

    def copy_to_host(self, tensor: Any, host: Any) -> tuple[Any, Any]:
        """Queue `host.copy_(tensor)` on a side stream, ordered after the work already
        queued on the tensor's current stream. Returns the event marking the copy's end,
        and that current stream (the one to make wait before the tensor is reused).

        Why a side stream: a device-to-host copy queued between an engine's kernels (or CUDA
        graph replays) holds back the work behind it; measured on an H100 between graph
        replays it lengthened the step by about 50 µs. On the side stream it overlaps the
        engine's next kernels instead. `record_stream` keeps the allocator from handing the
        tensor's memory to new work before the copy has read it.
        """
        import torch

        index = tensor.device.index
        side = self._copy_streams.get(index)
        if side is None or self._streams is None:
            self.prepare_device(index, 0)
            side = self._copy_streams[index]
        current = self._streams.current(index)
        queued = self._event(index)
        queued.record(current)
        side.wait_event(queued)
        # The wait captured the record: `queued` may be recorded again by the next copy.
        self._events.setdefault(index, []).append(queued)
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(side)
        done = self._event(index)
        done.record(side)
        return done, current

    def take(self, length: int, dtype: Any) -> Any:
        if self._cooling:
            self._reclaim()
        free = self._free.setdefault(dtype, [])
        for index, buffer in enumerate(free):
            if buffer.shape[0] >= length:
                return free.pop(index)
        import torch

        capacity = 1 << max(8, (length - 1).bit_length())  # powers of two, at least 256
        return torch.empty(capacity, dtype=dtype, pin_memory=True)

    def give(self, buffer: Any, event: Any = None, device_index: int = 0) -> None:
        """Return a buffer; with `event` (on device `device_index`), only once the copy into
        it has completed."""
        if event is not None and not event.query():
            self._cooling.append((buffer, event, device_index))
            return
        self._free.setdefault(buffer.dtype, []).append(buffer)
        if event is not None:
            self._events.setdefault(device_index, []).append(event)

    def _reclaim(self) -> None:
        still = []
        for buffer, event, index in self._cooling:
            if event.query():
                self._free.setdefault(buffer.dtype, []).append(buffer)
                self._events.setdefault(index, []).append(event)
            else:
                still.append((buffer, event, index))
        self._cooling = still

    def reserve(self, length: int, dtypes: tuple[Any, ...], count: int) -> None:
        for dtype in dtypes:
            self._free.setdefault(dtype, [])
            held = [self.take(length, dtype) for _ in range(count)]
            for buffer in held:
                self.give(buffer)


class DeviceArray:
    """A CUDA tensor being copied to pinned host memory without blocking the engine.

    The copy runs on a side stream after the work queued before it (PinnedPool.copy_to_host);
    `ready()` polls its event (no synchronization) and `result()` reads the host copy once
    it is. `release_source()` makes the engine's stream wait for the copy, on the device.
    """

    __slots__ = ("_buffer", "_host", "_event", "_stream", "_pool", "_device", "what",
                 "length")

    def __init__(self, tensor: Any, what: str, pool: PinnedPool) -> None:

        self.what = what
        self.length = int(tensor.shape[0])
        self._pool = pool
        self._device = tensor.device.index
        self._buffer = pool.take(self.length, tensor.dtype)
        self._host = self._buffer[: self.length]
        try:
            self._event, self._stream = pool.copy_to_host(tensor.detach(), self._host)
        except BaseException:
            pool.give(self._buffer)  # nothing was queued into it
            raise

    def release_source(self) -> None:
        """The stream that produced the tensor waits (on the device) for the copy: work
        queued on it from now on may overwrite or free the tensor."""
        self._stream.wait_event(self._event)

    def ready(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        """Block until the copy is done; only for flush() at shutdown, never in a hook."""
        self._event.synchronize()

    def discard(self) -> None:
        """Give the buffer back unread (the step was dropped)."""
        self._pool.give(self._buffer, self._event, self._device)

    def result(self) -> np.ndarray:
        """The checked host array; the pinned buffer goes back to the pool."""
        array = np.array(self._host.numpy())  # a copy: the buffer is reused
        self._pool.give(self._buffer, self._event, self._device)  # completed: both reused
        return _check_array(array, self.what)


def to_counts(value: Any, what: str, batch_size: int | None,
              pool: PinnedPool | None = None, rings: Any = None) -> "np.ndarray | DeviceArray":
    """A 1-D int64 array of non-negative counts, or a DeviceArray still on its way (a row of
    `rings`, a device_ring.DeviceRings, when it has room, else a copy of its own).

    Raises InputRejected with a reason from the catalog when the input cannot be used.
    Values are checked here for host data, and in `DeviceArray.result()` for device data.
    """
    if isinstance(value, np.ndarray):
        array = value
    elif _is_torch_tensor(value):
        if value.ndim != 1:
            raise InputRejected("wrong_shape", f"{what} must be 1-D (one entry per request), "
                                                 f"got a tensor of shape {tuple(value.shape)}")
        _check_length(int(value.shape[0]), what, batch_size)
        device = value.device.type
        if device not in ("cpu", "cuda"):
            raise InputRejected("wrong_type", f"{what} is on device {value.device}; "
                                               "pass a CPU or CUDA tensor")
        if str(value.dtype) not in _TORCH_DTYPES:
            raise InputRejected("wrong_type", f"{what} has dtype {value.dtype}; "
                                               "pass integer counts")
        if device != "cpu":
            # Values (NaN, range) are checked when the copy is read, in DeviceArray.result().
            if rings is not None:
                slot = rings.put(value, what)
                if slot is not None:
                    return slot  # type: ignore[no-any-return]
            return DeviceArray(value, what, pool if pool is not None else PinnedPool())
        # Integer tensors cannot require grad; detach() only where it matters.
        array = value.detach().numpy() if value.dtype.is_floating_point else value.numpy()
    elif isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputRejected("wrong_type", f"{what} could not be read as an array "
                                              f"({exc}): {_short(value)}") from None
    else:
        raise InputRejected(
            "wrong_type",
            f"{what} must be a list, numpy array or torch tensor of per-request counts, "
            f"got {type(value).__name__} {_short(value)}",
        )
    if array.ndim != 1:
        raise InputRejected("wrong_shape", f"{what} must be 1-D (one entry per request), "
                                             f"got shape {array.shape}")
    _check_length(array.shape[0], what, batch_size)
    return _check_array(array, what)


# Tensor dtypes that numpy can hold and that can be counts (bool, complex, bfloat16 and
# float8 cannot).
_TORCH_DTYPES = frozenset(f"torch.{name}" for name in (
    "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"))


def _check_length(length: int, what: str, batch_size: int | None) -> None:
    if batch_size is not None and length != batch_size:
        raise InputRejected("wrong_shape", f"{what} has {length} entries but the batch has "
                                             f"{batch_size} requests")


def _check_array(array: np.ndarray, what: str) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "i" or (kind in "uf" and not array.size):
        pass
    elif kind == "u":
        # uint64 above int64's range would wrap to negative numbers in astype(int64).
        if array.dtype.itemsize == 8 and int(array.max()) > _INT64_MAX:
            raise InputRejected("wrong_type", f"{what} holds values too large to be token counts: "
                                f"{_first(array, array > _INT64_MAX, what)}")
    elif kind == "f":
        if array.dtype.itemsize < 4:
            array = array.astype(np.float64)  # float16 cannot hold 1e15: the bound would overflow
        finite = np.isfinite(array)
        if not finite.all():
            raise InputRejected("non_finite", f"{what} contains NaN or infinity: "
                                f"{_first(array, ~finite, what)}")
        fraction = array != np.trunc(array)
        if fraction.any():
            raise InputRejected("wrong_type", f"{what} must hold whole numbers, got "
                                f"{_first(array, fraction, what)}")
        if array.min() < -1e15 or array.max() > 1e15:
            raise InputRejected("wrong_type", f"{what} holds values too large to be token counts: "
                                f"{_first(array, np.abs(array) > 1e15, what)}")
    else:
        raise InputRejected("wrong_type", f"{what} has dtype {array.dtype}; pass integer counts")
    if array.dtype != np.int64:
        array = array.astype(np.int64)
    return array


def summarize(accepted: np.ndarray, draft_tokens: "int | np.ndarray", max_k: int,
              groups: RequestGroups | None = None) -> AcceptSummary:
    """Check accepted counts against draft tokens and reduce both to histograms (with
    `groups`, also one row of each per group value)."""
    n = accepted.shape[0]
    size = max_k + 1
    hi = _max_non_negative(accepted, "accepted") if n else 0
    if isinstance(draft_tokens, np.ndarray):
        if draft_tokens.shape[0] != n:
            raise InputRejected("wrong_shape", f"draft_tokens has {draft_tokens.shape[0]} entries "
                                                 f"but accepted has {n}")
        if n:
            dhi = _max_non_negative(draft_tokens, "draft_tokens")
            if dhi > max_k:
                raise InputRejected("draft_tokens_exceed_max", f"draft_tokens {dhi} exceeds "
                                    f"max_draft_tokens={max_k}; raise max_draft_tokens")
            over = accepted > draft_tokens
            if over.any():
                i = int(np.argmax(over))
                raise InputRejected("accepted_exceeds_drafted", f"request {i} accepted "
                                    f"{int(accepted[i])} of {int(draft_tokens[i])} draft tokens")
        if groups is not None:
            return _grouped(accepted, draft_tokens, groups, size)
        draft_hist = np.bincount(draft_tokens, minlength=size)
        if draft_hist[0]:
            # Like vLLM, accepted length is counted over requests that had drafts only.
            accepted = accepted[draft_tokens > 0]
            n = accepted.shape[0]
    else:
        k = draft_tokens
        if k < 0:
            raise InputRejected("negative", f"draft_tokens must be >= 0, got {k}")
        if k > max_k:
            raise InputRejected("draft_tokens_exceed_max", f"draft_tokens {k} exceeds "
                                f"max_draft_tokens={max_k}; raise max_draft_tokens")
        if hi > k:
            i = int(np.argmax(accepted > k))
            raise InputRejected("accepted_exceeds_drafted", f"request {i} accepted "
                                f"{int(accepted[i])} of {k} draft tokens")
        if groups is not None:
            return _grouped(accepted, k, groups, size)
        draft_hist = np.zeros(size, dtype=np.int64)
        draft_hist[k] = n
        if k == 0:
            n = 0  # nothing was drafted: no accepted length to count
    accepted_hist = np.bincount(accepted, minlength=size) if n else np.zeros(size, dtype=np.int64)
    return AcceptSummary(accepted_hist, draft_hist)


def _grouped(accepted: np.ndarray, draft_tokens: "int | np.ndarray", groups: RequestGroups,
             size: int) -> AcceptSummary:
    group_accepted, group_draft = group_histograms(accepted, draft_tokens, groups, size)
    return AcceptSummary(group_accepted.sum(axis=0), group_draft.sum(axis=0), groups.values,
                         group_accepted, group_draft)


def _max_non_negative(values: np.ndarray, what: str) -> int:
    """The largest value, in one pass: viewed as unsigned, negatives wrap above 2**63."""
    top = int(np.maximum.reduce(values.view(np.uint64)))
    if top >= 1 << 63:
        raise InputRejected("negative",
                            f"{what} must be >= 0, got {_first(values, values < 0, what)}")
    return top


_INT64_MAX = (1 << 63) - 1


def _first(array: np.ndarray, bad: np.ndarray, what: str) -> str:
    """`what[i]=value` for the first flagged entry: the message names the offending value
    even when the array is too long for its repr to show it."""
    index = int(np.argmax(bad))
    return f"{what}[{index}]={array[index].item()!r} ({_short(array)})"


def to_draft_tokens(value: Any, batch_size: int | None, pool: PinnedPool | None = None,
                    rings: Any = None) -> "int | np.ndarray | DeviceArray":
    """draft_tokens is a scalar K for the whole batch, or one count per request."""
    if isinstance(value, (bool, np.bool_)):
        raise InputRejected("wrong_type", f"draft_tokens must be an int, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) or (_is_torch_tensor(value) and value.ndim == 0):
        raise InputRejected("wrong_type", f"draft_tokens must be an int or per-request counts, "
                                           f"got {_short(value)}")
    return to_counts(value, "draft_tokens", batch_size, pool, rings)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
