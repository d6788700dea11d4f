"""`spec-metrics snapshot`: every dashboard panel, rendered to PNG from a Prometheus.

For bug reports, CI artifacts and anyone without a Grafana at hand: each panel's queries
run over the time range against the Prometheus HTTP API, matplotlib draws them the way the
panel would (time series, heatmap, bar chart, stat), latency panels get their exemplars as
points labelled by trace id, and one `index.html` shows them all.
"""

from __future__ import annotations

import html
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from spec_metrics.ops.dashboards import substitute_variables

__all__ = ["take_snapshot", "SnapshotError", "parse_duration", "panel_image_name", "panels_of"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_MAX_EXEMPLAR_LABELS = 6


class SnapshotError(RuntimeError):
    pass


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus-style duration: "90s", "15m", "1h"."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text.strip())
    if not match:
        raise SnapshotError(f"{text!r} is not a duration like 90s, 15m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


class _Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        except OSError as error:
            raise SnapshotError(f"cannot reach Prometheus at {self.url}: {error}") from error
        if body.get("status") != "success":
            raise SnapshotError(f"{path} {params.get('query', '')!r}: {body.get('error')}")
        return body["data"]


def take_snapshot(prometheus: str, range_seconds: float, out_dir: str | Path,
                  dashboard: Mapping[str, Any] | None = None, end: float | None = None,
                  rate_interval: str = "1m", values: Mapping[str, str] | None = None) -> Path:
    """Render every panel over [end - range, end] into out_dir; returns index.html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if dashboard is None:
        from spec_metrics.ops.dashboards import build_dashboard

        dashboard = build_dashboard()
    api = _Prometheus(prometheus)
    end = time.time() if end is None else end
    start = end - range_seconds
    step = max(1.0, range_seconds / 240)
    window = f"{int(range_seconds)}s"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, panel in enumerate(_panels(dashboard["panels"])):
        figure, axes = plt.subplots(figsize=(9, 3.4))
        notes: list[str] = []
        points: set[tuple[float, float, str]] = set()  # targets often share a selector
        for target in panel.get("targets", []):
            expr = substitute_variables(target["expr"], values or {}, rate_interval=rate_interval,
                                        range_window=window)
            try:
                _draw(axes, panel, target, expr, api, start, end, step, notes)
                if target.get("exemplar"):
                    points |= _exemplars(api, expr, start, end)
            except SnapshotError as error:
                notes.append(f"{target.get('refId')}: {error}")
        exemplar_ids = _draw_exemplars(axes, points, end)
        axes.set_title(panel.get("title", ""), fontsize=10)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if unit and panel["type"] != "stat":
            axes.set_ylabel(unit)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7, loc="upper left")
        figure.tight_layout()
        name = panel_image_name(number, panel["title"])
        figure.savefig(out / name, dpi=90)
        plt.close(figure)
        entries.append((panel["title"], name, notes, exemplar_ids))
    index = out / "index.html"
    index.write_text(_html(dashboard.get("title", "spec_metrics"), prometheus, start, end,
                           entries), encoding="utf-8")
    return index


def panel_image_name(number: int, title: str) -> str:
    """The PNG file name of the number-th panel (rows skipped)."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f"panel-{number:02d}-{slug}.png"


def panels_of(dashboard: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The dashboard's panels in order, rows flattened away."""
    return list(_panels(dashboard["panels"]))


def _panels(panels: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        if panel.get("type") == "row":
            yield from _panels(panel.get("panels", []))
        else:
            yield panel


def _legend(target: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    fmt = target.get("legendFormat") or ""
    text = _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()
    return text or ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or target["refId"]


def _draw(axes: Any, panel: Mapping[str, Any], target: Mapping[str, Any], expr: str,
          api: _Prometheus, start: float, end: float, step: float, notes: list[str]) -> None:
    kind = panel["type"]
    if kind == "stat" or target.get("instant"):
        result = api.get("/api/v1/query", query=expr, time=end)["result"]
        if not result:
            notes.append(f"{target['refId']}: no data")
            return
        if target.get("format") == "heatmap":  # bucket distribution as bars
            les, counts = _per_bucket([(r["metric"].get("le", "+Inf"), float(r["value"][1]))
                                       for r in result])
            axes.bar(range(len(les)), counts, tick_label=les)
            return
        axes.axis("off")
        text = "\n".join(f"{_legend(target, r['metric'])}: {float(r['value'][1]):.4g}"
                         for r in result)
        axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=14)
        return
    result = api.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]
    if not result:
        notes.append(f"{target['refId']}: no data")
        return
    if target.get("format") == "heatmap":
        _heatmap(axes, result)
        return
    for series in result:
        times = [float(t) - end for t, _ in series["values"]]
        axes.plot(times, [float(v) for _, v in series["values"]],
                  label=_legend(target, series["metric"]), linewidth=1.2)
    axes.set_xlabel("seconds before the end of the range")


def _per_bucket(cumulative: list[tuple[str, float]]) -> tuple[list[str], list[float]]:
    """Cumulative `le` buckets to counts per bucket, ordered by bound."""
    ordered = sorted(cumulative, key=lambda item: float(item[0]))
    counts, previous = [], 0.0
    for _, value in ordered:
        counts.append(max(value - previous, 0.0))
        previous = value
    return [le for le, _ in ordered], counts


def _heatmap(axes: Any, result: list[Mapping[str, Any]]) -> None:
    import numpy as np

    by_le = sorted(result, key=lambda r: float(r["metric"].get("le", "inf")))
    times = sorted({float(t) for r in by_le for t, _ in r["values"]})
    column = {t: i for i, t in enumerate(times)}
    cumulative = np.zeros((len(by_le), len(times)))
    for row, series in enumerate(by_le):
        for t, v in series["values"]:
            cumulative[row, column[float(t)]] = float(v)
    counts = np.diff(np.vstack([np.zeros(len(times)), cumulative]), axis=0).clip(min=0)
    bounds = [float(r["metric"].get("le", "inf")) for r in by_le]
    finite = [b for b in bounds if np.isfinite(b)] or [1.0]
    edges = [finite[0] / 2] + [b if np.isfinite(b) else finite[-1] * 2 for b in bounds]
    x = [t - times[-1] for t in times] + [0.0 + (times[-1] - times[-2] if len(times) > 1 else 1)]
    mesh = axes.pcolormesh(x, edges, counts, shading="flat", cmap="viridis")
    axes.set_yscale("log")
    axes.figure.colorbar(mesh, ax=axes, label="observations")
    axes.set_xlabel("seconds before the end of the range")


def _exemplars(api: _Prometheus, expr: str, start: float,
               end: float) -> set[tuple[float, float, str]]:
    data = api.get("/api/v1/query_exemplars", query=expr, start=start, end=end)
    return {(float(e["timestamp"]), float(e["value"]), e["labels"].get("trace_id", ""))
            for series in data for e in series.get("exemplars", [])}


def _draw_exemplars(axes: Any, points: set[tuple[float, float, str]], end: float) -> list[str]:
    if not points:
        return []
    axes.scatter([t - end for t, _, _ in points], [v for _, v, _ in points], marker="D",
                 s=22, color="crimson", zorder=5, label="exemplars")
    for t, v, trace_id in sorted(points, key=lambda p: -p[1])[:_MAX_EXEMPLAR_LABELS]:
        axes.annotate(trace_id[:8], (t - end, v), fontsize=6, xytext=(3, 3),
                      textcoords="offset points")
    return sorted({trace_id for _, _, trace_id in points if trace_id})


def _html(title: str, prometheus: str, start: float, end: float,
          entries: list[tuple[str, str, list[str], list[str]]]) -> str:
    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))

    cards = []
    for panel_title, image, notes, exemplar_ids in entries:
        extra = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
        if exemplar_ids:
            ids = ", ".join(f"<code>{html.escape(t)}</code>" for t in exemplar_ids)
            extra += f"<p class=ex>exemplar trace ids: {ids}</p>"
        cards.append(f"<figure><figcaption>{html.escape(panel_title)}</figcaption>"
                     f"<img src='{html.escape(image)}' alt='{html.escape(panel_title)}'>"
                     f"{extra}</figure>")
    return ("<!doctype html><html><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif}}"
            "figure{display:inline-block;margin:8px;vertical-align:top;max-width:820px}"
            "img{max-width:100%}.note{color:#a00}.ex{font-size:11px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(prometheus)}, "
            f"{when(start)} to {when(end)}</p>" + "".join(cards) + "</body></html>\n")
