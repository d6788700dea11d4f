"""The OpenTelemetry sink: decides per step whether to trace it, then builds its spans.

Spans are built after the step ended, from the recorded timestamps (explicit start and end
times), so the hooks themselves never touch OpenTelemetry. A step is traced when it is a
latency outlier, when a request in its batch carries a sampled trace context, or by the
configured ratio. Exemplars are only made from spans the SDK really sampled.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from .catalog import STAGES
from .config import HooksConfig
from .drops import DropCounter, logger
from .exemplars import PRIORITY
from .outliers import RunningQuantile
from .series import StepExemplars
from .traceparent import parse_traceparent

if TYPE_CHECKING:
    from .inputs import AcceptSummary
    from .record import StepRecord

__all__ = ["TraceSink", "SPAN_NAMES", "INSTRUMENTATION_NAME"]

INSTRUMENTATION_NAME = "spec_metrics"
SPAN_NAMES = {"step": "spec_decode.step", **{s: f"spec_decode.{s}" for s in STAGES}}
_ROOT = otel_context.Context()  # an empty context: step spans are roots, linked to requests


class TraceSink:
    def __init__(self, config: HooksConfig, drops: DropCounter,
                 tracer_provider: trace.TracerProvider | None = None) -> None:
        self._strict = config.strict
        from . import __version__

        self._provider = tracer_provider
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, __version__,
                                        tracer_provider=tracer_provider)
        self._drops = drops
        self._ratio = config.trace_ratio
        self._slow_stage = [config.slow_stage_limit(s) for s in STAGES]
        self._slow_step = config.slow_step_seconds
        self._quantile = config.outlier_quantile
        self._min_samples = config.outlier_min_samples
        self._rate = config.max_traced_steps_per_second
        self._reset_after_fork()
        _warn_if_sampler_drops(tracer_provider)
        # perf_counter_ns -> ns since the epoch, for explicit span times.
        self._epoch_offset_ns = time.time_ns() - time.perf_counter_ns()

    def _reset_after_fork(self) -> None:
        """Sampling state; anew in a forked child (hooks' reset): a reseeded random source
        (else parent and child would trace the same steps), fresh outlier estimates and
        a full token bucket."""
        self._random = random.Random()  # our own, so the engine's random state is untouched
        quantile = self._quantile
        self._running = (
            [RunningQuantile(quantile, self._min_samples) for _ in range(len(STAGES) + 1)]
            if quantile is not None else None
        )
        self._tokens = self._rate
        self._refilled = time.monotonic()
        self.rate_limited = 0  # steps that qualified but exceeded the rate

    def decide(self, stage_seconds: Sequence[float | None], step_seconds: float | None,
               request_sampled: bool) -> str | None:
        """Why this step is traced ("slow", "outlier", "request", "ratio"), or None."""
        slow = outlier = False
        running = self._running
        for index, seconds in enumerate(stage_seconds):
            if seconds is None:
                continue
            limit = self._slow_stage[index]
            if limit is not None and seconds > limit:
                slow = True
            if running is not None and running[index].observe(seconds):
                outlier = True
        if step_seconds is not None:
            if self._slow_step is not None and step_seconds > self._slow_step:
                slow = True
            if running is not None and running[-1].observe(step_seconds):
                outlier = True
        if slow:
            reason = "slow"
        elif outlier:
            reason = "outlier"
        elif request_sampled:
            reason = "request"
        elif self._ratio and self._random.random() < self._ratio:
            reason = "ratio"
        else:
            return None
        return reason if self._take_token() else None

    def _take_token(self) -> bool:
        """Token bucket over traced steps: at most max_traced_steps_per_second, bursts of
        one second's worth, so the span processor's queue cannot overflow."""
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.rate_limited += 1
        return False

    def emit(self, record: "StepRecord", reason: str, method: str,
             summary: "AcceptSummary | None") -> StepExemplars | None:
        """Build and end the step's spans; return where they are, if the SDK sampled them."""
        offset = self._epoch_offset_ns
        starts, ends = record.starts, record.ends
        present = [i for i in range(len(STAGES)) if starts[i] and ends[i]]
        if not present:
            return None
        step_start = min(starts[i] for i in present) + offset
        step_end = max(ends[i] for i in present) + offset
        attributes: dict = {
            "spec_decode.method": method,
            "spec_decode.step": record.index,
            "spec_decode.sample_reason": reason,
        }
        if record.batch_size is not None:
            attributes["spec_decode.batch_size"] = record.batch_size
        if record.request_ids is not None:
            attributes["spec_decode.request_ids"] = [str(r) for r in record.request_ids]
        accept_attributes = _accept_attributes(summary) if summary is not None else {}
        attributes.update(accept_attributes)
        step_span = self._tracer.start_span(
            SPAN_NAMES["step"], context=_ROOT, kind=SpanKind.INTERNAL, attributes=attributes,
            links=self._links(record), start_time=step_start,
        )
        parent = trace.set_span_in_context(step_span)
        stage_span_ids: list[str | None] = [None] * len(STAGES)
        for index in present:
            stage = STAGES[index]
            stage_attributes: dict = {"spec_decode.method": method}
            if stage == "verify" and summary is not None:
                stage_attributes.update(accept_attributes)
                stage_attributes["spec_decode.accepted_per_position"] = (
                    summary.per_position(summary.accepted_hist))
                stage_attributes["spec_decode.draft_tokens_per_position"] = (
                    summary.per_position(summary.draft_hist))
            span = self._tracer.start_span(
                SPAN_NAMES[stage], context=parent, kind=SpanKind.INTERNAL,
                attributes=stage_attributes, start_time=starts[index] + offset,
            )
            span.end(end_time=ends[index] + offset)
            stage_context = span.get_span_context()
            if stage_context.is_valid and stage_context.trace_flags.sampled:
                stage_span_ids[index] = format(stage_context.span_id, "016x")
        step_span.end(end_time=step_end)
        context = step_span.get_span_context()
        if not (context.is_valid and context.trace_flags.sampled):
            return None  # the SDK's sampler said no (or no SDK): no exemplar may point here
        step_hex = format(context.span_id, "016x")
        # A stage span the sampler dropped: its exemplars point at the (exported) step span.
        stage_span_ids = [span_id or step_hex for span_id in stage_span_ids]
        return StepExemplars(format(context.trace_id, "032x"), step_hex, stage_span_ids,
                             PRIORITY[reason], step_end / 1e9)

    def force_flush(self, timeout_millis: int) -> None:
        provider = self._provider or trace.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        if flush is not None:
            flush(timeout_millis)

    def _links(self, record: "StepRecord") -> list[Link]:
        if not record.traceparents:
            return []
        links = []
        ids = record.request_ids
        for index, value in enumerate(record.traceparents):
            if value is None:
                continue
            span_context = parse_traceparent(value)
            if span_context is None:
                self._drops.reject("begin_step", "bad_traceparent",
                                   f"traceparents[{index}]={value!r} is not a W3C traceparent; "
                                   "expected '00-<32 hex>-<16 hex>-<2 hex>'", self._strict)
                continue
            attributes = {"spec_decode.request_id": str(ids[index])} if ids is not None else None
            links.append(Link(span_context, attributes))
        return links


def _warn_if_sampler_drops(provider: trace.TracerProvider | None) -> None:
    """spec_metrics decides which steps to trace; a provider sampler that drops root spans
    (e.g. parentbased_traceidratio) would silently undo it. Say so once, at construction."""
    provider = provider or trace.get_tracer_provider()
    sampler = getattr(provider, "sampler", None)
    if sampler is None:
        return  # no SDK provider (yet): nothing to check
    description = sampler.get_description()
    if description.startswith(("AlwaysOnSampler", "ParentBased{root:AlwaysOnSampler")):
        return
    logger.warning(
        "spec_metrics: the tracer provider's sampler is %s; spec_metrics already picks the "
        "steps to trace (ratio, outliers, sampled requests) and the sampler may drop them. "
        "Use the default ParentBased(AlwaysOn) sampler, or give spec_metrics its own provider.",
        description,
    )


def _accept_attributes(summary: "AcceptSummary") -> dict:
    return {
        "spec_decode.draft_tokens": summary.draft_tokens,
        "spec_decode.accepted_tokens": summary.accepted,
        "spec_decode.emitted_tokens": summary.emitted,
        "spec_decode.acceptance_rate": (
            summary.accepted / summary.draft_tokens if summary.draft_tokens else 0.0),
    }
