"""Fast text exposition of a SpecDecodeCollector, byte-identical to prometheus_client's.

prometheus_client formats every sample from scratch on every scrape: it sorts and escapes
each label set, one character at a time for names in the OpenMetrics writer (0.26). Our
series have a fixed layout (the same families, label sets and bucket bounds for as long as
a method, or a request group, exists), so everything but the numbers is formatted once per
method (and group) here and a scrape only joins cached prefixes with the current values.
Both writers (OpenMetrics 1.0 and the classic text format) are reproduced for the legacy
name charset, which is all the catalog uses; tests compare the output with
prometheus_client's byte for byte.
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
    PLAIN_STEP_DURATION,
    PLAIN_STEP_TOKENS,
    STAGE_DURATION,
    STAGES,
    STEP_DURATION,
    STEPS_WITHOUT_DRAFTS,
    MetricSpec,
)

if TYPE_CHECKING:
    from spec_metrics._prometheus.series import Snapshot

__all__ = ["RowText", "SeriesText", "family_header", "format_count", "label_text",
           "render_snapshot"]


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


class RowText:
    """The acceptance-series prefixes of one method, or of one (method, group)."""

    __slots__ = ("length", "draft_length", "counters", "positions")

    def __init__(self, labels: dict[str, str], length_les: Sequence[str],
                 positions: Sequence[str]) -> None:
        self.length = _HistogramText(ACCEPTED_LENGTH.name, labels, length_les)
        self.draft_length = _HistogramText(DRAFT_LENGTH.name, labels, length_les)
        self.counters = [f"{spec.name}{label_text(labels)} " for spec in COUNTERS_WITH_EXEMPLARS]
        self.positions = [[f"{spec.name}{label_text({**labels, 'position': p})} "
                           for p in positions] for spec in PER_POSITION_COUNTERS]


class SeriesText:
    """Every sample prefix (`name{labels} `) of one method, formatted once; those of a
    group when the group first shows up."""

    def __init__(self, method: str, const: Mapping[str, str], stage_les: Sequence[str],
                 step_les: Sequence[str], length_les: Sequence[str],
                 positions: Sequence[str], group_label: str | None = None) -> None:
        base = {"method": method, **const}
        self.stages = [_HistogramText(STAGE_DURATION.name, {**base, "stage": stage}, stage_les)
                       for stage in STAGES]
        self.step = _HistogramText(STEP_DURATION.name, base, step_les)
        self.plain_steps = f"{STEPS_WITHOUT_DRAFTS.name}{label_text(base)} "
        self.plain_seconds = f"{PLAIN_STEP_DURATION.name}{label_text(base)} "
        self.plain_tokens = f"{PLAIN_STEP_TOKENS.name}{label_text(base)} "
        self._base = base
        self._group_label = group_label
        self._layout = (length_les, positions)
        self._rows: dict[str | None, RowText] = {}

    def row(self, group: str | None) -> RowText:
        """The prefixes of the acceptance series of `group` (None: no group label)."""
        text = self._rows.get(group)
        if text is None:
            labels = (self._base if group is None or self._group_label is None
                      else {**self._base, self._group_label: group})
            text = self._rows[group] = RowText(labels, *self._layout)
        return text


def render_snapshot(snapshot: "Snapshot", texts: Mapping[str, SeriesText],
                    headers: Mapping[MetricSpec, str],
                    reason_prefixes: Mapping[tuple[MetricSpec, str], str],
                    folded_prefixes: Mapping[str, str], openmetrics: bool, out: list[str],
                    drafter_prefixes: Sequence[str] = ()) -> None:
    """Append the collector's families in catalog order (as collect() yields them)."""
    series = [(texts[data.method], data) for data in snapshot.series]
    rows = [(text.row(row.group), row) for text, data in series for row in data.rows]
    keep = openmetrics  # only OpenMetrics carries exemplars
    for spec in METRICS:
        out.append(headers[spec])
        if spec is STAGE_DURATION:
            for text, data in series:
                for stage_text, (counts, total, exemplars) in zip(text.stages,
                                                                   data.latency[:-1]):
                    stage_text.render(out, counts, total, exemplars if keep else None)
        elif spec is STEP_DURATION:
            for text, data in series:
                counts, total, exemplars = data.latency[-1]
                text.step.render(out, counts, total, exemplars if keep else None)
        elif spec is ACCEPTED_LENGTH:
            for row_text, row in rows:
                counts = [*row.accepted_hist.tolist(), 0]
                total = float(sum(i * n for i, n in enumerate(counts)))
                row_text.length.render(out, counts, total,
                                       row.length_exemplars if keep else None)
        elif spec is DRAFT_LENGTH:
            for row_text, row in rows:
                counts = [*row.draft_hist.tolist(), 0]
                total = float(sum(i * n for i, n in enumerate(counts)))
                row_text.draft_length.render(out, counts, total, None)
        elif spec is STEPS_WITHOUT_DRAFTS:
            for text, data in series:
                out.append(f"{text.plain_steps}{format_count(data.plain_steps)}\n")
        elif spec is PLAIN_STEP_DURATION:
            for text, data in series:
                out.append(f"{text.plain_seconds}{floatToGoString(data.plain_seconds)}\n")
        elif spec is PLAIN_STEP_TOKENS:
            for text, data in series:
                out.append(f"{text.plain_tokens}{format_count(data.plain_tokens)}\n")
        elif spec in COUNTERS_WITH_EXEMPLARS:
            index = COUNTERS_WITH_EXEMPLARS.index(spec)
            for row_text, row in rows:
                exemplar = row.counter_exemplars[index] if keep else None
                tail = "" if exemplar is None else _exemplar_text(exemplar)
                out.append(f"{row_text.counters[index]}"
                           f"{format_count(row.totals[0][index])}{tail}\n")
        elif spec in PER_POSITION_COUNTERS:
            index = PER_POSITION_COUNTERS.index(spec)
            for row_text, row in rows:
                for prefix, value in zip(row_text.positions[index], row.totals[1 + index]):
                    out.append(f"{prefix}{format_count(value)}\n")
        elif spec is DRAFTER_INFO:
            for prefix in drafter_prefixes:
                out.append(f"{prefix}1.0\n")
        elif spec is LABEL_VALUES_FOLDED:
            for label, value in snapshot.folded:
                out.append(f"{folded_prefixes[label]}{format_count(value)}\n")
        else:  # one of REASON_COUNTERS
            for reason, value in snapshot.reasons[spec].items():
                out.append(f"{reason_prefixes[(spec, reason)]}{format_count(value)}\n")
