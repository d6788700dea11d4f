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

from .catalog import STAGES

if TYPE_CHECKING:
    from .series import Snapshot

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
    if family.type == "counter":
        name += "_total"
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n"


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

    def __init__(self, names: Mapping[str, str], method: str, const: Mapping[str, str],
                 stage_les: Sequence[str], step_les: Sequence[str],
                 length_les: Sequence[str], positions: Sequence[str],
                 counter_names: Sequence[str], position_names: Sequence[str]) -> None:
        base = {"method": method, **const}
        self.stages = [_HistogramText(names["stage"], {**base, "stage": stage}, stage_les)
                       for stage in STAGES]
        self.step = _HistogramText(names["step"], base, step_les)
        self.length = _HistogramText(names["length"], base, length_les)
        self.counters = [f"{name}{label_text(base)} " for name in counter_names]
        self.positions = [[f"{name}{label_text({**base, 'position': p})} " for p in positions]
                          for name in position_names]


def render_snapshot(snapshot: "Snapshot", texts: Mapping[str, SeriesText],
                    headers: Sequence[str], drop_prefixes: Mapping[tuple[str, str], str],
                    folded_prefix: str, openmetrics: bool, out: list[str]) -> None:
    """Append the collector's families, in the order collect() yields them: stage, step,
    accepted length, the 4 counters, the 2 per-position counters, dropped input, folded
    label values, skipped traced steps, withheld exemplars."""
    series = [(texts[method], data) for method, *data in snapshot.series]
    keep = openmetrics  # only OpenMetrics carries exemplars
    out.append(headers[0])
    for text, (latency, *_rest) in series:
        for stage_text, (counts, total, exemplars) in zip(text.stages, latency[:-1]):
            stage_text.render(out, counts, total, exemplars if keep else None)
    out.append(headers[1])
    for text, (latency, *_rest) in series:
        counts, total, exemplars = latency[-1]
        text.step.render(out, counts, total, exemplars if keep else None)
    out.append(headers[2])
    for text, (_l, accepted_hist, _d, length_ex, _c, _s) in series:
        counts = [*accepted_hist.tolist(), 0]
        total = float(sum(i * n for i, n in enumerate(counts)))
        text.length.render(out, counts, total, length_ex if keep else None)
    for index in range(4):
        out.append(headers[3 + index])
        for text, (_l, _a, _d, _e, counter_ex, totals) in series:
            exemplar = counter_ex[index] if keep else None
            tail = "" if exemplar is None else _exemplar_text(exemplar)
            out.append(f"{text.counters[index]}{format_count(totals[0][index])}{tail}\n")
    for index in range(2):
        out.append(headers[7 + index])
        for text, (_l, _a, _d, _e, _c, totals) in series:
            for prefix, value in zip(text.positions[index], totals[1 + index]):
                out.append(f"{prefix}{format_count(value)}\n")
    out.append(headers[9])
    for reason, value in snapshot.drops.items():
        prefix = drop_prefixes[("spec_metrics_dropped_total", reason)]
        out.append(f"{prefix}{format_count(value)}\n")
    out.append(headers[10])
    out.append(f"{folded_prefix}{format_count(snapshot.folded)}\n")
    for header, name, counts in (
            (headers[11], "spec_metrics_traced_steps_skipped_total", snapshot.skipped),
            (headers[12], "spec_metrics_exemplars_withheld_total", snapshot.withheld)):
        out.append(header)
        for reason, value in counts.items():
            out.append(f"{drop_prefixes[(name, reason)]}{format_count(value)}\n")
