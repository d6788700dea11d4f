"""Where a finished step record goes: resolved once, then to the trace and metrics sinks."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from spec_metrics._core.cuda_timing import CudaEventTimer, gpu_times_ns
from spec_metrics._core.inputs import DeviceArray, summarize
from spec_metrics._core.record import StepRecord
from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._support.drops import InputRejected
from spec_metrics._support.log import logger
from spec_metrics._tracing.sink import TraceSink

__all__ = ["StepSinks", "StepResult"]


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

    def consume(self, record: StepRecord) -> None:
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
            reason = self._tracer.decide(stage_seconds, step_seconds, record.request_sampled)
            if reason is not None:
                exemplars = self._tracer.emit(record, reason, record.method, summary)
        if self._collector is not None:
            self._collector._consume(record.method, stage_seconds, step_seconds, summary,
                                    exemplars)
        if self._on_step is not None:
            self._notify(record, stage_seconds, step_seconds, summary, exemplars, reason)

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
