"""Prometheus recording and alerting rules, generated from the metric catalog.

`render_rules(RuleParams())` is the text of `alerts/spec_metrics.rules.yml`; a test keeps the
committed file equal to it. Metric names come from `spec_metrics.catalog`; thresholds, windows
and label sets are fields of `RuleParams`. Every ratio is recorded only where its denominator
is positive (no NaN series), and every alert carries an explicit traffic guard, so an idle
server never fires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spec_metrics import catalog
from spec_metrics.catalog import DEFAULT_MAX_DRAFT_TOKENS, STAGES
from spec_metrics.ops.dashboards import DASHBOARD_UID

try:
    import yaml
except ImportError as exc:  # an ops tool: pyyaml comes with the extra
    raise ImportError("spec_metrics.ops.rules writes YAML: pip install 'spec_metrics[ops]' "
                      "(pyyaml)") from exc

__all__ = ["RuleParams", "ALERTS", "build_rules", "render_rules", "write_rules", "RULES_FILE",
           "DOCS_BASE_URL", "RUNBOOK_URL", "GRAFANA_URL"]

RULES_FILE = "spec_metrics.rules.yml"
# Where the project's docs are published (the repository's docs/ folder on GitHub, the same
# repository as pyproject's [project.urls]); every alert's runbook_url defaults to a section
# of RUNBOOK_URL. Alertmanager, Slack and PagerDuty open only absolute URLs.
DOCS_BASE_URL = "https://github.com/spec-metrics/spec_metrics/blob/main/docs"
RUNBOOK_URL = f"{DOCS_BASE_URL}/runbook.md"
# Grafana's own default address; set `grafana_url` to yours (the dashboard_url annotation).
GRAFANA_URL = "http://localhost:3000"
ALERTS = (
    "SpecDecodeAcceptanceRateLow",
    "SpecDecodeMeanAcceptedLengthLow",
    "SpecDecodeLatePositionAcceptanceDecay",
    "SpecDecodeVerifyLatencyHigh",
    "SpecDecodeDraftOverheadHigh",
    "SpecDecodeMetricsAbsent",
    "SpecDecodeAcceptanceDropped",
    "SpecDecodeNotPayingOff",
)

_DRAFTS = catalog.DRAFTS.name
_DRAFT_TOKENS = catalog.DRAFT_TOKENS.name
_ACCEPTED = catalog.ACCEPTED_TOKENS.name
_POS_DRAFT = catalog.DRAFT_TOKENS_PER_POSITION.name
_POS_ACCEPTED = catalog.ACCEPTED_TOKENS_PER_POSITION.name
_STAGE = catalog.STAGE_DURATION.name
_STEP = catalog.STEP_DURATION.name
_EMITTED = catalog.EMITTED_TOKENS.name
_PLAIN_SECONDS = catalog.PLAIN_STEP_DURATION.name
_PLAIN_TOKENS = catalog.PLAIN_STEP_TOKENS.name
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(duration: str) -> float:
    match = _DURATION.match(duration)
    if match is None:
        raise ValueError(f"{duration!r} is not a Prometheus duration such as 30s, 5m or 1h")
    return int(match.group(1)) * _SECONDS[match.group(2)]


@dataclass(frozen=True)
class RuleParams:
    """Thresholds, windows and labels of the generated rules (defaults in docs/runbook.md)."""

    rate_window: str = "5m"  # range of every rate(); at least 4x scrape_interval
    scrape_interval: str = "15s"  # only checked against rate_window
    evaluation_interval: str | None = None  # group interval; None inherits the global one
    const_labels: tuple[str, ...] = ("model", "engine")  # the hooks' constant labels
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS  # positions 0..K-1 the decay rule covers
    quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)  # recorded stage latency quantiles
    min_drafts_per_second: float = 1.0  # traffic guard of every alert (drafts verified / s)
    min_position_trials_per_second: float = 0.5  # decay guard: tokens accepted at p-1 / s
    acceptance_rate_min: float = 0.25  # accepted / drafted draft tokens
    mean_accepted_length_min: float = 1.5  # tokens per verify pass, bonus token included
    decay_ratio_min: float = 0.5  # conditional acceptance at p / acceptance at position 0
    verify_p99_max_seconds: float = 0.5
    draft_overhead_max: float = 0.5  # (draft + draft_extend time) / step time
    absent_lookback: str = "6h"  # series seen this recently must still be exported
    acceptance_for: str = "10m"
    mean_length_for: str = "10m"
    decay_for: str = "15m"
    verify_for: str = "10m"
    overhead_for: str = "15m"
    absent_for: str = "10m"
    # SpecDecodeAcceptanceDropped: acceptance of a request group over rate_window below
    # drop_ratio_max x its own acceptance over drop_baseline_window just before (guards: the
    # traffic guard on both windows, per group).
    group_label: str = "group"  # the hooks' group_label; series without it form one group
    drop_ratio_max: float = 0.7
    drop_baseline_window: str = "1h"
    drop_for: str = "10m"
    # SpecDecodeNotPayingOff: the speedup estimate over plain decoding below this.
    speedup_min: float = 1.0
    payoff_for: str = "15m"
    severity: str = "warning"
    runbook_url: str = RUNBOOK_URL  # absolute; the alert name, lowercased, is the anchor
    extra_labels: dict[str, str] = field(default_factory=dict)  # added to every alert
    # Grafana's base URL: the dashboard_url annotation opens the generated dashboard there,
    # its variables set from the alert's labels; "" leaves the annotation out.
    grafana_url: str = GRAFANA_URL
    severities: dict[str, str] = field(default_factory=dict)  # alert name -> its severity

    def __post_init__(self) -> None:
        if _seconds(self.rate_window) < 4 * _seconds(self.scrape_interval):
            raise ValueError(
                f"rate_window {self.rate_window} is shorter than 4 x scrape_interval "
                f"{self.scrape_interval}: rate() would often see fewer than two samples")
        for name in ("acceptance_for", "mean_length_for", "decay_for", "verify_for",
                     "overhead_for", "absent_for", "absent_lookback", "drop_baseline_window",
                     "drop_for", "payoff_for"):
            _seconds(getattr(self, name))
        if self.evaluation_interval is not None:
            _seconds(self.evaluation_interval)
        if "method" in self.const_labels or len(set(self.const_labels)) != len(self.const_labels):
            raise ValueError("const_labels must be distinct and must not include 'method'")
        if self.max_draft_tokens < 2:
            raise ValueError("max_draft_tokens must be at least 2 for the decay rule")
        if _seconds(self.drop_baseline_window) < _seconds(self.rate_window):
            raise ValueError(f"drop_baseline_window {self.drop_baseline_window} must be at "
                             f"least rate_window {self.rate_window}")
        if self.group_label in ("method", *self.const_labels):
            raise ValueError(f"group_label {self.group_label!r} must differ from 'method' "
                             "and the const_labels")
        if self.speedup_min <= 0:
            raise ValueError("speedup_min must be > 0")
        for name in ("acceptance_rate_min", "decay_ratio_min", "draft_overhead_max",
                     "drop_ratio_max"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if not all(0 < q < 1 for q in self.quantiles) or 0.99 not in self.quantiles:
            raise ValueError("quantiles must lie in (0, 1) and include 0.99 (verify alert)")
        if not _is_absolute(self.runbook_url):
            raise ValueError(f"runbook_url {self.runbook_url!r} must be an absolute http(s) URL: "
                             "Alertmanager, chat and pager links cannot open a relative path")
        if self.grafana_url and not _is_absolute(self.grafana_url):
            raise ValueError(f"grafana_url {self.grafana_url!r} must be an absolute http(s) URL "
                             "(or empty: no dashboard_url annotation)")
        unknown = set(self.severities) - set(ALERTS)
        if unknown:
            raise ValueError(f"severities names unknown alerts {sorted(unknown)}; "
                             f"alerts: {', '.join(ALERTS)}")


def _is_absolute(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _num(value: float) -> str:
    return format(value, "g")


class _Names:
    """Label lists and recording rule names (level:metric:operations) for one RuleParams."""

    def __init__(self, p: RuleParams) -> None:
        self.labels = ("method", *p.const_labels)
        self.by = ", ".join(self.labels)
        level = "_".join(self.labels)
        w = p.rate_window
        self.drafts = f"{level}:spec_decode_drafts:rate{w}"
        self.acceptance = f"{level}:spec_decode_acceptance:ratio_rate{w}"
        self.mean_length = f"{level}:spec_decode_mean_accepted_length:ratio_rate{w}"
        self.pos_accepted = f"{level}_position:spec_decode_accepted_tokens_per_position:rate{w}"
        self.pos_acceptance = f"{level}_position:spec_decode_position_acceptance:ratio_rate{w}"
        self.pos_trials = f"{level}_position:spec_decode_position_trials:rate{w}"
        self.pos_conditional = (
            f"{level}_position:spec_decode_position_conditional_acceptance:ratio_rate{w}")
        self.quantile = f"{level}_stage:{_STAGE}:histogram_quantile_rate{w}"
        self.overhead = f"{level}:spec_decode_draft_overhead:ratio_rate{w}"
        self.speedup_measured = f"{level}:spec_decode_speedup_measured:ratio_rate{w}"
        self.speedup_bound = f"{level}:spec_decode_speedup_upper_bound:ratio_rate{w}"
        self.speedup = f"{level}:spec_decode_speedup:ratio_rate{w}"
        self.group_labels = ("method", p.group_label, *p.const_labels)
        self.by_group = ", ".join(self.group_labels)
        group_level = "_".join(self.group_labels)
        b = p.drop_baseline_window
        self.group_drafts = f"{group_level}:spec_decode_drafts:rate{w}"
        self.group_acceptance = f"{group_level}:spec_decode_acceptance:ratio_rate{w}"
        self.baseline_drafts = f"{group_level}:spec_decode_drafts:rate{b}_offset{w}"
        self.baseline_acceptance = f"{group_level}:spec_decode_acceptance:ratio_rate{b}_offset{w}"


def _shift(series: str, positions: int) -> str:
    """`series` at position p-1 relabelled as position p, for p = 1..positions-1."""
    return "\nor\n".join(
        f'label_replace({series}{{position="{p - 1}"}}, "position", "{p}", "position", ".*")'
        for p in range(1, positions))


def _recording_rules(p: RuleParams, n: _Names) -> list[dict[str, Any]]:
    w, by = p.rate_window, n.by

    def rate(metric: str, extra: str = "", selector: str = "") -> str:
        return f"sum by ({by}{extra}) (rate({metric}{selector}[{w}]))"

    draft_stages = "|".join(s for s in STAGES if s != "verify")
    rules: list[dict[str, Any]] = [
        {"record": n.drafts, "expr": rate(_DRAFTS)},
        {"record": n.acceptance,
         "expr": f"{rate(_ACCEPTED)}\n/\n({rate(_DRAFT_TOKENS)} > 0)"},
        {"record": n.mean_length,
         "expr": f"1 + {rate(_ACCEPTED)}\n/\n({rate(_DRAFTS)} > 0)"},
        {"record": n.pos_accepted, "expr": rate(_POS_ACCEPTED, ", position")},
        {"record": n.pos_acceptance,
         "expr": f"{rate(_POS_ACCEPTED, ', position')}\n/\n"
                 f"({rate(_POS_DRAFT, ', position')} > 0)"},
        # Requests that reached position p: those that accepted the token at p-1.
        {"record": n.pos_trials, "expr": _shift(n.pos_accepted, p.max_draft_tokens)},
        # P(accept p | accepted p-1), as the ratio of the per-position acceptance at p and p-1.
        {"record": n.pos_conditional,
         "expr": f'{n.pos_acceptance}{{position!="0"}}\n/ on ({by}, position)\n'
                 f"(\n(\n{_shift(n.pos_acceptance, p.max_draft_tokens)}\n) > 0\n)"},
    ]
    for q in p.quantiles:
        rules.append({
            "record": n.quantile,
            "expr": f"histogram_quantile({_num(q)}, {rate(_STAGE + '_bucket', ', stage, le')})\n"
                    f"and on ({by}, stage)\n({rate(_STAGE + '_count', ', stage')} > 0)",
            "labels": {"quantile": _num(q)},
        })
    draft_seconds = rate(_STAGE + "_sum", selector='{stage=~"' + draft_stages + '"}')
    rules.append({
        "record": n.overhead,
        "expr": f"{draft_seconds}\n/\n({rate(_STEP + '_sum')} > 0)",
    })
    rules += _payoff_rules(p, n, rate, draft_seconds) + _group_rules(p, n)
    return rules


def _payoff_rules(p: RuleParams, n: _Names, rate: Any, draft_seconds: str) -> list[dict]:
    """The speedup over plain decoding (spec_metrics.payoff says why these formulas)."""
    step_seconds, emitted = rate(_STEP + "_sum"), rate(_EMITTED)
    cost_per_token = f"(\n{step_seconds}\n/\n({emitted} > 0)\n)"
    plain_cost = f"(\n{rate(_PLAIN_SECONDS)}\n/\n({rate(_PLAIN_TOKENS)} > 0)\n)"
    requests = f"({emitted}\n-\n{rate(_ACCEPTED)}\n> 0)"
    return [
        # Measured: plain steps' cost per token over all steps' cost per token.
        {"record": n.speedup_measured,
         "expr": f"{plain_cost}\n/\n({cost_per_token} > 0)"},
        # Upper bound: emitted per request-step x (step - draft stages) / step.
        {"record": n.speedup_bound,
         "expr": f"{emitted}\n/\n{requests}\n*\n"
                 f"({step_seconds}\n-\n{draft_seconds})\n/\n({step_seconds} > 0)"},
        {"record": n.speedup, "expr": f"{n.speedup_measured}\nor\n{n.speedup_bound}"},
    ]


def _group_rules(p: RuleParams, n: _Names) -> list[dict]:
    """Acceptance per request group now, and over the baseline window just before."""
    w, b, by = p.rate_window, p.drop_baseline_window, n.by_group

    def rate(metric: str, window: str, offset: str = "") -> str:
        return f"sum by ({by}) (rate({metric}[{window}]{offset}))"

    before = f" offset {w}"
    return [
        {"record": n.group_drafts, "expr": rate(_DRAFTS, w)},
        {"record": n.group_acceptance,
         "expr": f"{rate(_ACCEPTED, w)}\n/\n({rate(_DRAFT_TOKENS, w)} > 0)"},
        {"record": n.baseline_drafts, "expr": rate(_DRAFTS, b, before)},
        {"record": n.baseline_acceptance,
         "expr": f"{rate(_ACCEPTED, b, before)}\n/\n({rate(_DRAFT_TOKENS, b, before)} > 0)"},
    ]


def _who(p: RuleParams) -> str:
    consts = ", ".join(f"{label}={{{{ $labels.{label} }}}}" for label in p.const_labels)
    return "{{ $labels.method }}" + (f" ({consts})" if consts else "")


def _dashboard_url(p: RuleParams, name: str) -> str:
    """The generated dashboard in Grafana, its variables set to the alert's labels."""
    variables = ["method", *p.const_labels]
    if name == "SpecDecodeAcceptanceDropped":
        variables.append(p.group_label)
    query = "&".join(f"var-{v}={{{{ $labels.{v} | urlquery }}}}" for v in variables)
    return f"{p.grafana_url.rstrip('/')}/d/{DASHBOARD_UID}?{query}"


def _alert(p: RuleParams, name: str, expr: str, for_: str, summary: str,
           description: str) -> dict[str, Any]:
    annotations = {
        "summary": summary,
        "description": description,
        "runbook_url": f"{p.runbook_url}#{name.lower()}",
    }
    if p.grafana_url:
        annotations["dashboard_url"] = _dashboard_url(p, name)
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": p.severities.get(name, p.severity), **p.extra_labels},
        "annotations": annotations,
    }


def _alerting_rules(p: RuleParams, n: _Names) -> list[dict[str, Any]]:
    by, w, who = n.by, p.rate_window, _who(p)
    guard = f"\nand on ({by})\n{n.drafts} > {_num(p.min_drafts_per_second)}"
    overhead_stages = " + ".join(s for s in STAGES if s != "verify")
    pct = "{{ $value | humanizePercentage }}"
    return [
        _alert(p, ALERTS[0], f"{n.acceptance} < {_num(p.acceptance_rate_min)}{guard}",
               p.acceptance_for, "Speculative decoding acceptance rate is low",
               f"Acceptance rate of {who} is {pct} over {w}, "
               f"below {_num(p.acceptance_rate_min * 100)}%."),
        _alert(p, ALERTS[1], f"{n.mean_length} < {_num(p.mean_accepted_length_min)}{guard}",
               p.mean_length_for, "Speculative decoding mean accepted length is low",
               f"Mean accepted length of {who} is {{{{ $value | humanize }}}} tokens per verify "
               f"pass over {w}, below {_num(p.mean_accepted_length_min)}."),
        _alert(p, ALERTS[2],
               f"{n.pos_conditional}\n/ on ({by}) group_left\n"
               f'{n.pos_acceptance}{{position="0"}}\n< {_num(p.decay_ratio_min)}'
               f"\nand on ({by}, position)\n"
               f"{n.pos_trials} > {_num(p.min_position_trials_per_second)}"
               # A collapse of the whole draft is SpecDecodeAcceptanceRateLow's, not a decay.
               f"\nunless on ({by})\n{n.acceptance} < {_num(p.acceptance_rate_min)}{guard}",
               p.decay_for, "Speculative decoding acceptance decays at late draft positions",
               f"At draft position {{{{ $labels.position }}}}, the conditional acceptance of "
               f"{who} is {pct} of the acceptance at position 0 over {w}, "
               f"below {_num(p.decay_ratio_min * 100)}%."),
        _alert(p, ALERTS[3],
               f'{n.quantile}{{stage="verify", quantile="0.99"}}'
               f" > {_num(p.verify_p99_max_seconds)}{guard}",
               p.verify_for, "Speculative decoding verify p99 latency is high",
               f"p99 of the verify stage of {who} is {{{{ $value | humanizeDuration }}}} over "
               f"{w}, above {_num(p.verify_p99_max_seconds)}s."),
        _alert(p, ALERTS[4], f"{n.overhead} > {_num(p.draft_overhead_max)}{guard}",
               p.overhead_for, "Speculative decoding draft overhead is high",
               f"{overhead_stages} take {pct} of the step time of {who} over {w}, "
               f"above {_num(p.draft_overhead_max * 100)}%."),
        # Series seen within the lookback that are gone now while their target is up. The
        # series only exist after a first verified step, and counters stay exported while
        # idle, so an idle server never fires (see docs/runbook.md).
        _alert(p, ALERTS[5],
               f"max by (job, instance, {by}) (present_over_time({_DRAFTS}[{p.absent_lookback}]))"
               f"\nunless on (job, instance, {by})\n{_DRAFTS}\nand on (job, instance)\nup == 1",
               p.absent_for, "Speculative decoding metrics disappeared from a live target",
               f"{{{{ $labels.job }}}}/{{{{ $labels.instance }}}} is up but no longer exports "
               f"{_DRAFTS} for {who}, which it did within the last {p.absent_lookback}."),
        _alert(p, ALERTS[6],
               f"{n.group_acceptance}\n/ on ({n.by_group})\n{n.baseline_acceptance}\n"
               f"< {_num(p.drop_ratio_max)}"
               f"\nand on ({n.by_group})\n{n.group_drafts} > {_num(p.min_drafts_per_second)}"
               f"\nand on ({n.by_group})\n{n.baseline_drafts} > "
               f"{_num(p.min_drafts_per_second)}",
               p.drop_for, "Speculative decoding acceptance dropped against its own baseline",
               f"Acceptance of {who}, {p.group_label} {{{{ $labels.{p.group_label} }}}}, over "
               f"{w} is {pct} of its acceptance over the {p.drop_baseline_window} before, "
               f"below {_num(p.drop_ratio_max * 100)}%: a drafter or target change?"),
        _alert(p, ALERTS[7], f"{n.speedup} < {_num(p.speedup_min)}{guard}",
               p.payoff_for, "Speculative decoding is slower than plain decoding would be",
               f"The speedup estimate of {who} over plain decoding is "
               f"{{{{ $value | printf \"%.2f\" }}}}x over {w}, below "
               f"{_num(p.speedup_min)}x: speculation costs more than it saves."),
    ]


def build_rules(params: RuleParams | None = None) -> dict[str, Any]:
    """The rule file as a dict: one recording group, then one alerting group."""
    p = params or RuleParams()
    n = _Names(p)
    groups: list[dict[str, Any]] = [
        {"name": "spec_decode.recording", "rules": _recording_rules(p, n)},
        {"name": "spec_decode.alerts", "rules": _alerting_rules(p, n)},
    ]
    if p.evaluation_interval is not None:
        for group in groups:
            group["interval"] = p.evaluation_interval
    return {"groups": groups}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

_HEADER = ("# Generated from the metric catalog by `spec-metrics rules --out alerts`.\n"
           "# Do not edit: change RuleParams and regenerate. Runbook: docs/runbook.md\n")


def render_rules(params: RuleParams | None = None) -> str:
    """The rule file's YAML text; the same params always give the same bytes."""
    body = yaml.dump(build_rules(params), Dumper=_Dumper, sort_keys=False, width=1000,
                     default_flow_style=False, allow_unicode=True)
    return _HEADER + body


def write_rules(out_dir: str | Path, params: RuleParams | None = None) -> list[Path]:
    """Write the rule file into `out_dir` (created if needed); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RULES_FILE
    path.write_text(render_rules(params), encoding="utf-8")
    return [path]
