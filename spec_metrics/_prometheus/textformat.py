"""Fast text exposition of a SpecDecodeCollector, byte-identical to prometheus_client's.

prometheus_client formats every sample from scratch on every scrape: it sorts and escapes
each label set, one character at a time for names in the OpenMetrics writer (0.26). Our
series have a fixed layout (the same families, label sets and bucket bounds for as long as
a method exists), so everything but the numbers is formatted once per method here and a
scrape only joins cached prefixes with the current values. Both writers (OpenMetrics 1.0 and
the classic text format) are reproduced for the legacy name charset, which is all the
catalog uses; tests compare the output with prometheus_client's byte for byte.
"""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING, Mapping, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from spec_metrics.catalog import (
    ACCEPTED_LENGTH,
    COUNTERS_WITH_EXEMPLARS,
    DRAFT_LENGTH,
    DRAFTER_INFO,
    LABEL_VALUES_FOLDED,
    METRICS,
    PER_POSITION_COUNTERS,
    STAGE_DURATION,
    STAGES,
    STEP_DURATION,
    STEPS_WITHOUT_DRAFTS,
    MetricSpec,
)

if TYPE_CHECKING:
    from spec_metrics._prometheus.series import Snapshot

__all__ = ["SeriesText", "family_header", "format_count", "label_text", "render_snapshot"]


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_text(labels: Mapping[str, str]) -> str:
    """`{a="1",b="2"}` with names sorted and values escaped, as both writers do."""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels.items())) + "}"


def format_count(n: int) -> str:
    """floatToGoString(float(n)) for a non-negative int, without the float round trip for
    the common case (below 1e6 Python's repr has no exponent and Go's neither)."""
    if 0 <= n < 1_000_000:
        return f"{n}.0"
    return floatToGoString(n)


def _exemplar_text(exemplar: Exemplar) -> str:
    labels = ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(exemplar.labels.items()))
    text = f" # {{{labels}}} {floatToGoString(exemplar.value)}"
    return text if exemplar.timestamp is None else f"{text} {exemplar.timestamp}"


def family_header(family: Metric, openmetrics: bool) -> str:
    """The HELP/TYPE(/UNIT) lines prometheus_client writes before a family's samples."""
    name, doc = family.name, family.documentation
    if openmetrics:
        head = f"# HELP {name} {_escape_value(doc)}\n# TYPE {name} {family.type}\n"
        return head + (f"# UNIT {name} {family.unit}\n" if family.unit else "")
    kind = family.type
    if kind == "counter":
        name += "_total"
    elif kind == "info":  # as prometheus_client writes it in the classic format
        name += "_info"
        kind = "gauge"
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


class _HistogramText:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, name: str, labels: dict[str, str], les: Sequence[str]) -> None:
        self.buckets = [f"{name}_bucket{label_text({**labels, 'le': le})} " for le in les]
        self.count = f"{name}_count{label_text(labels)} "
        self.sum = f"{name}_sum{label_text(labels)} "

    def render(self, out: list[str], counts: Sequence[int], total: float,
               exemplars: Sequence[Exemplar | None] | None) -> None:
        cumulative = 0
        if exemplars is None:
            for prefix, cumulative in zip(self.buckets, accumulate(counts)):
                out.append(f"{prefix}{format_count(cumulative)}\n")
        else:
            for prefix, cumulative, exemplar in zip(self.buckets, accumulate(counts),
                                                    exemplars):
                tail = "" if exemplar is None else _exemplar_text(exemplar)
                out.append(f"{prefix}{format_count(cumulative)}{tail}\n")
        out.append(f"{self.count}{format_count(cumulative)}\n")
        out.append(f"{self.sum}{floatToGoString(total)}\n")


class SeriesText:
    """Every sample prefix (`name{labels} `) of one method, formatted once."""

    def __init__(self, method: str, const: Mapping[str, str], stage_les: Sequence[str],
                 step_les: Sequence[str], length_les: Sequence[str],
                 positions: Sequence[str]) -> None:
        base = {"method": method, **const}
        self.stages = [_HistogramText(STAGE_DURATION.name, {**base, "stage": stage}, stage_les)
                       for stage in STAGES]
        self.step = _HistogramText(STEP_DURATION.name, base, step_les)
        self.length = _HistogramText(ACCEPTED_LENGTH.name, base, length_les)
        self.draft_length = _HistogramText(DRAFT_LENGTH.name, base, length_les)
        self.plain_steps = f"{STEPS_WITHOUT_DRAFTS.name}{label_text(base)} "
        self.counters = [f"{spec.name}{label_text(base)} " for spec in COUNTERS_WITH_EXEMPLARS]
        self.positions = [[f"{spec.name}{label_text({**base, 'position': p})} "
                           for p in positions] for spec in PER_POSITION_COUNTERS]


def render_snapshot(snapshot: "Snapshot", texts: Mapping[str, SeriesText],
                    headers: Mapping[MetricSpec, str],
                    reason_prefixes: Mapping[tuple[MetricSpec, str], str],
                    folded_prefix: str, openmetrics: bool, out: list[str],
                    drafter_prefixes: Sequence[str] = ()) -> None:
    """Append the collector's families in catalog order (as collect() yields them)."""
    series = [(texts[method], data) for method, *data in snapshot.series]
    keep = openmetrics  # only OpenMetrics carries exemplars
    for spec in METRICS:
        out.append(headers[spec])
        if spec is STAGE_DURATION:
            for text, (latency, *_rest) in series:
                for stage_text, (counts, total, exemplars) in zip(text.stages, latency[:-1]):
                    stage_text.render(out, counts, total, exemplars if keep else None)
        elif spec is STEP_DURATION:
            for text, (latency, *_rest) in series:
                counts, total, exemplars = latency[-1]
                text.step.render(out, counts, total, exemplars if keep else None)
        elif spec is ACCEPTED_LENGTH:
            for text, (_l, accepted_hist, _d, length_ex, _c, _s, _p) in series:
                counts = [*accepted_hist.tolist(), 0]
                total = float(sum(i * n for i, n in enumerate(counts)))
                text.length.render(out, counts, total, length_ex if keep else None)
        elif spec is DRAFT_LENGTH:
            for text, (_l, _a, draft_hist, _e, _c, _s, _p) in series:
                counts = [*draft_hist.tolist(), 0]
                total = float(sum(i * n for i, n in enumerate(counts)))
                text.draft_length.render(out, counts, total, None)
        elif spec is STEPS_WITHOUT_DRAFTS:
            for text, (*_rest, plain) in series:
                out.append(f"{text.plain_steps}{format_count(plain)}\n")
        elif spec in COUNTERS_WITH_EXEMPLARS:
            index = COUNTERS_WITH_EXEMPLARS.index(spec)
            for text, (_l, _a, _d, _e, counter_ex, totals, _p) in series:
                exemplar = counter_ex[index] if keep else None
                tail = "" if exemplar is None else _exemplar_text(exemplar)
                out.append(f"{text.counters[index]}{format_count(totals[0][index])}{tail}\n")
        elif spec in PER_POSITION_COUNTERS:
            index = PER_POSITION_COUNTERS.index(spec)
            for text, (_l, _a, _d, _e, _c, totals, _p) in series:
                for prefix, value in zip(text.positions[index], totals[1 + index]):
                    out.append(f"{prefix}{format_count(value)}\n")
        elif spec is DRAFTER_INFO:
            for prefix in drafter_prefixes:
                out.append(f"{prefix}1.0\n")
        elif spec is LABEL_VALUES_FOLDED:
            out.append(f"{folded_prefix}{format_count(snapshot.folded)}\n")
        else:  # one of REASON_COUNTERS
            for reason, value in snapshot.reasons[spec].items():
                out.append(f"{reason_prefixes[(spec, reason)]}{format_count(value)}\n")
