"""Where a finished step record goes: resolved once, then to the trace and metrics sinks."""

from __future__ import annotations

from itertools import accumulate
from typing import Any, Callable, NamedTuple

import numpy as np

from spec_metrics._core.cuda_timing import CudaEventTimer, gpu_times_ns
from spec_metrics._core.inputs import DeviceArray, summarize
from spec_metrics._core.record import StepRecord
from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._support.drops import InputRejected
from spec_metrics._support.log import logger
from spec_metrics._tracing.sink import TraceSink

__all__ = ["StepSinks", "StepResult"]

_UNDECIDED = object()  # consume(): the trace sink has not decided this step yet
_NO_START = np.iinfo(np.int64).max


class StepResult(NamedTuple):
    """What one finished step recorded, as handed to an `on_step` listener."""

    index: int  # type: ignore[assignment]  # the step's number; shadows tuple.index
    method: str
    stage_seconds: list[float | None]  # indexed like STAGES; None where a stage was skipped
    step_seconds: float | None
    requests: int  # requests verified (0 if the counts were dropped or absent)
    draft_tokens: int
    accepted_tokens: int
    trace_id: str | None  # hex trace id when the SDK sampled the step's spans (their export
    # is reported later: see spec_metrics_exemplars_withheld_total)
    sample_reason: str | None  # why it was traced: "slow", "outlier", "request", "ratio"


class StepSinks:
    """Consumes each record once: device data is read, then the trace sink decides whether
    to build spans (and so exemplars), then the collector aggregates."""

    def __init__(self, collector: SpecDecodeCollector | None, tracer: TraceSink | None,
                 gpu: CudaEventTimer | None, max_k: int,
                 reject: Callable[[str, str, str], None],
                 on_step: Callable[[StepResult], None] | None = None) -> None:
        self._on_step = on_step
        self._collector = collector
        self._tracer = tracer
        self._gpu = gpu
        self._max_k = max_k
        self._reject = reject
        # How a warning names counts checked after their hook ran (not read from a device).
        self.deferred_where = "checked off the engine thread"

    def consume(self, record: StepRecord, decided: Any = _UNDECIDED) -> None:
        """One step; `decided`: the trace sink's decision if it was made already (in
        consume_batch)."""
        summary = record.summary
        if summary is None and record.accepted is not None:
            where = ("read from the device" if isinstance(record.accepted, DeviceArray)
                     or isinstance(record.draft_tokens, DeviceArray) else self.deferred_where)
            try:
                summary = summarize(_resolve(record.accepted), _resolve(record.draft_tokens),
                                    self._max_k, record.groups)
            except InputRejected as rejected:
                self._reject("verify_end", rejected.reason,
                             f"(step {record.index}, {where}) {rejected.message}")
        if (record.gpu_starts is not None and record.gpu_ends is not None
                and self._gpu is not None):
            # Device time replaces enqueue time, on the CPU clock's scale (see cuda_timing).
            record.starts, record.ends = gpu_times_ns(record.gpu_starts, record.gpu_ends,
                                                      record.starts)
            self._gpu.release([*record.gpu_starts, *record.gpu_ends])
            record.gpu_starts = record.gpu_ends = None
        stage_seconds, step_seconds = record.durations()
        exemplars = reason = None
        if self._tracer is not None and step_seconds is not None:  # a stage was timed
            reason = (self._tracer.decide(stage_seconds, step_seconds, record.request_sampled)
                      if decided is _UNDECIDED else decided)
            if reason is not None:
                exemplars = self._tracer.emit(record, reason, record.method, summary)
        if self._collector is not None:
            self._collector._consume(record.method, stage_seconds, step_seconds, summary,
                                    exemplars)
        if self._on_step is not None:
            self._notify(record, stage_seconds, step_seconds, summary, exemplars, reason)

    def consume_batch(self, method: str, raws: list, record_of: Callable[[Any], StepRecord]
                      ) -> None:
        """Consecutive finished steps of `method` as end_step() handed them over, each with
        a host array of int64 accepted counts, one K >= 1 for the batch, no groups, no
        begin_step data and no CUDA events (PendingSteps picks them): checked, decided and
        aggregated with a few numpy calls for all of them. Traced steps (and every step,
        if some counts are bad) go through `consume` one by one, in order, so the metrics,
        sums included, are exactly those of one-by-one consumption."""
        accepted = [raw[3][0] for raw in raws]
        ks = [raw[3][1] for raw in raws]
        lengths = [a.shape[0] for a in accepted]
        k_low, k_high = min(ks), max(ks)
        size = self._max_k + 1
        good = (k_low >= 1 and k_high <= self._max_k and min(lengths) > 0
                and all(a.dtype == np.int64 and a.ndim == 1 for a in accepted))
        if good:
            joined = np.concatenate(accepted)
            good = not (joined.min() < 0 or (
                joined.max() > k_low if k_low == k_high  # one K for the run: one max
                else (joined > np.repeat(ks, lengths)).any()))
        if not good:
            for raw in raws:
                self.consume(record_of(raw))  # the checks name the step and the value
            return
        times = np.array([raw[2] for raw in raws], dtype=np.int64)
        starts, ends = times[:, 0::2], times[:, 1::2]
        recorded = (starts != 0) & (ends != 0)
        stage_seconds = (ends - starts) / 1e9
        timed = recorded.any(axis=1)
        first = np.where(recorded, starts, _NO_START).min(axis=1)
        step_seconds = (np.where(recorded, ends, 0).max(axis=1) - first) / 1e9
        n = len(raws)
        reasons: list[str | None] = (
            self._tracer.decide_many(stage_seconds, recorded, step_seconds, timed)
            if self._tracer is not None else [None] * n)
        # Untraced runs between traced steps are aggregated together; their counts are
        # slices of `joined` (count_ends[i]: where step i's counts end in it).
        count_ends = list(accumulate(lengths)) if None in reasons else []
        begin = 0
        while begin < n:
            end = begin
            while end < n and reasons[end] is None:
                end += 1
            if end > begin and self._collector is not None:
                low = count_ends[begin - 1] if begin else 0
                if k_low == k_high:
                    draft_hist = np.zeros(size, dtype=np.int64)
                    draft_hist[k_low] = count_ends[end - 1] - low
                else:
                    draft_hist = np.bincount(ks[begin:end], weights=lengths[begin:end],
                                             minlength=size).astype(np.int64)
                self._collector._consume_many(
                    method, stage_seconds[begin:end], recorded[begin:end],
                    step_seconds[begin:end], timed[begin:end],
                    np.bincount(joined[low:count_ends[end - 1]], minlength=size), draft_hist)
            if end < n:
                self.consume(record_of(raws[end]), reasons[end])
            begin = end + 1

    def _notify(self, record: StepRecord, stage_seconds: list[float | None],
                step_seconds: float | None, summary: Any, exemplars: Any,
                reason: str | None) -> None:
        result = StepResult(
            record.index, record.method, stage_seconds, step_seconds,
            summary.requests if summary is not None else 0,
            summary.draft_tokens if summary is not None else 0,
            summary.accepted if summary is not None else 0,
            exemplars.trace_id if exemplars is not None else None,
            reason if exemplars is not None else None,
        )
        try:
            self._on_step(result)  # type: ignore[misc]
        except Exception:
            logger.exception("spec_metrics: the on_step listener raised; step data is kept")


def _resolve(value: Any) -> Any:
    return value.result() if isinstance(value, DeviceArray) else value
