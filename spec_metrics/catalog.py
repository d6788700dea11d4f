"""The metric catalog: the one place that names every metric spec_metrics exposes.

The collector, the docs table, the dashboards, the alert rules and the tests all read this
module, so a metric is renamed or re-bucketed here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MetricSpec",
    "METRICS",
    "STAGE_DURATION",
    "STEP_DURATION",
    "ACCEPTED_LENGTH",
    "DRAFT_LENGTH",
    "DRAFTER_INFO",
    "STEPS_WITHOUT_DRAFTS",
    "PLAIN_STEP_DURATION",
    "PLAIN_STEP_TOKENS",
    "DRAFTS",
    "DRAFT_TOKENS",
    "ACCEPTED_TOKENS",
    "EMITTED_TOKENS",
    "DRAFT_TOKENS_PER_POSITION",
    "ACCEPTED_TOKENS_PER_POSITION",
    "DROPPED",
    "LABEL_VALUES_FOLDED",
    "TRACED_STEPS_SKIPPED",
    "EXEMPLARS_WITHHELD",
    "COUNTERS_WITH_EXEMPLARS",
    "PER_POSITION_COUNTERS",
    "REASON_COUNTERS",
    "SPANS_EXPORTED",
    "SPANS_DROPPED",
    "VLLM_COMPAT_METRICS",
    "SPAN_EXPORT_METRICS",
    "SPAN_DROP_REASONS",
    "OTLP_METRIC_EXPORTS",
    "OTLP_METRIC_EXPORTS_FAILED",
    "OTLP_METRIC_EXPORT_METRICS",
    "OTLP_EXPORT_FAILURE_REASONS",
    "OTHER_LABEL_VALUE",
    "DEFAULT_GROUP",
    "GROUPED_METRICS",
    "STAGES",
    "DROP_REASONS",
    "SKIP_REASONS",
    "WITHHELD_REASONS",
    "DEFAULT_STAGE_BUCKETS",
    "DEFAULT_STEP_BUCKETS",
    "DEFAULT_MAX_DRAFT_TOKENS",
    "RESERVED_LABELS",
    "by_name",
    "markdown_table",
]

STAGES: tuple[str, ...] = ("draft", "verify", "draft_extend")

# Seconds. Covers a 50 µs n-gram lookup up to a 10 s stall; finer around 1–100 ms where
# GPU draft and verify passes live.
DEFAULT_STAGE_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015,
    0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
DEFAULT_STEP_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Largest K the accepted-length buckets and the position labels cover.
DEFAULT_MAX_DRAFT_TOKENS = 8

# Why an input was rejected; the values of spec_metrics_dropped_total{reason}.
DROP_REASONS: dict[str, str] = {
    "wrong_type": "accepted counts or draft tokens of a type or dtype that is not an integer array",
    "wrong_shape": "an array that is not one-dimensional, or whose length disagrees with the batch",
    "non_finite": "NaN or infinite accepted counts",
    "negative": "negative accepted counts or draft tokens",
    "accepted_exceeds_drafted": "a request accepted more tokens than were drafted for it",
    "draft_tokens_exceed_max": "more draft tokens than max_draft_tokens covers",
    "end_without_start": "a stage ended that had not started",
    "stage_not_ended": "a stage or step started while another stage was still open",
    "out_of_order": "a stage started after a later stage of the same step, without end_step()",
    "bad_traceparent": "a request trace context that is not a valid W3C traceparent",
    "pending_overflow": "too many steps waiting for device results; the oldest was dropped",
    "duplicate_logger": "a second vLLM stat logger for the same engine (entry point and "
                        "stat_loggers=[...] both): refused, so counts are not doubled",
    "groups_without_label": "verify_end(groups=...) on hooks made without group_label: "
                            "there is no label to record the groups under",
    "internal_error": "an unexpected error inside spec_metrics (please report it)",
}

# Why a step selected for tracing (slow, outlier, sampled request, ratio) was not traced;
# the values of spec_metrics_traced_steps_skipped_total{reason}.
SKIP_REASONS: dict[str, str] = {
    "rate_limited": "over max_traced_steps_per_second (ratio-sampled steps give way first)",
    "not_sampled": "the tracer provider's sampler dropped the step span",
    "no_tracer": "no OpenTelemetry SDK tracer provider is set up: spans are no-ops",
}

# Why a traced step's exemplars never reached /metrics; the values of
# spec_metrics_exemplars_withheld_total{reason}.
WITHHELD_REASONS: dict[str, str] = {
    "span_lost": "a span of the step was lost before export (queue full, export failed or "
                 "timed out, shutdown), as reported by spec_metrics.SpanExportProcessor",
}

# Label names the library sets itself; user constant labels must not use them.
RESERVED_LABELS: frozenset[str] = frozenset(
    {"method", "stage", "position", "reason", "le", "quantile", "trace_id", "span_id"}
)

MetricType = Literal["counter", "histogram", "info"]


@dataclass(frozen=True)
class MetricSpec:
    """What one metric family is. `labels` excludes the user's constant labels."""

    name: str  # full exposition name (counters end in _total)
    type: MetricType
    help: str
    unit: str  # OpenMetrics unit; the name ends with it ("" when there is none)
    labels: tuple[str, ...]
    buckets: str | None = None  # which layout: "stage", "step" or "accepted_length"
    const_labels: bool = True  # carries the user's constant labels (model, engine, ...)
    # Also carries the request-group label (HooksConfig.group_label, e.g. "group": adapter,
    # tenant, workload class) when one is set: one series per (method, group) value, the
    # groups beyond max_groups under group="other". Not in `labels`: it is optional.
    grouped: bool = False

    @property
    def family(self) -> str:
        """The family name prometheus_client uses (counters without _total, info without
        _info)."""
        if self.type == "counter":
            return self.name[: -len("_total")]
        if self.type == "info":
            return self.name[: -len("_info")]
        return self.name


# Every metric family, one named spec each: code refers to these, never to a name string.
STAGE_DURATION = MetricSpec(
    "spec_decode_stage_duration_seconds", "histogram",
    "Duration of one speculative-decoding stage for the whole batch, per decode step.",
    "seconds", ("method", "stage"), buckets="stage",
)
STEP_DURATION = MetricSpec(
    "spec_decode_step_duration_seconds", "histogram",
    "Duration of one decode step, from the first stage's start to the last stage's end.",
    "seconds", ("method",), buckets="step",
)
ACCEPTED_LENGTH = MetricSpec(
    "spec_decode_accepted_length", "histogram",
    "Draft tokens accepted per draft (a request with draft tokens in a verify pass), "
    "the bonus token not included.",
    "", ("method",), buckets="accepted_length", grouped=True,
)
DRAFT_LENGTH = MetricSpec(
    "spec_decode_draft_length", "histogram",
    "Draft tokens proposed per request in a verify pass, 0 included (a request verified "
    "without drafts: K was 0 for it, or the drafter found nothing).",
    "", ("method",), buckets="accepted_length", grouped=True,
)
STEPS_WITHOUT_DRAFTS = MetricSpec(
    "spec_decode_steps_without_drafts_total", "counter",
    "Verify passes in which no request had a draft token (K = 0 for the whole batch): "
    "plain decode steps.",
    "", ("method",),
)
PLAIN_STEP_DURATION = MetricSpec(
    "spec_decode_plain_step_duration_seconds_total", "counter",
    "Time of steps without drafts (plain decode steps), their draft and draft_extend stages "
    "excluded: what plain decoding costs in this engine.",
    "seconds", ("method",),
)
PLAIN_STEP_TOKENS = MetricSpec(
    "spec_decode_plain_step_tokens_total", "counter",
    "Tokens emitted by steps without drafts: one per request verified.",
    "tokens", ("method",),
)
DRAFTS = MetricSpec(
    "spec_decode_drafts_total", "counter",
    "Draft sequences verified: requests that had at least one draft token in a verify pass.",
    "", ("method",), grouped=True,
)
DRAFT_TOKENS = MetricSpec(
    "spec_decode_draft_tokens_total", "counter",
    "Draft tokens proposed and verified.",
    "tokens", ("method",), grouped=True,
)
ACCEPTED_TOKENS = MetricSpec(
    "spec_decode_accepted_tokens_total", "counter",
    "Draft tokens accepted by the target model.",
    "tokens", ("method",), grouped=True,
)
EMITTED_TOKENS = MetricSpec(
    "spec_decode_emitted_tokens_total", "counter",
    "Tokens emitted by verify passes: accepted draft tokens plus one target token per request.",
    "tokens", ("method",), grouped=True,
)
DRAFT_TOKENS_PER_POSITION = MetricSpec(
    "spec_decode_draft_tokens_per_position_total", "counter",
    "Draft tokens proposed at each draft position (0 is the first draft token).",
    "", ("method", "position"), grouped=True,
)
ACCEPTED_TOKENS_PER_POSITION = MetricSpec(
    "spec_decode_accepted_tokens_per_position_total", "counter",
    "Draft tokens accepted at each draft position (0 is the first draft token).",
    "", ("method", "position"), grouped=True,
)
DRAFTER_INFO = MetricSpec(
    "spec_decode_drafter_info", "info",
    "What the engine declared it speculates with, per method: the target model, the "
    "drafter and K (num_speculative_tokens). Value 1; a new declaration replaces the "
    "label set (the dashboard marks the change).",
    "", ("method", "target", "drafter", "num_speculative_tokens"),
)
DROPPED = MetricSpec(
    "spec_metrics_dropped_total", "counter",
    "Hook inputs spec_metrics rejected instead of recording, by reason.",
    "", ("reason",),
)
LABEL_VALUES_FOLDED = MetricSpec(
    "spec_metrics_label_values_folded_total", "counter",
    "Recorded under the label value \"other\" because the label already had its maximum "
    "number of distinct values, by label: steps for label=\"method\" (max_methods), "
    "requests for the request-group label (max_groups).",
    "", ("label",),
)
TRACED_STEPS_SKIPPED = MetricSpec(
    "spec_metrics_traced_steps_skipped_total", "counter",
    "Steps selected for tracing (slow, outlier, sampled request or ratio) whose spans were "
    "not made, by reason: rate_limited (over max_traced_steps_per_second; ratio-sampled "
    "steps give way first), not_sampled (the tracer provider's sampler dropped the span), "
    "no_tracer (no SDK tracer provider).",
    "", ("reason",),
)
EXEMPLARS_WITHHELD = MetricSpec(
    "spec_metrics_exemplars_withheld_total", "counter",
    "Traced steps whose exemplars were withheld from /metrics because their spans were "
    "not exported, by reason: span_lost (queue full, export failed or timed out, shutdown; "
    "known with spec_metrics.SpanExportProcessor only).",
    "", ("reason",),
)

# In exposition order.
METRICS: tuple[MetricSpec, ...] = (
    STAGE_DURATION,
    STEP_DURATION,
    ACCEPTED_LENGTH,
    DRAFT_LENGTH,
    DRAFTS,
    DRAFT_TOKENS,
    ACCEPTED_TOKENS,
    EMITTED_TOKENS,
    STEPS_WITHOUT_DRAFTS,
    PLAIN_STEP_DURATION,
    PLAIN_STEP_TOKENS,
    DRAFT_TOKENS_PER_POSITION,
    ACCEPTED_TOKENS_PER_POSITION,
    DRAFTER_INFO,
    DROPPED,
    LABEL_VALUES_FOLDED,
    TRACED_STEPS_SKIPPED,
    EXEMPLARS_WITHHELD,
)
# The families that carry the request-group label when one is set, in exposition order.
GROUPED_METRICS: tuple[MetricSpec, ...] = tuple(spec for spec in METRICS if spec.grouped)
# Counters whose every increment may carry an exemplar (the verify span), in this order.
COUNTERS_WITH_EXEMPLARS: tuple[MetricSpec, ...] = (DRAFTS, DRAFT_TOKENS, ACCEPTED_TOKENS,
                                                   EMITTED_TOKENS)
PER_POSITION_COUNTERS: tuple[MetricSpec, ...] = (DRAFT_TOKENS_PER_POSITION,
                                                 ACCEPTED_TOKENS_PER_POSITION)
# Counters labelled by `reason`, with the reasons each takes (every one is always exposed).
REASON_COUNTERS: dict[MetricSpec, tuple[str, ...]] = {
    DROPPED: tuple(DROP_REASONS),
    TRACED_STEPS_SKIPPED: tuple(SKIP_REASONS),
    EXEMPLARS_WITHHELD: tuple(WITHHELD_REASONS),
}

# Label value that steps of methods beyond `max_methods`, and requests of groups beyond
# `max_groups`, are recorded under.
OTHER_LABEL_VALUE = "other"
# Group of the requests of a verify_end without `groups`, when a group label is set.
DEFAULT_GROUP = "default"

# Spans of spec_metrics' own export pipeline (_tracing/processor.py), one set per registry:
# they carry no constant labels and no `method`, since the export queue is shared by every
# hooks object.
SPAN_DROP_REASONS: tuple[str, ...] = ("queue_full", "export_failed", "export_timeout",
                                      "shutdown")
SPANS_EXPORTED = MetricSpec("spec_metrics_spans_exported_total", "counter",
               "Spans the exporter accepted (spec_metrics.SpanExportProcessor; summed over "
               "every processor registered in the registry).", "", (),
               const_labels=False)
SPANS_DROPPED = MetricSpec("spec_metrics_spans_dropped_total", "counter",
               "Spans lost before export, by reason: queue_full (the bounded queue was full), "
               "export_failed (the exporter returned failure, e.g. the collector is down), "
               "export_timeout (no answer within the export timeout; they may still arrive, "
               "their exemplars are withheld), shutdown (still queued when shutdown ran out of "
               "time, or ended after shutdown). Summed over every SpanExportProcessor "
               "registered in the registry.", "", ("reason",),
               const_labels=False)
SPAN_EXPORT_METRICS: tuple[MetricSpec, ...] = (SPANS_EXPORTED, SPANS_DROPPED)

# The OTLP metrics push (spec_metrics.start_otlp_metrics_exporter), one set per registry like
# the span metrics: every push of the registry's series to an OTLP collector, and why one
# did not arrive.
OTLP_EXPORT_FAILURE_REASONS: dict[str, str] = {
    "export_failed": "the exporter returned failure: collector down or refusing, an HTTP "
                     "error, a request too large",
    "export_timeout": "no answer within the export timeout (OTEL_METRIC_EXPORT_TIMEOUT), or "
                      "the previous push still hung on the wire then",
}
OTLP_METRIC_EXPORTS = MetricSpec(
    "spec_metrics_otlp_metric_exports_total", "counter",
    "Pushes of the registry's spec_metrics series over OTLP that the collector accepted "
    "(spec_metrics.start_otlp_metrics_exporter).", "", (),
    const_labels=False)
OTLP_METRIC_EXPORTS_FAILED = MetricSpec(
    "spec_metrics_otlp_metric_exports_failed_total", "counter",
    "Pushes of the registry's spec_metrics series over OTLP that did not arrive, by reason: "
    "export_failed (the exporter returned failure: collector down or refusing, an HTTP "
    "error), export_timeout (no answer within the export timeout, or the previous push "
    "still hung then). Cumulative pushes lose nothing but freshness; a failed delta push is "
    "carried into the next one, a timed-out one is lost.", "", ("reason",),
    const_labels=False)
OTLP_METRIC_EXPORT_METRICS: tuple[MetricSpec, ...] = (OTLP_METRIC_EXPORTS,
                                                      OTLP_METRIC_EXPORTS_FAILED)

# vLLM's own speculative-decoding counters (vllm/v1/spec_decode/metrics.py, SpecDecodingProm),
# with vLLM's names, help texts and labels, for `spec_metrics.integrations.vllm` when asked to
# emit them (vllm_names=True). Kept out of METRICS: they are not spec_metrics' series, and the
# README table, dashboards and rules must not change with them.
VLLM_COMPAT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("vllm:spec_decode_num_drafts_total", "counter",
               "Number of spec decoding drafts.", "", ("model_name", "engine"),
               const_labels=False),
    MetricSpec("vllm:spec_decode_num_draft_tokens_total", "counter",
               "Number of draft tokens.", "", ("model_name", "engine"), const_labels=False),
    MetricSpec("vllm:spec_decode_num_accepted_tokens_total", "counter",
               "Number of accepted tokens.", "", ("model_name", "engine"), const_labels=False),
    MetricSpec("vllm:spec_decode_num_accepted_tokens_per_pos_total", "counter",
               "Accepted tokens per draft position.", "", ("model_name", "engine", "position"),
               const_labels=False),
)

_BY_NAME = {spec.name: spec for spec in METRICS}


def by_name(name: str) -> MetricSpec:
    """The spec of a metric, by its exposition name (counters with _total)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in the spec_metrics catalog") from None


def markdown_table(specs: tuple[MetricSpec, ...] | None = None) -> str:
    """The catalog (or `specs`) as a Markdown table, for the README and docs."""
    rows = [
        "| metric | type | unit | labels | help |",
        "|---|---|---|---|---|",
    ]
    for spec in METRICS if specs is None else specs:
        labels = ", ".join(f"`{label}`" for label in spec.labels)
        if spec.grouped:
            labels += ", group label (with `group_label`)"
        if spec.const_labels:
            labels += ", constant labels"
        rows.append(
            f"| `{spec.name}` | {spec.type} | {spec.unit or '-'} | {labels} | {spec.help} |"
        )
    return "\n".join(rows) + "\n"
