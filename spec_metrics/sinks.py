"""Where a finished step record goes: resolved once, then to the trace and metrics sinks."""

from __future__ import annotations

from typing import Any, Callable

from .collector import SpecDecodeCollector
from .cuda_timing import CudaEventTimer, gpu_times_ns
from .drops import InputRejected
from .inputs import DeviceArray, summarize
from .record import StepRecord
from .tracing import TraceSink

__all__ = ["StepSinks"]


class StepSinks:
    """Consumes each record once: device data is read, then the trace sink decides whether
    to build spans (and so exemplars), then the collector aggregates."""

    def __init__(self, collector: SpecDecodeCollector | None, tracer: TraceSink | None,
                 gpu: CudaEventTimer | None, max_k: int,
                 reject: Callable[[str, str, str], None]) -> None:
        self._collector = collector
        self._tracer = tracer
        self._gpu = gpu
        self._max_k = max_k
        self._reject = reject

    def consume(self, record: StepRecord) -> None:
        summary = record.summary
        if summary is None and record.accepted is not None:
            try:
                summary = summarize(_resolve(record.accepted), _resolve(record.draft_tokens),
                                    self._max_k)
            except InputRejected as rejected:
                self._reject("verify_end", rejected.reason,
                             f"(step {record.index}, read from the device) {rejected.message}")
        if record.gpu_starts is not None and self._gpu is not None:
            # Device time replaces enqueue time, on the CPU clock's scale (see cuda_timing).
            record.starts, record.ends = gpu_times_ns(record.gpu_starts, record.gpu_ends,
                                                      record.starts)  # type: ignore[arg-type]
            self._gpu.release([*record.gpu_starts, *record.gpu_ends])  # type: ignore[misc]
            record.gpu_starts = record.gpu_ends = None
        stage_seconds = record.stage_seconds()
        step_seconds = record.step_seconds()
        exemplars = None
        if self._tracer is not None:
            reason = self._tracer.decide(stage_seconds, step_seconds, record.traceparents)
            if reason is not None:
                exemplars = self._tracer.emit(record, reason, record.method, summary)
        if self._collector is not None:
            self._collector.consume(record.method, stage_seconds, step_seconds, summary,
                                    exemplars)


def _resolve(value: Any) -> Any:
    return value.result() if isinstance(value, DeviceArray) else value
