"""Configuration of the hooks, validated once at construction.

Every option can be given to `SpecDecodeHooks(...)`; a few can also come from the
environment (`SPEC_METRICS_*`, listed in `ENV_VARS`). An explicit argument wins over the
environment, which wins over the default.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from spec_metrics.catalog import (
    DEFAULT_MAX_DRAFT_TOKENS,
    DEFAULT_STAGE_BUCKETS,
    DEFAULT_STEP_BUCKETS,
    RESERVED_LABELS,
    STAGES,
)

__all__ = ["HooksConfig", "ENV_VARS", "check_group_label"]

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# option name -> (environment variable, parser)
ENV_VARS: dict[str, tuple[str, str]] = {
    "enabled": ("SPEC_METRICS_ENABLED", "bool"),
    "metrics": ("SPEC_METRICS_METRICS", "bool"),
    "tracing": ("SPEC_METRICS_TRACING", "bool"),
    "strict": ("SPEC_METRICS_STRICT", "bool"),
    "trace_ratio": ("SPEC_METRICS_TRACE_RATIO", "float"),
    "slow_step_seconds": ("SPEC_METRICS_SLOW_STEP_SECONDS", "float"),
    "slow_stage_seconds": ("SPEC_METRICS_SLOW_STAGE_SECONDS", "float"),
    "outlier_quantile": ("SPEC_METRICS_OUTLIER_QUANTILE", "float"),
    "consumer": ("SPEC_METRICS_CONSUMER", "str"),
}


def _parse_env(name: str, raw: str, kind: str) -> Any:
    raw = raw.strip()
    if kind == "str":
        return raw
    if kind == "bool":
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r}: use 1/0, true/false, yes/no or on/off")
    if raw.lower() in ("", "none", "off"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class HooksConfig:
    """All options of `SpecDecodeHooks`. Build it with `HooksConfig.resolve(**options)`."""

    method: str = "unknown"
    labels: Mapping[str, str] = field(default_factory=dict)
    enabled: bool = True
    metrics: bool = True
    tracing: bool = True
    strict: bool = False
    # Fraction of ordinary steps whose spans are exported (outliers and steps of sampled
    # requests are exported regardless).
    trace_ratio: float = 0.01
    # Absolute outlier thresholds; None turns that check off.
    slow_step_seconds: float | None = None
    slow_stage_seconds: float | Mapping[str, float] | None = None
    # Running quantile above which a step or stage counts as an outlier; None turns it off.
    # Checked on 4 series (3 stages and the step), so about 4 x (1 - q) of steps qualify.
    outlier_quantile: float | None = 0.999
    outlier_min_samples: int = 200
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS
    stage_buckets: tuple[float, ...] = DEFAULT_STAGE_BUCKETS
    step_buckets: tuple[float, ...] = DEFAULT_STEP_BUCKETS
    # Steps whose device results (CUDA tensors) are not ready yet; beyond this the oldest
    # is dropped rather than waiting on the device.
    max_pending_steps: int = 256
    # Where finished steps are checked, traced and aggregated: "worker" (spec_metrics'
    # thread, and scrapes, which first consume what is queued), or "inline" (end_step() on
    # the engine thread). Strict mode is always inline, so its errors come from the hooks.
    consumer: str = "worker"
    # Finished steps handed to the worker and not yet consumed; beyond this end_step()
    # consumes 128 of them on the engine thread (waiting at most 10 ms for another consumer's
    # chunk, else dropping the oldest: pending_overflow).
    max_queued_steps: int = 4096
    # With consumer="inline": finished steps are handed to the sinks this many at a time, in
    # one hot loop, instead of one by one between the engine's own work (where the CPU caches
    # are cold and the same code costs several times more). Metrics lag by up to
    # batch_steps - 1 steps; poll() hands a partial batch over. Strict mode keeps its checks
    # at the hook. The worker batches by itself.
    batch_steps: int = 1
    # Distinct `method` label values a collector keeps; steps of further methods are
    # recorded under method="other" and counted in spec_metrics_label_values_folded_total.
    max_methods: int = 32
    # Label name under which acceptance is broken down by request group (adapter, tenant,
    # workload class), e.g. "group": verify_end(..., groups=[...]) gives one value per
    # request. None: no group label (and groups= is rejected). See catalog.GROUPED_METRICS.
    group_label: str | None = None
    # Distinct group values a collector keeps; requests of further values are recorded
    # under group="other" and counted in spec_metrics_label_values_folded_total.
    max_groups: int = 16
    # "cpu": perf_counter_ns at the hooks. "cuda": CUDA events recorded at the hooks and
    # read once completed, for stages whose work runs on the GPU.
    timer: str = "cpu"
    # The order stages run in within one step, e.g. ("verify", "draft", "draft_extend") for
    # an engine whose iteration verifies the previous drafts and then drafts (vLLM). A stage
    # started before one that comes after it in this order closes the step (out_of_order).
    stage_order: tuple[str, ...] = STAGES
    warn_interval_seconds: float = 60.0
    # Most steps traced per second, whatever the reason: a burst of outliers must not
    # overflow the span processor's queue (its default holds 2048 spans = 512 steps), since
    # an exemplar must point at a span that is really exported.
    max_traced_steps_per_second: float = 100.0
    # Links from a step span to the request contexts of its batch (sampled ones first); the
    # rest are counted in the span's spec_decode.links_dropped attribute. The tracer
    # provider's own span limit (OTEL_SPAN_LINK_COUNT_LIMIT, 128 by default in the SDK) caps
    # it too: make_tracer_provider sets it to 1024.
    max_links_per_step: int = 256
    # An exemplar is kept until an OpenMetrics scrape has shown it, or for this long.
    exemplar_hold_seconds: float = 60.0

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, **options: Any) -> "HooksConfig":
        """Defaults, then `SPEC_METRICS_*` variables, then explicit options. An explicit None
        is a value (it turns an optional check off), except for `labels` (no labels)."""
        environ = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name, (var, kind) in ENV_VARS.items():
            if var in environ:
                values[name] = _parse_env(var, environ[var], kind)
        if options.get("labels", ()) is None:
            options["labels"] = {}
        values.update(options)
        return cls(**values)

    def __post_init__(self) -> None:
        _check(isinstance(self.method, str) and _short_nonempty(self.method),
               f"method must be a non-empty string, got {self.method!r}")
        labels = dict(self.labels)
        for name, value in labels.items():
            _check(isinstance(name, str) and bool(_LABEL_NAME.match(name)),
                   f"constant label name {name!r} is not a valid Prometheus label name")
            _check(not name.startswith("__"),
                   f"constant label name {name!r}: names starting with '__' are reserved")
            _check(name not in RESERVED_LABELS,
                   f"constant label name {name!r} is set by spec_metrics itself; "
                   f"reserved: {', '.join(sorted(RESERVED_LABELS))}")
            _check(isinstance(value, str),
                   f"constant label {name}={value!r}: values must be strings")
        object.__setattr__(self, "labels", labels)
        _check(0.0 <= self.trace_ratio <= 1.0,
               f"trace_ratio must be within [0, 1], got {self.trace_ratio!r}")
        if self.outlier_quantile is not None:
            _check(0.5 <= self.outlier_quantile < 1.0,
                   "outlier_quantile must be within [0.5, 1) or None, "
                   f"got {self.outlier_quantile!r}")
        _check(self.outlier_min_samples >= 1,
               f"outlier_min_samples must be >= 1, got {self.outlier_min_samples!r}")
        if self.slow_step_seconds is not None:
            _check(_positive(self.slow_step_seconds),
                   f"slow_step_seconds must be a positive number, got {self.slow_step_seconds!r}")
        if isinstance(self.slow_stage_seconds, Mapping):
            for stage, limit in self.slow_stage_seconds.items():
                _check(stage in STAGES,
                       f"slow_stage_seconds: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
                _check(_positive(limit),
                       f"slow_stage_seconds[{stage!r}] must be a positive number, got {limit!r}")
        elif self.slow_stage_seconds is not None:
            _check(_positive(self.slow_stage_seconds),
                   f"slow_stage_seconds must be a positive number, got {self.slow_stage_seconds!r}")
        _check(isinstance(self.max_draft_tokens, int) and 1 <= self.max_draft_tokens <= 64,
               f"max_draft_tokens must be an integer within [1, 64], got {self.max_draft_tokens!r}")
        for name in ("stage_buckets", "step_buckets"):
            buckets = tuple(float(b) for b in getattr(self, name))
            _check(len(buckets) > 0, f"{name} must not be empty")
            _check(all(math.isfinite(b) and b > 0 for b in buckets),
                   f"{name} must be finite positive seconds (+Inf is added for you), got {buckets}")
            _check(all(a < b for a, b in zip(buckets, buckets[1:])),
                   f"{name} must be strictly increasing, got {buckets}")
            object.__setattr__(self, name, buckets)
        order = tuple(self.stage_order)
        _check(sorted(order) == sorted(STAGES),
               f"stage_order must name each of {', '.join(STAGES)} once, got {order!r}")
        object.__setattr__(self, "stage_order", order)
        _check(self.timer in ("cpu", "cuda"), f"timer must be 'cpu' or 'cuda', got {self.timer!r}")
        _check(self.consumer in ("worker", "inline"),
               f"consumer must be 'worker' or 'inline', got {self.consumer!r}")
        _check(isinstance(self.max_queued_steps, int) and self.max_queued_steps >= 1,
               f"max_queued_steps must be an integer >= 1, got {self.max_queued_steps!r}")
        _check(self.max_pending_steps >= 1,
               f"max_pending_steps must be >= 1, got {self.max_pending_steps!r}")
        _check(isinstance(self.batch_steps, int) and 1 <= self.batch_steps <= 4096,
               f"batch_steps must be an integer within [1, 4096], got {self.batch_steps!r}")
        _check(isinstance(self.max_methods, int) and self.max_methods >= 1,
               f"max_methods must be an integer >= 1, got {self.max_methods!r}")
        check_group_label(self.group_label, self.max_groups, labels)
        _check(self.max_traced_steps_per_second > 0,
               "max_traced_steps_per_second must be > 0, "
               f"got {self.max_traced_steps_per_second!r}")
        _check(isinstance(self.max_links_per_step, int) and self.max_links_per_step >= 0,
               f"max_links_per_step must be an integer >= 0, got {self.max_links_per_step!r}")
        _check(self.exemplar_hold_seconds >= 0,
               f"exemplar_hold_seconds must be >= 0, got {self.exemplar_hold_seconds!r}")
        _check(self.warn_interval_seconds >= 0,
               f"warn_interval_seconds must be >= 0, got {self.warn_interval_seconds!r}")

    def slow_stage_limit(self, stage: str) -> float | None:
        if isinstance(self.slow_stage_seconds, Mapping):
            return self.slow_stage_seconds.get(stage)
        return self.slow_stage_seconds


def check_group_label(group_label: Any, max_groups: Any, labels: Mapping[str, str]) -> None:
    """ValueError unless `group_label` is None or a label name spec_metrics may add to the
    grouped series beside `labels` (the constant labels), and `max_groups` an int >= 1."""
    _check(isinstance(max_groups, int) and not isinstance(max_groups, bool)
           and max_groups >= 1,
           f"max_groups must be an integer >= 1 (distinct group values kept per collector), "
           f"got {max_groups!r}")
    if group_label is None:
        return
    _check(isinstance(group_label, str) and bool(_LABEL_NAME.match(group_label))
           and not group_label.startswith("__"),
           f"group_label={group_label!r} is not a valid Prometheus label name: use letters, "
           "digits and underscores, not starting with a digit or '__', e.g. group_label="
           "'group' or 'tenant'")
    _check(group_label not in RESERVED_LABELS,
           f"group_label={group_label!r} is a label spec_metrics sets itself (reserved: "
           f"{', '.join(sorted(RESERVED_LABELS))}); choose another name, e.g. 'group'")
    _check(group_label not in labels,
           f"group_label={group_label!r} is also a constant label ({group_label}="
           f"{labels.get(group_label)!r}); remove it from labels= or choose another "
           "group_label")


def _short_nonempty(value: str) -> bool:
    return bool(value) and len(value) <= 128


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"spec_metrics: {message}")
