"""The OpenTelemetry sink: decides per step whether to trace it, then builds its spans.

Spans are built after the step ended, from the recorded timestamps (explicit start and end
times), so the hooks themselves never touch OpenTelemetry. A step is selected when it is a
latency outlier, when a request in its batch carries a sampled trace context, or by the
configured ratio; a token bucket caps traced steps per second, and ratio-sampled steps give
way first so that ordinary sampling never starves a spike of budget. A selected step that is
not traced is counted, by reason. Exemplars are only made from spans the SDK really sampled,
and carry an export ticket (span_fate.py) so that they are shown only once exported.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from spec_metrics._support.config import HooksConfig
from spec_metrics._support.drops import DropCounter, Tally
from spec_metrics._support.log import logger
from spec_metrics._tracing.outliers import RunningQuantile
from spec_metrics._tracing.span_fate import ExportTicket, set_current
from spec_metrics._tracing.step_exemplars import PRIORITY, StepExemplars
from spec_metrics._tracing.traceparent import parse_traceparent
from spec_metrics.catalog import SKIP_REASONS, STAGES, WITHHELD_REASONS

if TYPE_CHECKING:
    from spec_metrics._core.record import StepRecord
    from spec_metrics._support.summary import AcceptSummary

__all__ = ["TraceSink", "SPAN_NAMES", "INSTRUMENTATION_NAME"]

INSTRUMENTATION_NAME = "spec_metrics"
SPAN_NAMES = {"step": "spec_decode.step", **{s: f"spec_decode.{s}" for s in STAGES}}
_ROOT = otel_context.Context()  # an empty context: step spans are roots, linked to requests
# Steps traced for these reasons may use the whole token bucket; "ratio" only its upper half.
_PRIORITY_REASONS = frozenset({"slow", "outlier", "request"})
# How often the perf_counter -> wall clock offset is measured again (NTP slews the wall
# clock of a long-running server; perf_counter does not follow).
CLOCK_RECALIBRATE_S = 10.0


class TraceSink:
    # Clocks, replaceable in tests.
    wall_clock_ns = staticmethod(time.time_ns)
    perf_clock_ns = staticmethod(time.perf_counter_ns)
    monotonic = staticmethod(time.monotonic)

    def __init__(self, config: HooksConfig, drops: DropCounter,
                 tracer_provider: trace.TracerProvider | None = None,
                 skipped: Tally | None = None, withheld: Tally | None = None) -> None:
        self._strict = config.strict
        from spec_metrics._version import __version__

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
        # Ratio-sampled steps leave this many tokens to slow, outlier and request steps.
        self._reserve = self._rate / 2
        self._max_links = config.max_links_per_step
        self._skipped = skipped if skipped is not None else Tally(SKIP_REASONS)
        self._withheld = withheld if withheld is not None else Tally(WITHHELD_REASONS)
        self._reset_after_fork()
        _warn_if_sampler_drops(tracer_provider)
        _warn_if_fate_unknown(tracer_provider)
        self._calibrate()

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
        self._refilled = self.monotonic()
        self.rate_limited = 0  # steps that qualified but exceeded the rate

    def _calibrate(self) -> None:
        """perf_counter_ns -> ns since the epoch, for explicit span and exemplar times."""
        perf = self.perf_clock_ns()
        self._epoch_offset_ns = self.wall_clock_ns() - perf
        self._calibrated_at = perf

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
        if self._take_token(reason in _PRIORITY_REASONS):
            return reason
        self.rate_limited += 1
        self._skipped.add("rate_limited")
        return None

    def decide_many(self, stage_seconds: np.ndarray, recorded: np.ndarray,
                    step_seconds: np.ndarray, timed: np.ndarray) -> list[str | None]:
        """`decide` for consecutive steps without sampled request contexts, in order:
        `stage_seconds` and `recorded` (N x stages), `step_seconds` and `timed` (N; only
        timed steps are decided, as in the sinks). The same running quantiles, random
        draws and token bucket as N calls of `decide`."""
        n = step_seconds.shape[0]
        slow = np.zeros(n, dtype=bool)
        outlier = np.zeros(n, dtype=bool)
        running = self._running
        for index in range(stage_seconds.shape[1]):
            mask = recorded[:, index]
            values = stage_seconds[mask, index]
            limit = self._slow_stage[index]
            if limit is not None:
                slow[mask] |= values > limit
            if running is not None:
                outlier[mask] |= running[index].observe_many(values)
        values = step_seconds[timed]
        if self._slow_step is not None:
            slow[timed] |= values > self._slow_step
        if running is not None:
            outlier[timed] |= running[-1].observe_many(values)
        reasons: list[str | None] = [None] * n
        for i in np.flatnonzero(timed & slow).tolist():
            reasons[i] = "slow"
        for i in np.flatnonzero(timed & outlier & ~slow).tolist():
            reasons[i] = "outlier"
        if self._ratio:
            draw, ratio = self._random.random, self._ratio
            for i in np.flatnonzero(timed & ~slow & ~outlier).tolist():
                if draw() < ratio:
                    reasons[i] = "ratio"
        for i, reason in enumerate(reasons):
            if reason is not None and not self._take_token(reason in _PRIORITY_REASONS):
                self.rate_limited += 1
                self._skipped.add("rate_limited")
                reasons[i] = None
        return reasons

    def _take_token(self, priority: bool) -> bool:
        """Token bucket over traced steps: at most max_traced_steps_per_second, bursts of
        one second's worth, so the span processor's queue cannot overflow. Ratio-sampled
        steps only take tokens above the reserve (half the bucket)."""
        now = self.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        floor = 1.0 if priority else 1.0 + self._reserve
        if self._tokens >= floor:
            self._tokens -= 1.0
            return True
        return False

    def emit(self, record: "StepRecord", reason: str, method: str,
             summary: "AcceptSummary | None") -> StepExemplars | None:
        """Build and end the step's spans; return where they are, if the SDK sampled them."""
        starts, ends = record.starts, record.ends
        present = [i for i in range(len(STAGES)) if starts[i] and ends[i]]
        if not present:
            return None  # not a candidate: sinks only trace steps with a timed stage
        if self.perf_clock_ns() - self._calibrated_at > CLOCK_RECALIBRATE_S * 1e9:
            self._calibrate()
        offset = self._epoch_offset_ns
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
        links, unlinked = self._links(record)
        if unlinked:
            attributes["spec_decode.links_dropped"] = unlinked
        step_span = self._tracer.start_span(
            SPAN_NAMES["step"], context=_ROOT, kind=SpanKind.INTERNAL, attributes=attributes,
            links=links, start_time=step_start,
        )
        # The processor that queues these spans reports their fate to the ticket
        # (SpanExportProcessor); exemplars are shown once it says "exported".
        ticket = ExportTicket(self._on_spans_lost)
        set_current(ticket)
        try:
            stage_span_ids = self._stage_spans(record, present, step_span, method, summary,
                                               accept_attributes, offset)
            step_span.end(end_time=step_end)
        finally:
            set_current(None)
        ticket.seal()
        context = step_span.get_span_context()
        if not context.is_valid:
            self._skipped.add("no_tracer")
            return None
        if not context.trace_flags.sampled:
            self._skipped.add("not_sampled")
            return None  # the SDK's sampler said no: no exemplar may point here
        step_hex = format(context.span_id, "016x")
        # A stage span the sampler dropped: its exemplars point at the (exported) step span.
        stage_span_ids = [span_id or step_hex for span_id in stage_span_ids]
        return StepExemplars(format(context.trace_id, "032x"), step_hex, stage_span_ids,
                             PRIORITY[reason], step_end / 1e9, ticket)

    def _on_spans_lost(self) -> None:
        self._withheld.add("span_lost")

    def _stage_spans(self, record: "StepRecord", present: list[int], step_span: trace.Span,
                     method: str, summary: "AcceptSummary | None", accept_attributes: dict,
                     offset: int) -> list[str | None]:
        starts, ends = record.starts, record.ends
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
        return stage_span_ids

    def force_flush(self, timeout_millis: int) -> None:
        provider = self._provider or trace.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        if flush is not None:
            flush(timeout_millis)

    def _links(self, record: "StepRecord") -> tuple[list[Link], int]:
        """Links to the batch's request contexts, sampled ones first, up to the limit (ours,
        and the SDK's span limit so it drops none silently); and how many were left out."""
        if not record.traceparents:
            return [], 0
        sampled: list[Link] = []
        unsampled: list[Link] = []
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
            (sampled if span_context.trace_flags.sampled else unsampled).append(
                Link(span_context, attributes))
        links = sampled + unsampled
        limit = self._max_links
        sdk_limits = getattr(self._tracer, "_span_limits", None)
        sdk_max = getattr(sdk_limits, "max_links", None)
        if sdk_max is not None:
            limit = min(limit, sdk_max)
        if len(links) > limit:
            return links[:limit], len(links) - limit
        return links, 0


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


def _warn_if_fate_unknown(provider: trace.TracerProvider | None) -> None:
    """Exemplars wait for their spans' export only behind spec_metrics.SpanExportProcessor,
    which reports each span's fate. Say once, at construction, when other processors are
    in use: their exemplars are shown at once, whether or not the spans arrive."""
    provider = provider or trace.get_tracer_provider()
    active = getattr(provider, "_active_span_processor", None)
    processors = getattr(active, "_span_processors", None)
    if not processors:
        return  # no SDK provider, or no processor yet: nothing to check
    from spec_metrics._tracing.processor import SpanExportProcessor

    others = [type(p).__name__ for p in processors if not isinstance(p, SpanExportProcessor)]
    if others:
        logger.info(
            "spec_metrics: spans go through %s, which do not report whether each span was "
            "exported; exemplars of those steps are shown at once and may point at spans "
            "that were lost. spec_metrics.SpanExportProcessor shows an exemplar only once its "
            "spans were exported.", ", ".join(others))


def _accept_attributes(summary: "AcceptSummary") -> dict:
    return {
        "spec_decode.draft_tokens": summary.draft_tokens,
        "spec_decode.accepted_tokens": summary.accepted,
        "spec_decode.emitted_tokens": summary.emitted,
        "spec_decode.acceptance_rate": (
            summary.accepted / summary.draft_tokens if summary.draft_tokens else 0.0),
    }
