"""The Grafana dashboard, generated from the metric catalog with grafana-foundation-sdk.

Every metric name comes from `spec_metrics.catalog`; every query filters by the `method`
variable (where the metric has that label) and by one variable per constant label. The
committed `dashboards/spec_metrics.json` is `render_dashboard_json()`; a test keeps them equal.

The SDK (`grafana-foundation-sdk==0.0.21`, Python >= 3.11) is imported only to build the
dashboard: `panel_queries` and `substitute_variables` work on the JSON without it.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from spec_metrics import catalog
from spec_metrics.catalog import RESERVED_LABELS, STAGES

__all__ = [
    "DASHBOARD_UID", "DASHBOARD_FILE", "DEFAULT_CONST_LABELS", "build_dashboard",
    "render_dashboard_json", "write_dashboards", "panel_queries", "substitute_variables",
]

DASHBOARD_UID = "spec-metrics-decode"
DASHBOARD_TITLE = "Speculative decoding (spec_metrics)"
DASHBOARD_FILE = "spec_metrics.json"
DEFAULT_CONST_LABELS: tuple[str, ...] = ("model", "engine")
DEFAULT_GROUP_LABEL = "group"
DS_VAR = "datasource"
DS_UID = "${" + DS_VAR + "}"
RATE = "$__rate_interval"
QUANTILES: tuple[float, ...] = (0.5, 0.95, 0.99)

STAGE_HIST = catalog.STAGE_DURATION
STEP_HIST = catalog.STEP_DURATION
ACC_LEN_HIST = catalog.ACCEPTED_LENGTH
DRAFT_LEN_HIST = catalog.DRAFT_LENGTH
PLAIN_STEPS = catalog.STEPS_WITHOUT_DRAFTS
DRAFTER_INFO = catalog.DRAFTER_INFO
DRAFTER_LABELS = "method, target, drafter, num_speculative_tokens"
DRAFTS = catalog.DRAFTS
DRAFT_TOKENS = catalog.DRAFT_TOKENS
ACCEPTED_TOKENS = catalog.ACCEPTED_TOKENS
EMITTED_TOKENS = catalog.EMITTED_TOKENS
DRAFT_POS = catalog.DRAFT_TOKENS_PER_POSITION
ACCEPTED_POS = catalog.ACCEPTED_TOKENS_PER_POSITION
DROPPED = catalog.DROPPED
FOLDED = catalog.LABEL_VALUES_FOLDED
SKIPPED = catalog.TRACED_STEPS_SKIPPED
WITHHELD = catalog.EXEMPLARS_WITHHELD
PLAIN_SECONDS = catalog.PLAIN_STEP_DURATION
PLAIN_TOKENS = catalog.PLAIN_STEP_TOKENS
DRAFTER_STAGES = "|".join(s for s in STAGES if s != "verify")


@functools.cache
def _sdk() -> SimpleNamespace:
    """grafana-foundation-sdk's modules, imported on first use (it needs Python >= 3.11)."""
    with warnings.catch_warnings():  # the SDK warns at import: "prefer dashboardv2"
        warnings.simplefilter("ignore", DeprecationWarning)
        from grafana_foundation_sdk.builders import bargauge, heatmap, prometheus, stat, timeseries
        from grafana_foundation_sdk.builders import common as cb
        from grafana_foundation_sdk.builders import dashboard as db
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models import common as cm
        from grafana_foundation_sdk.models import dashboard as dm
        from grafana_foundation_sdk.models import heatmap as hm
        from grafana_foundation_sdk.models import prometheus as pm
    return SimpleNamespace(
        bargauge=bargauge, heatmap=heatmap, prometheus=prometheus, stat=stat,
        timeseries=timeseries, cb=cb, db=db, JSONEncoder=JSONEncoder, cm=cm, dm=dm, hm=hm, pm=pm,
    )


def _ds() -> Any:
    return _sdk().cm.DataSourceRef(type_val="prometheus", uid=DS_UID)


class _Queries:
    """PromQL builders bound to the dashboard's variables."""

    def __init__(self, const_labels: Sequence[str], group_label: str) -> None:
        self.const_labels = tuple(const_labels)
        self.group_label = group_label

    def sel(self, name: str, suffix: str = "", **fixed: str) -> str:
        """`name+suffix{...}` filtered by every variable that applies to the metric."""
        spec = catalog.by_name(name)
        labels = [lb for lb in ("method",) if lb in spec.labels]
        if spec.grouped:
            labels.append(self.group_label)
        if spec.const_labels:
            labels += list(self.const_labels)
        matchers = [f'{lb}=~"${lb}"' for lb in labels]
        # A value with "|" is a set of alternatives: a regex matcher.
        matchers += [f'{k}=~"{v}"' if "|" in v else f'{k}="{v}"'
                     for k, v in sorted(fixed.items())]
        return f"{name}{suffix}{{{', '.join(matchers)}}}"

    def rate(self, name: str, by: str, suffix: str = "", fn: str = "rate",
             window: str = RATE, **fixed: str) -> str:
        agg = f"sum by ({by})" if by else "sum"
        return f"{agg} ({fn}({self.sel(name, suffix, **fixed)}[{window}]))"

    def ratio(self, num: str, den: str, by: str) -> str:
        """num/den per `by`; windows with no denominator traffic give no point, not NaN."""
        return f"{self.rate(num, by)} / ({self.rate(den, by)} > 0)"

    def quantile(self, q: float, name: str, by: str, **fixed: str) -> str:
        return f"histogram_quantile({q}, {self.rate(name, f'{by}, le', '_bucket', **fixed)})"


def _target(expr: str, ref_id: str, legend: str, *, exemplar: bool = False,
            fmt: str | None = None, instant: bool = False) -> Any:
    g = _sdk()
    t = (g.prometheus.Dataquery().expr(expr).ref_id(ref_id).legend_format(legend)
         .datasource(_ds()))
    t = t.instant() if instant else t.range()
    if exemplar:
        t = t.exemplar(True)
    if fmt is not None:
        t = t.format(g.pm.PromQueryFormat(fmt))
    return t


def _timeseries(title: str, desc: str, unit: str, targets: list[Any], *, w: int = 12,
                stack: bool = False, max_val: float | None = None) -> Any:
    g = _sdk()
    p = (g.timeseries.Panel().title(title).description(desc).unit(unit).span(w).height(8)
         .datasource(_ds())
         .targets(targets).min(0).fill_opacity(10 if not stack else 60)
         .legend(g.cb.VizLegendOptions().display_mode(g.cm.LegendDisplayMode.TABLE)
                 .placement(g.cm.LegendPlacement.BOTTOM).show_legend(True)
                 .calcs(["mean", "max", "lastNotNull"]))
         .tooltip(g.cb.VizTooltipOptions().mode(g.cm.TooltipDisplayMode.MULTI)
                  .sort(g.cm.SortOrder.DESCENDING)))
    if stack:
        p = p.stacking(g.cb.StackingConfig().mode(g.cm.StackingMode.NORMAL))
    if max_val is not None:
        p = p.max(max_val)
    return p


def _heatmap(title: str, desc: str, target: Any) -> Any:
    g = _sdk()
    return (g.heatmap.Panel().title(title).description(desc).span(8).height(8)
            .datasource(_ds())
            .with_target(target).calculate(False)
            .rows_frame(g.heatmap.RowsHeatmapOptions().layout(g.cm.HeatmapCellLayout.LE))
            .y_axis(g.heatmap.YAxisConfig().unit("s"))
            .color(g.heatmap.HeatmapColorOptions().mode(g.hm.HeatmapColorMode.SCHEME)
                   .scheme("Spectral").scale(g.hm.HeatmapColorScale.EXPONENTIAL)
                   .exponent(0.5).fill("dark-orange").reverse(False))
            .cell_values(g.heatmap.CellValues().unit("short"))
            .show_legend().exemplars_color("rgba(255,0,255,0.7)"))


def _stat(title: str, unit: str, target: Any, decimals: int) -> Any:
    g = _sdk()
    return (g.stat.Panel().title(title).unit(unit).decimals(decimals).span(6).height(4)
            .datasource(_ds())
            .with_target(target)
            .reduce_options(g.cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def _variables(const_labels: Sequence[str], group_label: str) -> list[Any]:
    g = _sdk()
    out: list[Any] = [g.db.DatasourceVariable(DS_VAR).label("Data source").type("prometheus")]
    previous: list[str] = []
    for name in (*const_labels, "method", group_label):
        # Request groups live on the acceptance series only.
        source = DRAFTS.name if name == group_label else STEP_HIST.name + "_count"
        filt = ", ".join(f'{p}=~"${p}"' for p in previous)
        query = f"label_values({source}{{{filt}}}, {name})" if filt else \
            f"label_values({source}, {name})"
        out.append(
            g.db.QueryVariable(name).label(name)
            .datasource(_ds())
            .query(query).definition(query)
            .multi(True).include_all(True).all_value(".*")
            .current(g.dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
            .refresh(g.dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(g.dm.VariableSort.ALPHABETICAL_ASC)
        )
        previous.append(name)
    return out


def build_dashboard(const_labels: Sequence[str] = DEFAULT_CONST_LABELS,
                    group_label: str = DEFAULT_GROUP_LABEL) -> dict[str, Any]:
    """The dashboard as Grafana JSON (a dict), for the given constant label names and the
    hooks' request-group label name (`group_label`)."""
    for label in (*const_labels, group_label):
        if not re.fullmatch(r"[a-zA-Z_]\w*", label) or label in RESERVED_LABELS \
                or label == DS_VAR or label.startswith("__"):
            raise ValueError(f"{label!r} cannot be a constant label / dashboard variable")
    if group_label in const_labels:
        raise ValueError(f"group_label {group_label!r} is also a constant label")
    return _build(tuple(const_labels), group_label)


def _build(const_labels: tuple[str, ...], group_label: str) -> dict[str, Any]:
    g = _sdk()
    q = _Queries(const_labels, group_label)
    st, step = STAGE_HIST.name, STEP_HIST.name
    rows: list[tuple[str, list[Any]]] = []

    acc_rate = q.ratio(ACCEPTED_TOKENS.name, DRAFT_TOKENS.name, "method")
    mean_len = "1 + " + q.ratio(ACCEPTED_TOKENS.name, DRAFTS.name, "method")
    emitted = q.rate(EMITTED_TOKENS.name, "method")
    step_p99 = q.quantile(0.99, step, "method")

    def now(expr: str) -> Any:
        return _target(expr, "A", "{{method}}", instant=True)

    rows.append(("Overview", [
        _stat("Current acceptance rate", "percentunit", now(acc_rate), 3),
        _stat("Current mean accepted length", "short", now(mean_len), 2),
        _stat("Current emitted tokens/s", "tokens/s", now(emitted), 0),
        _stat("Current step p99", "s", now(step_p99), 4),
    ]))
    rows.append(("Is speculation paying off?", _payoff_panels(q)))
    rows.append(("Acceptance by request group", _group_panels(q)))

    def quantiles(name: str, **fixed: str) -> list[Any]:
        return [_target(q.quantile(x, name, "method", **fixed), chr(ord("A") + i),
                        f"{{{{method}}}} p{round(x * 100)}", exemplar=True)
                for i, x in enumerate(QUANTILES)]

    latency = [
        _timeseries(f"{stage} latency p50/p95/p99",
                    f"Quantiles of `{st}` for stage `{stage}` (whole batch, per decode step). "
                    "Exemplar points link to the step's trace.", "s",
                    quantiles(st, stage=stage), w=8)
        for stage in STAGES
    ]
    heat = [
        _heatmap(f"{stage} latency heatmap",
                 f"Per-bucket count of `{st}` for stage `{stage}` (classic histogram buckets).",
                 _target(q.rate(st, "le", "_bucket", fn="increase", stage=stage), "A", "{{le}}",
                         exemplar=True, fmt="heatmap"))
        for stage in STAGES
    ]
    rows.append(("Latency", [*latency, *heat]))

    share = (f"{q.rate(st, 'stage', '_sum')} / on() group_left() "
             f"({q.rate(step, '', '_sum')} > 0)")
    rows.append(("Step", [
        _timeseries("Step duration p50/p95/p99",
                    f"Quantiles of `{step}`: first stage start to last stage end.", "s",
                    quantiles(step)),
        _timeseries("Stage share of step time (draft overhead)",
                    "Time spent in each stage as a fraction of step time; draft + draft_extend "
                    "is the drafting overhead, the rest of the step outside stages is not shown.",
                    "percentunit", [_target(share, "A", "{{stage}}")], stack=True),
    ]))

    k_per_draft = q.ratio(DRAFT_TOKENS.name, DRAFTS.name, "method")
    per_pos = q.ratio(ACCEPTED_POS.name, DRAFT_POS.name, "method, position")
    dist = q.rate(ACC_LEN_HIST.name, "le", "_bucket", fn="increase", window="$__range")
    rows.append(("Acceptance", [
        _timeseries("Acceptance rate", "Accepted draft tokens / proposed draft tokens.",
                    "percentunit", [_target(acc_rate, "A", "{{method}}")], w=8, max_val=1),
        _timeseries("Mean accepted length",
                    "1 + accepted draft tokens per draft (the bonus token included), and the "
                    "mean number of draft tokens per draft (K).", "short",
                    [_target(mean_len, "A", "{{method}} accepted length"),
                     _target(k_per_draft, "B", "{{method}} draft tokens per draft")], w=8),
        _distribution_panel(
            "Accepted-length distribution",
            f"`{ACC_LEN_HIST.name}` over the dashboard range: how many draft tokens each "
            "request accepted per verify pass (le = at most).",
            _target(dist, "A", "{{le}}", fmt="heatmap", instant=True)),
        _timeseries("Acceptance by draft position",
                    "Accepted / proposed draft tokens at each draft position (0 = first). Late "
                    "positions decay first.", "percentunit",
                    [_target(per_pos, "A", "{{method}} position {{position}}")], w=24,
                    max_val=1),
    ]))

    draft_dist = q.rate(DRAFT_LEN_HIST.name, "le", "_bucket", fn="increase", window="$__range")
    mean_k = (f"{q.rate(DRAFT_LEN_HIST.name, 'method', '_sum')} / "
              f"({q.rate(DRAFT_LEN_HIST.name, 'method', '_count')} > 0)")
    no_draft_requests = q.rate(DRAFT_LEN_HIST.name, "method", "_bucket", le="0.0")
    drafter = f"max by ({DRAFTER_LABELS}) ({q.sel(DRAFTER_INFO.name)})"
    rows.append(("Draft length (K)", [
        _timeseries("Drafter and K",
                    f"`{DRAFTER_INFO.name}`: the target, drafter and K each method declared "
                    "(one line per declaration; a change starts a new line and an annotation "
                    "on every panel).", "short",
                    [_target(drafter, "A", "{{method}}: {{drafter}} for {{target}}, "
                             "K={{num_speculative_tokens}}")], w=24),
        _distribution_panel(
            "Draft-length distribution",
            f"`{DRAFT_LEN_HIST.name}` over the dashboard range: draft tokens proposed per "
            "request per verify pass, 0 included (le = at most). With dynamic speculation K "
            "moves with load; compare acceptance only between equal K.",
            _target(draft_dist, "A", "{{le}}", fmt="heatmap", instant=True)),
        _timeseries("Mean draft length", "Draft tokens proposed per request verified, "
                    "requests without drafts included.", "short",
                    [_target(mean_k, "A", "{{method}}")], w=8),
        _timeseries("Verified without drafts",
                    "Requests verified with no draft token (draft length 0), and "
                    f"`{PLAIN_STEPS.name}`: verify passes in which no request had a draft "
                    "(plain decode steps), per second.", "short",
                    [_target(no_draft_requests, "A", "{{method}} requests/s"),
                     _target(q.rate(PLAIN_STEPS.name, "method"), "B",
                             "{{method}} steps/s")], w=8),
    ]))

    steps = q.rate(STEP_HIST.name, "method", "_count")
    rows.append(("Throughput and input", [
        _timeseries("Emitted tokens/s", "Tokens emitted by verify passes, and accepted draft "
                    "tokens.", "tokens/s",
                    [_target(emitted, "A", "{{method}} emitted"),
                     _target(q.rate(ACCEPTED_TOKENS.name, "method"), "B",
                             "{{method}} accepted draft")], w=6),
        _timeseries("Drafts/s", "Draft sequences verified per second, and decode steps per "
                    "second.", "short",
                    [_target(q.rate(DRAFTS.name, "method"), "A", "{{method}} drafts/s"),
                     _target(steps, "B", "{{method}} steps/s")], w=6),
        _timeseries("Dropped observations by reason",
                    f"`{DROPPED.name}`: hook inputs rejected instead of recorded; "
                    f"`{FOLDED.name}`: steps recorded under method=\"other\" because "
                    "max_methods was reached.", "short",
                    [_target(q.rate(DROPPED.name, "reason"), "A", "{{reason}}"),
                     _target(q.rate(FOLDED.name, "label"), "B", "folded {{label}}")], w=6),
        _timeseries("Tracing: skipped steps, withheld exemplars",
                    f"`{SKIPPED.name}`: steps selected for tracing (slow, outlier, sampled "
                    "request, ratio) whose spans were not made, e.g. rate_limited over "
                    f"max_traced_steps_per_second; `{WITHHELD.name}`: traced steps whose "
                    "exemplars were withheld because their spans were lost before export. "
                    "Either above zero means some spikes have no trace to click through to.",
                    "short",
                    [_target(q.rate(SKIPPED.name, "reason"), "A", "skipped {{reason}}"),
                     _target(q.rate(WITHHELD.name, "reason"), "B", "withheld {{reason}}")],
                    w=6),
    ]))

    dash = (g.db.Dashboard(DASHBOARD_TITLE).uid(DASHBOARD_UID)
            .description("Speculative decoding: stage latency with exemplars, acceptance, "
                         "throughput. Generated by spec_metrics.ops.dashboards; do not edit.")
            .tags(["spec_metrics", "speculative-decoding", "llm-inference"])
            .refresh("30s").time("now-30m", "now").timezone("browser")
            .tooltip(g.dm.DashboardCursorSync.CROSSHAIR).editable()
            .variables(_variables(const_labels, group_label))
            .annotation(_drafter_change_annotation(q)))
    panel_id = 0
    for title, panels in rows:
        panel_id += 1
        dash = dash.with_row(g.db.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            dash = dash.with_panel(panel.id(panel_id))
    return json.loads(json.dumps(dash.build(), cls=g.JSONEncoder))


def _payoff_panels(q: _Queries) -> list[Any]:
    """The speedup over plain decoding, as spec_metrics.payoff and the recording rules
    compute it: measured against plain steps where the engine ran some, else the upper
    bound from the step's draft share."""
    step_s = q.rate(STEP_HIST.name, "method", "_sum")
    drafter_s = q.rate(STAGE_HIST.name, "method", "_sum", stage=DRAFTER_STAGES)
    emitted = q.rate(EMITTED_TOKENS.name, "method")
    accepted = q.rate(ACCEPTED_TOKENS.name, "method")
    spec_cost = f"({step_s} / ({emitted} > 0))"
    plain_cost = (f"({q.rate(PLAIN_SECONDS.name, 'method')} / "
                  f"({q.rate(PLAIN_TOKENS.name, 'method')} > 0))")
    measured = f"{plain_cost} / ({spec_cost} > 0)"
    bound = f"{emitted} / ({emitted} - {accepted} > 0) * ({step_s} - {drafter_s}) / ({step_s} > 0)"
    speedup = f"({measured}) or ({bound})"
    stat = _stat("Current speedup over plain decoding", "x", _target(speedup, "A", "{{method}}",
                                                            instant=True), 2)
    return [
        stat.span(6).thresholds(_one_threshold()),
        _timeseries("Speedup over plain decoding",
                    "Tokens per second with speculation over tokens per second plain decoding "
                    "would give, per method (below 1: speculation costs more than it saves). "
                    "measured: against the engine's own plain decode steps (K = 0, e.g. "
                    f"dynamic speculation), `{PLAIN_SECONDS.name}` per "
                    f"`{PLAIN_TOKENS.name}` over step time per emitted token. upper bound: no "
                    "plain steps; emitted tokens per request-step x (step - draft - "
                    "draft_extend) / step, which never shows a loss where speculation wins. "
                    "See docs/runbook.md#specdecodenotpayingoff.", "x",
                    [_target(measured, "A", "{{method}} measured"),
                     _target(bound, "B", "{{method}} upper bound")], w=10),
        _timeseries("Cost per token: speculative vs plain",
                    "Step time per emitted token, and plain steps' time (draft stages excluded) "
                    "per token they emitted.", "s",
                    [_target(spec_cost, "A", "{{method}} speculative"),
                     _target(plain_cost, "B", "{{method}} plain")], w=8),
    ]


def _group_panels(q: _Queries) -> list[Any]:
    """Acceptance per request group (the hooks' group_label), and against its own baseline:
    the signal SpecDecodeAcceptanceDropped alerts on. A shift in workload mix moves the
    server-wide rate; it leaves each group's own rate alone."""
    by = f"method, {q.group_label}"
    acc = q.ratio(ACCEPTED_TOKENS.name, DRAFT_TOKENS.name, by)
    before = (f"sum by ({by}) (rate({q.sel(ACCEPTED_TOKENS.name)}[1h] offset {RATE})) / "
              f"(sum by ({by}) (rate({q.sel(DRAFT_TOKENS.name)}[1h] offset {RATE})) > 0)")
    legend = f"{{{{method}}}} {{{{{q.group_label}}}}}"
    return [
        _timeseries("Acceptance rate by group",
                    f"Accepted / proposed draft tokens per `{q.group_label}` (adapter, tenant, "
                    "workload class: whatever the engine passes to verify_end(groups=...); "
                    "values beyond max_groups are folded into \"other\").", "percentunit",
                    [_target(acc, "A", legend)], w=8, max_val=1),
        _timeseries("Acceptance vs the group's own last hour",
                    "Acceptance now over the same group's acceptance in the hour before. "
                    "SpecDecodeAcceptanceDropped fires below its ratio (0.7 by default): a "
                    "drafter or target change, not a workload shift.", "percentunit",
                    [_target(f"({acc}) / (({before}) > 0)", "A", legend)], w=8),
        _timeseries("Draft traffic by group", "Drafts verified per second, per group.",
                    "short", [_target(q.rate(DRAFTS.name, by), "A", legend)], w=8,
                    stack=True),
    ]


def _one_threshold() -> Any:
    """Red below 1 (speculation loses), green from 1."""
    g = _sdk()
    return (g.db.ThresholdsConfig().mode(g.dm.ThresholdsMode.ABSOLUTE)
            .steps([g.dm.Threshold(value=None, color="red"),
                    g.dm.Threshold(value=1.0, color="green")]))


def _drafter_change_annotation(q: _Queries) -> Any:
    """A mark where a method's declared drafter, target or K appears that was not there a
    minute before."""
    g = _sdk()
    sel = q.sel(DRAFTER_INFO.name)
    expr = (f"count by ({DRAFTER_LABELS}) ({sel}) unless "
            f"count by ({DRAFTER_LABELS}) ({sel} offset 1m)")
    return (g.db.AnnotationQuery().name("Drafter changes").datasource(_ds()).enable(True)
            .icon_color("orange").expr(expr).step("30s")
            .title_format("{{method}}: {{drafter}}, K={{num_speculative_tokens}}")
            .text_format("target {{target}}"))


def _distribution_panel(title: str, description: str, target: Any) -> Any:
    g = _sdk()
    return (g.bargauge.Panel().title(title)
            .description(description)
            .unit("short").span(8).height(8)
            .datasource(_ds())
            .with_target(target).orientation(g.cm.VizOrientation.VERTICAL)
            .display_mode(g.cm.BarGaugeDisplayMode.GRADIENT)
            .reduce_options(g.cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def render_dashboard_json(const_labels: Sequence[str] = DEFAULT_CONST_LABELS,
                          group_label: str = DEFAULT_GROUP_LABEL) -> str:
    """Deterministic JSON text of the dashboard (sorted keys, trailing newline)."""
    return json.dumps(build_dashboard(const_labels, group_label), indent=2,
                      sort_keys=True) + "\n"


def write_dashboards(out_dir: str | Path,
                     const_labels: Sequence[str] = DEFAULT_CONST_LABELS,
                     group_label: str = DEFAULT_GROUP_LABEL) -> list[Path]:
    """Write the dashboard JSON into out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DASHBOARD_FILE
    path.write_text(render_dashboard_json(const_labels, group_label), encoding="utf-8")
    return [path]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # collapsed rows nest their panels


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every Prometheus query in the dashboard, in order."""
    return [
        (panel.get("title", ""), target.get("refId", ""), target["expr"])
        for panel in _panels(list(dashboard.get("panels") or []))
        for target in panel.get("targets") or []
        if "expr" in target
    ]


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute_variables(expr: str, values: Mapping[str, str] | None = None,
                         rate_interval: str = "1m", range_window: str = "5m") -> str:
    """Replace Grafana variables so that Prometheus can run `expr` directly.

    `$__rate_interval` and `$__interval` become `rate_interval`, `$__range` `range_window`;
    any other `$name` / `${name}` becomes `values[name]`, or `.*` (every value) when absent.
    """
    values = dict(values or {})
    builtins = {"__rate_interval": rate_interval, "__interval": rate_interval,
                "__range": range_window}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return builtins.get(name, values.get(name, ".*"))

    return _VAR.sub(repl, expr)
