"""Finished steps on their way from the engine thread to the sinks, in step order.

The engine thread only appends each finished step (a tuple of what the hooks stored) to a
deque. A consumer turns them into `StepRecord`s, checks the counts and hands them to the
sinks: the shared worker thread (`worker.py`), a scrape (so /metrics shows every step
finished before it), `poll()` and `flush()`; with `consumer="inline"` (and in strict mode),
`end_step()` itself. One consumer at a time, under this object's lock, so steps reach the
sinks once and in order.

A step whose accepted counts are a CUDA tensor, or whose stages were timed with CUDA events,
cannot be read when it ends without synchronizing the device: it waits (polled, never
waited for) until its copies and events have completed. Both queues are bounded: past the
limit the oldest step is dropped, never waited for, and counted (`pending_overflow`).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

import numpy as np

from spec_metrics._core.cuda_timing import wait_events
from spec_metrics._core.device_ring import RingSlot
from spec_metrics._core.groups import to_groups
from spec_metrics._core.inputs import DeviceArray, to_counts, to_draft_tokens
from spec_metrics._core.record import StepRecord
from spec_metrics._support.drops import InputRejected, StrictModeError
from spec_metrics._support.forking import keep_forever

__all__ = ["PendingSteps", "Raw"]


CHUNK = 128  # steps consumed per turn of the lock
OVERFLOW_WAIT_S = 0.01  # most an end_step() with a full queue waits for another consumer

# What end_step() hands over: (index, method, times, counts, begin, gpu_marks). `times`:
# perf_counter_ns of each stage's start and end (draft, verify, draft_extend; 0 = not
# recorded); `counts`: None, (accepted, draft_tokens, groups) as verify_end copied them,
# unchecked, or (accepted, draft_tokens, groups, summary) checked at the hook; `begin`:
# (batch_size, request_ids, traceparents, request_sampled) from begin_step; `gpu_marks`: the
# CUDA events of the same boundaries with timer="cuda".
Raw = tuple


class PendingSteps:
    """`limit`: steps waiting for device results; `queue_limit`: steps handed over and not
    yet consumed (a worker starved of the GIL); `batch`: with an inline consumer, steps are
    passed on once this many wait (HooksConfig.batch_steps)."""

    def __init__(self, consume: Callable[[StepRecord], None], limit: int,
                 reject: Callable[[str, str, str], None], batch: int = 1,
                 queue_limit: int = 4096, default_method: str = "unknown",
                 failed: Callable[[str], None] | None = None) -> None:
        self._sink = consume
        self._failed = failed
        self._limit = limit
        self.queue_limit = queue_limit
        self._reject = reject
        self._batch = batch
        self._method = default_method
        self.handed: deque[Raw | StepRecord] = deque()  # appended by the engine thread only
        self._waiting: deque[StepRecord] = deque()  # consumer side, under self._lock
        self._lock = threading.Lock()
        self._owner = 0  # thread id holding self._lock (an on_step listener may scrape)
        # StepSinks.consume_batch, where consecutive simple steps may be consumed together
        # (set by the hooks: with the worker and without an on_step listener).
        self.consume_batch: Callable[[str, list, Callable], None] | None = None

    def _consume(self, record: StepRecord) -> None:
        try:
            self._sink(record)
        except StrictModeError:
            raise  # strict mode consumes inline: the hook raises it
        except Exception:
            if self._failed is None:
                raise
            self._failed("end_step")  # counted as internal_error; the next steps go on

    def _consume_many(self, raws: list) -> None:
        try:
            self.consume_batch(self._method, raws, self._record)  # type: ignore[misc]
        except StrictModeError:
            raise
        except Exception:
            if self._failed is None:
                raise
            self._failed("end_step")

    def _reset_after_fork(self) -> None:
        """In a forked child: set the parent's queued steps aside, unread and unfreed (their
        device data cannot be read nor freed here, see forking.py; the parent reports them)."""
        keep_forever(self.handed)
        keep_forever(self._waiting)
        self.handed = deque()
        self._waiting = deque()
        self._lock = threading.Lock()
        self._owner = 0

    def __len__(self) -> int:
        return len(self.handed) + len(self._waiting)

    # ---- engine thread -------------------------------------------------------------------

    def add(self, raw: "Raw | StepRecord") -> None:
        """Inline consumer: pass a finished step on now if nothing waits and steps are not
        batched, else queue it and pass on what is ready once a batch is complete."""
        self.handed.append(raw)
        if len(self.handed) + len(self._waiting) >= self._batch:
            self.drain()

    def overflow(self) -> None:
        """The handed-over queue is full: its consumer does not keep up (an engine thread
        that never releases the GIL starves the worker). Backpressure: consume a chunk of
        it here, waiting at most OVERFLOW_WAIT_S for the chunk another consumer is at; if
        that does not free the lock, drop the oldest step."""
        if self.drain(timeout=OVERFLOW_WAIT_S, limit=CHUNK):
            return  # one chunk: each later end_step() over the limit takes the next one
        try:
            oldest = self.handed.popleft()
        except IndexError:
            return
        _discard_device_data(oldest)
        self._reject("end_step", "pending_overflow",
                     f"more than {self.queue_limit} finished steps wait for the spec_metrics "
                     "worker thread and it did not let go of them; the oldest was dropped")

    # ---- consumers -----------------------------------------------------------------------

    def drain(self, blocking: bool = True, limit: int = 0, timeout: float = -1) -> bool:
        """Pass on the handed-over steps whose device results have landed, in order (never
        waits for the device), CHUNK at a time, releasing the lock in between so that an
        engine thread whose queue is full can take its turn. `blocking=False`: return False
        at once if another thread is consuming; `timeout`: give up waiting for it after that
        many seconds (-1: wait as long as it takes). `limit` > 0: stop after that many steps;
        0: what is queued now, not what producers add meanwhile. Returns whether it ran."""
        if self._owner == threading.get_ident():
            return True  # re-entered from a sink (an on_step listener scraping): skip
        if not limit:
            limit = len(self.handed) + len(self._waiting) + 1
        lock = self._lock
        if not lock.acquire(blocking, timeout if blocking else -1):
            return False
        while True:
            self._owner = threading.get_ident()
            try:
                done = self._drain_locked(min(limit, CHUNK))
            finally:
                self._owner = 0
                lock.release()
            limit -= done
            if done < CHUNK or limit <= 0 or not lock.acquire(blocking,
                                                              timeout if blocking else -1):
                return True

    def _drain_locked(self, limit: int) -> int:
        """Consume up to `limit` steps (0: all); return how many."""
        handed, waiting, consume = self.handed, self._waiting, self._consume
        done = 0
        while True:
            while waiting and not waiting[0].pending():
                if self.consume_batch is not None and _from_ring(waiting[0], self._method):
                    done += self._consume_ring_run(limit - done if limit
                                                   else len(waiting) + len(handed))
                else:
                    consume(waiting.popleft())
                    done += 1
                if limit and done >= limit:
                    return done
            if waiting or not handed:
                if handed:
                    self._admit_behind_waiting()
                return done
            if self.consume_batch is not None and _simple(handed[0]):
                batch: list = []
                odd = None
                room = limit - done if limit else len(handed)
                while handed and len(batch) < room:
                    try:
                        raw = handed.popleft()
                    except IndexError:
                        break  # overflow() took the last one
                    if not _simple(raw):
                        odd = raw  # consumed below, after the batch, in order
                        break
                    batch.append(raw)
                if batch:
                    self._consume_many(batch)
                    done += len(batch)
                if odd is None:
                    if limit and done >= limit:
                        return done
                    continue
                raw = odd
            else:
                try:
                    raw = handed.popleft()
                except IndexError:
                    return done
            record = self._record(raw)
            if record is None:
                continue
            if record.pending() or (self.consume_batch is not None
                                    and _from_ring(record, self._method)):
                waiting.append(record)  # ring rows: consumed in a batch with the next ones
                continue
            consume(record)
            done += 1
            if limit and done >= limit:
                return done

    def _consume_ring_run(self, room: int) -> int:
        """The next consecutive steps, at most `room`, whose counts have landed in a device
        ring row, consumed as one batch like host counts (the worker's usual case with CUDA
        counts: one step at a time would cost it tens of µs of GIL per step)."""
        raws: list = []
        records: dict[int, StepRecord] = {}
        while len(raws) < room:
            record = self._next_landed_ring_step()
            if record is None:
                break
            record.accepted = record.accepted.take()  # the step keeps the host copy
            times = [0] * (2 * len(record.starts))
            times[0::2], times[1::2] = record.starts, record.ends
            raw = (record.index, None, times, (record.accepted, record.draft_tokens, None),
                   None, None)
            records[id(raw)] = record
            raws.append(raw)
        if not raws:
            return 0
        try:
            # Traced steps, and every step of a batch with bad counts, go through their
            # record (request ids and traceparents included) one by one.
            self.consume_batch(self._method, raws, lambda raw: records[id(raw)])  # type: ignore[misc]
        except StrictModeError:
            raise
        except Exception:
            if self._failed is None:
                raise
            self._failed("end_step")
        return len(raws)

    def _next_landed_ring_step(self) -> StepRecord | None:
        """The next step in order (waiting first, then handed over), taken off its queue if
        its counts are in a landed ring row; else None, and the step waits at the head."""
        waiting, handed = self._waiting, self.handed
        if waiting:
            record = waiting[0]
            if not _from_ring(record, self._method) or record.pending():
                return None
            return waiting.popleft()
        while handed:
            try:
                raw = handed.popleft()
            except IndexError:
                return None
            step = self._record(raw)
            if step is None:
                continue
            if _from_ring(step, self._method) and not step.pending():
                return step
            waiting.append(step)
            return None
        return None

    def _admit_behind_waiting(self) -> None:
        """A step waits for the device: later ones queue behind it, in order, bounded."""
        handed, waiting = self.handed, self._waiting
        while handed:
            try:
                raw = handed.popleft()
            except IndexError:
                return
            record = self._record(raw)
            if record is None:
                continue
            if len(waiting) >= self._limit:
                _discard_device_data(waiting.popleft())
                self._reject("end_step", "pending_overflow",
                             f"more than {self._limit} steps wait for device results; the "
                             "oldest was dropped (is the device stream stalled?)")
            waiting.append(record)

    def flush(self) -> None:
        """Wait for every queued step's device results and pass them all on (shutdown)."""
        if self._owner == threading.get_ident():
            return
        with self._lock:
            self._owner = threading.get_ident()
            try:
                while self.handed or self._waiting:
                    self._drain_locked(0)
                    if self._waiting:
                        record = self._waiting.popleft()
                        for value in (record.accepted, record.draft_tokens):
                            if isinstance(value, DeviceArray):
                                value.wait()
                        if record.gpu_starts is not None:
                            wait_events(record.gpu_starts, record.gpu_ends)  # type: ignore[arg-type]
                        self._consume(record)
            finally:
                self._owner = 0

    def _record(self, raw: "Raw | StepRecord") -> StepRecord | None:
        """The StepRecord of a handed-over step, its unchecked counts checked now (rejected
        ones are counted and the step goes on without them)."""
        if isinstance(raw, StepRecord):
            return raw
        index, method, times, counts, begin, gpu = raw
        record = StepRecord(index, method or self._method)
        record.starts = times[0::2]
        record.ends = times[1::2]
        if begin is not None:
            record.batch_size, record.request_ids, record.traceparents, \
                record.request_sampled = begin
        if gpu is not None:
            record.gpu_starts, record.gpu_ends = gpu[0::2], gpu[1::2]
        if counts is None:
            return record
        if len(counts) == 3:
            accepted, drafts, groups = counts
            try:
                accepted = to_counts(accepted, "accepted", record.batch_size)
                length = int(accepted.shape[0])  # type: ignore[union-attr]
                record.draft_tokens = to_draft_tokens(drafts, length)
                record.groups = to_groups(groups, length) if groups is not None else None
                record.accepted = accepted
            except InputRejected as rejected:
                self._reject("verify_end", rejected.reason,
                             f"(step {index}, checked off the engine thread) "
                             f"{rejected.message}")
                record.accepted = record.draft_tokens = record.groups = None
            return record
        record.accepted, record.draft_tokens, record.groups, record.summary = counts
        return record


def _simple(raw: Any) -> bool:
    """A handed-over step that StepSinks.consume_batch takes: host int counts with one K,
    no groups, no begin_step data, no CUDA events, the default method."""
    if type(raw) is not tuple or raw[1] is not None or raw[4] is not None \
            or raw[5] is not None:
        return False
    counts = raw[3]
    return (counts is not None and len(counts) == 3 and type(counts[0]) is np.ndarray
            and type(counts[1]) is int and counts[2] is None)


def _from_ring(record: StepRecord, method: str) -> bool:
    """A waiting step that StepSinks.consume_batch takes once its ring row has landed: the
    accepted counts in a row, one K, no groups, no CUDA events, no sampled request context,
    the default method."""
    return (type(record.accepted) is RingSlot and type(record.draft_tokens) is int
            and record.groups is None and record.summary is None and record.gpu_starts is None
            and not record.request_sampled and record.method == method)


def _discard_device_data(item: "Raw | StepRecord") -> None:
    if isinstance(item, StepRecord):
        values: tuple = (item.accepted, item.draft_tokens)
    else:
        counts = item[3]
        values = tuple(counts[:2]) if isinstance(counts, tuple) else ()
    for value in values:
        if isinstance(value, DeviceArray):
            value.discard()
