"""The registry's spec_metrics series as OpenTelemetry SDK metric data, for the OTLP push.

Read from the families the collectors' `collect()` yields: the snapshot /metrics renders
(every queued step consumed first, only exemplars whose spans were exported), so the values
pushed are, by construction, those /metrics shows at the same moment. Nothing here runs on
the engine thread; nothing calls an OpenTelemetry instrument.

Names and units (docs/otlp-metrics.md has the table, `otlp_names_table()`): the OTLP name is
the Prometheus name without the suffixes a Prometheus-compatible OTLP backend adds back
(OpenTelemetry's Prometheus compatibility rules, Prometheus' own OTLP receiver): `_total` of a
monotonic sum, and `_seconds` of unit `s`. `tokens` becomes the UCUM annotation `{token}`,
which adds no suffix, so those names keep the word. Histograms are explicit-bucket
histograms (counts per bucket, the `le` bounds without +Inf, sum and count; no min/max),
counters monotonic sums, the info metric a gauge of 1; attributes are the labels.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Iterable, NamedTuple

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from spec_metrics.catalog import (
    METRICS,
    OTLP_METRIC_EXPORT_METRICS,
    SPAN_EXPORT_METRICS,
    MetricSpec,
)

__all__ = ["Reading", "Series", "metrics_data", "otlp_name", "otlp_names_table", "otlp_unit",
           "read"]

PUSHED: tuple[MetricSpec, ...] = (*METRICS, *SPAN_EXPORT_METRICS, *OTLP_METRIC_EXPORT_METRICS)
_BY_FAMILY = {spec.family: spec for spec in PUSHED}
# Catalog unit -> OTLP (UCUM) unit. Prometheus maps "s" back to the `_seconds` suffix; an
# annotation in braces maps to no suffix.
_UNITS = {"seconds": "s", "tokens": "{token}"}
_SUFFIX_FROM_UNIT = {"seconds": "_seconds"}
_KINDS = {"counter": "sum", "histogram": "histogram", "info": "gauge"}
# Unknown: our aggregation keeps no minimum or maximum (left unset in the protobuf).
_UNSET: Any = None

Attributes = tuple[tuple[str, str], ...]


def otlp_name(spec: MetricSpec) -> str:
    """The OTLP name of a catalog metric: the exposition name less `_total` (counters) and
    less the unit suffix a backend derives from the unit (`_seconds`)."""
    name = spec.name[: -len("_total")] if spec.type == "counter" else spec.name
    suffix = _SUFFIX_FROM_UNIT.get(spec.unit)
    return name[: -len(suffix)] if suffix and name.endswith(suffix) else name


def otlp_unit(spec: MetricSpec) -> str:
    return _UNITS.get(spec.unit, spec.unit)


def otlp_names_table() -> str:
    """Markdown: each pushed metric, its OTLP name, type and unit, and its /metrics name."""
    types = {"counter": "Sum (monotonic)", "histogram": "Histogram (explicit buckets)",
             "info": "Gauge (value 1)"}
    rows = ["| /metrics | OTLP name | OTLP type | OTLP unit |", "|---|---|---|---|"]
    for spec in PUSHED:
        rows.append(f"| `{spec.name}` | `{otlp_name(spec)}` | {types[spec.type]} | "
                    f"{'`' + otlp_unit(spec) + '`' if otlp_unit(spec) else '-'} |")
    return "\n".join(rows) + "\n"


class Series(NamedTuple):
    """One series at one moment (a histogram's counts per bucket, not cumulative)."""

    attributes: Attributes
    start_ns: int  # when its collector started counting
    value: float  # a sum or gauge; a histogram's sum
    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    observations: int = 0  # a histogram's count
    exemplars: tuple[Exemplar, ...] = ()


class Family(NamedTuple):
    spec: MetricSpec
    series: list[Series]


# OTLP name -> family, in registry order.
Reading = dict[str, Family]


def read(sources: Iterable[tuple[Any, int]], now_ns: int) -> Reading:
    """The families of `(collector, start_ns)` pairs, as series; `now_ns` stands in for an
    exemplar without a timestamp."""
    reading: Reading = {}
    for collector, start_ns in sources:
        for family in collector.collect():
            spec = _BY_FAMILY.get(family.name)
            if spec is None:
                continue
            target = reading.setdefault(otlp_name(spec), Family(spec, []))
            if spec.type == "histogram":
                target.series.extend(_histograms(family, start_ns, now_ns))
            else:
                sample_name = spec.name  # counters with _total, the info metric with _info
                target.series.extend(
                    Series(_attributes(sample.labels), start_ns, float(sample.value),
                           exemplars=_exemplars([sample.exemplar], now_ns))
                    for sample in family.samples if sample.name == sample_name)
    return reading


def _histograms(family: Any, start_ns: int, now_ns: int) -> list[Series]:
    parts: dict[Attributes, dict[str, Any]] = {}
    for sample in family.samples:
        suffix = sample.name[len(family.name):]
        labels = dict(sample.labels)
        le = labels.pop("le", None)
        part = parts.setdefault(_attributes(labels), {"buckets": [], "sum": 0.0})
        if suffix == "_bucket" and le is not None:
            part["buckets"].append((le, sample.value, sample.exemplar))
        elif suffix == "_sum":
            part["sum"] = float(sample.value)
    out = []
    for attributes, part in parts.items():
        buckets = part["buckets"]
        cumulative = [int(value) for _, value, _ in buckets]
        counts = tuple(c - p for c, p in zip(cumulative, [0, *cumulative[:-1]]))
        bounds = tuple(float(le) for le, _, _ in buckets if le != "+Inf")
        out.append(Series(attributes, start_ns, part["sum"], bounds, counts,
                          cumulative[-1] if cumulative else 0,
                          _exemplars([exemplar for _, _, exemplar in buckets], now_ns)))
    return out


def _attributes(labels: dict[str, str]) -> Attributes:
    return tuple(labels.items())


def _exemplars(exemplars: list[Any], now_ns: int) -> tuple[Exemplar, ...]:
    """prometheus_client exemplars as OTLP ones, sorted by value."""
    out = []
    for exemplar in exemplars:
        if exemplar is None:
            continue
        labels = dict(exemplar.labels)
        trace_id, span_id = labels.pop("trace_id", None), labels.pop("span_id", None)
        out.append(Exemplar(
            filtered_attributes=labels, value=float(exemplar.value),
            time_unix_nano=now_ns if exemplar.timestamp is None else _ns(exemplar.timestamp),
            span_id=_hex(span_id), trace_id=_hex(trace_id)))
    return tuple(sorted(out, key=lambda e: e.value))


def _ns(seconds: Any) -> int:
    """Nanoseconds of a timestamp exactly as OpenMetrics writes it (its decimal digits)."""
    return int(Decimal(str(seconds)) * 1_000_000_000)


def _hex(value: str | None) -> int | None:
    try:
        return int(value, 16) if value else None
    except ValueError:
        return None


def _exemplar_key(exemplar: Exemplar) -> tuple:
    return (exemplar.trace_id, exemplar.span_id, exemplar.value, exemplar.time_unix_nano)


def metrics_data(reading: Reading, now_ns: int, resource: Resource,
                 scope: InstrumentationScope, delta: bool = False,
                 baseline: Reading | None = None, baseline_ns: int = 0) -> MetricsData:
    """The SDK's MetricsData of `reading` taken at `now_ns`: cumulative (start time: when
    the series' collector started counting), or with `delta`, the differences from
    `baseline` taken at `baseline_ns` (None: the first push, everything since the start),
    carrying only exemplars that `baseline` did not."""
    previous: dict[tuple[str, Attributes], Series] = {}
    if delta and baseline is not None:
        previous = {(name, s.attributes): s for name, family in baseline.items()
                    for s in family.series}
    temporality = (AggregationTemporality.DELTA if delta
                   else AggregationTemporality.CUMULATIVE)
    metrics = []
    for name, family in reading.items():
        if not family.series:  # /metrics shows only its header (no drafter declared)
            continue
        kind = _KINDS[family.spec.type]
        points: list[Any] = []
        for series in family.series:
            start_ns = series.start_ns
            if kind != "gauge" and delta:
                before = previous.get((name, series.attributes))
                start_ns = max(baseline_ns, series.start_ns) if baseline is not None \
                    else series.start_ns
                series = _difference(series, before)
            points.append(_point(kind, series, start_ns, now_ns))
        if kind == "histogram":
            data: Any = Histogram(points, temporality)
        elif kind == "sum":
            data = Sum(points, temporality, is_monotonic=True)
        else:
            data = Gauge(points)
        metrics.append(Metric(name, family.spec.help, otlp_unit(family.spec), data))
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")], "")])


def _difference(now: Series, before: Series | None) -> Series:
    """`now` less `before`, or all of `now` when it is new or went back (a reset)."""
    if before is None or before.bounds != now.bounds or now.observations < before.observations \
            or now.value < before.value or any(
                c < p for c, p in zip(now.counts, before.counts)):
        return now
    seen = {_exemplar_key(e) for e in before.exemplars}
    return now._replace(
        value=now.value - before.value, observations=now.observations - before.observations,
        counts=tuple(c - p for c, p in zip(now.counts, before.counts)),
        exemplars=tuple(e for e in now.exemplars if _exemplar_key(e) not in seen))


def _point(kind: str, series: Series, start_ns: int, now_ns: int) -> Any:
    attributes = dict(series.attributes)
    if kind == "histogram":
        return HistogramDataPoint(
            attributes=attributes, start_time_unix_nano=start_ns, time_unix_nano=now_ns,
            count=series.observations, sum=series.value, bucket_counts=list(series.counts),
            explicit_bounds=list(series.bounds), min=_UNSET, max=_UNSET,
            exemplars=list(series.exemplars))
    if kind == "sum":
        return NumberDataPoint(attributes, start_ns, now_ns, series.value,
                               list(series.exemplars))
    return NumberDataPoint(attributes, 0, now_ns, series.value)
