"""The generated Prometheus rules: golden file, promtool check and unit tests, runbook, catalog."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from spec_metrics import catalog
from spec_metrics.ops import rules
from spec_metrics.ops.dashboards import DASHBOARD_UID
from spec_metrics.ops.rules import ALERTS, RuleParams, build_rules, render_rules, write_rules

ROOT = Path(__file__).resolve().parent.parent
RULES_PATH = ROOT / "alerts" / rules.RULES_FILE
TESTS_DIR = ROOT / "alerts" / "tests"
RUNBOOK = ROOT / "docs" / "runbook.md"
INSTALL_HINT = (
    "promtool not found on PATH: install Prometheus, which ships it "
    "(Debian/Ubuntu: apt-get install -y --no-install-recommends prometheus)"
)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(INSTALL_HINT)
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _rules(doc: dict) -> list[dict]:
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_committed_rules_equal_generator_output():
    assert RULES_PATH.read_text(encoding="utf-8") == render_rules(RuleParams()), (
        "alerts/spec_metrics.rules.yml differs from the generator: regenerate it with "
        "python -c 'from spec_metrics.ops.rules import write_rules; write_rules(\"alerts\")'")


def test_render_is_deterministic_and_write_rules_writes_it(tmp_path):
    assert render_rules() == render_rules(RuleParams())
    paths = write_rules(tmp_path / "out")
    assert paths == [tmp_path / "out" / rules.RULES_FILE]
    assert paths[0].read_text(encoding="utf-8") == render_rules()
    assert yaml.safe_load(paths[0].read_text(encoding="utf-8")) == build_rules()


def test_promtool_check_rules():
    result = _run("check", "rules", RULES_PATH)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests():
    files = sorted(TESTS_DIR.glob("*.yml"))
    assert files, "no promtool test files in alerts/tests/"
    result = _run("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files), result.stdout


def test_every_alert_is_tested_firing_and_not_firing():
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS_DIR.glob("*.yml"):
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
                for alert in check["exp_alerts"]:
                    assert alert.get("exp_labels") and alert.get("exp_annotations"), check
    assert fired == set(ALERTS)
    assert quiet == set(ALERTS)


def test_every_alert_has_for_severity_annotations_and_runbook_anchor():
    runbook = RUNBOOK.read_text(encoding="utf-8")
    alerts = [rule for rule in _rules(build_rules()) if "alert" in rule]
    assert [alert["alert"] for alert in alerts] == list(ALERTS)
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert["for"]), name
        assert alert["labels"]["severity"] == "warning", name
        annotations = alert["annotations"]
        assert annotations["summary"], name
        assert "{{ $value" in annotations["description"] or name == "SpecDecodeMetricsAbsent"
        assert "{{ $labels.method }}" in annotations["description"], name
        url = annotations["runbook_url"]
        assert url == f"{rules.DOCS_BASE_URL}/runbook.md#{name.lower()}", name
        assert url.startswith("https://"), name  # a link Alertmanager, chat and pagers open
        anchor = url.split("#", 1)[1]
        assert f'<a id="{anchor}"></a>' in runbook, name
        assert f"### {name}\n" in runbook, name
        dashboard = annotations["dashboard_url"]
        assert dashboard.startswith(f"{rules.GRAFANA_URL}/d/{DASHBOARD_UID}?"), name
        for label in ("method", "model", "engine"):
            assert f"var-{label}={{{{ $labels.{label} | urlquery }}}}" in dashboard, name
        assert ("var-group=" in dashboard) == (name == "SpecDecodeAcceptanceDropped"), name


def test_ratio_alerts_carry_the_traffic_guard():
    guard = "method_model_engine:spec_decode_drafts:rate5m > 1"
    for alert in (r for r in _rules(build_rules()) if "alert" in r):
        if alert["alert"] == "SpecDecodeMetricsAbsent":
            assert "up == 1" in alert["expr"] and "present_over_time(" in alert["expr"]
        elif alert["alert"] == "SpecDecodeAcceptanceDropped":
            # Per group, and on both windows: traffic now and in the baseline window.
            by = "and on (method, group, model, engine)\n"
            assert alert["expr"].endswith(
                f"{by}method_group_model_engine:spec_decode_drafts:rate1h_offset5m > 1"), alert
            assert f"{by}method_group_model_engine:spec_decode_drafts:rate5m > 1\n" in \
                alert["expr"], alert
        else:
            assert alert["expr"].endswith(f"and on (method, model, engine)\n{guard}"), alert


def _fmt(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def test_runbook_lists_every_parameter_with_its_default():
    runbook = RUNBOOK.read_text(encoding="utf-8")
    for f in dataclasses.fields(RuleParams):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"| `{f.name}` | `{_fmt(default)}` |" in runbook, f.name


_PROMQL_WORDS = {
    "sum", "by", "on", "and", "or", "unless", "rate", "max", "group_left", "label_replace",
    "histogram_quantile", "present_over_time", "position", "stage", "le", "job", "instance",
    "method", "model", "engine", "quantile", "group", "offset",
}


def test_metric_names_in_expressions_exist_in_the_catalog():
    doc = build_rules()
    recorded = {rule["record"] for rule in _rules(doc) if "record" in rule}
    names = {spec.name for spec in catalog.METRICS}
    for spec in catalog.METRICS:
        if spec.type == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
    used: set[str] = set()
    for rule in _rules(doc):
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # drop label values and regexes
        expr = re.sub(r"\[[^\]]*\]|\{[^}]*\}", "", expr)  # drop ranges and matchers
        for token in re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):
            if token in _PROMQL_WORDS:
                continue
            used.add(token)
            assert token in names or token in recorded or token == "up", (token, rule)
    # Every metric the rules build on really is used, and through the catalog.
    assert {"spec_decode_drafts_total", "spec_decode_draft_tokens_total",
            "spec_decode_accepted_tokens_total",
            "spec_decode_draft_tokens_per_position_total",
            "spec_decode_accepted_tokens_per_position_total",
            "spec_decode_stage_duration_seconds_bucket",
            "spec_decode_stage_duration_seconds_sum",
            "spec_decode_step_duration_seconds_sum"} <= used
    # The alerts read recorded series (and the raw counter only for the absence check).
    for rule in _rules(doc):
        if "alert" in rule and rule["alert"] != "SpecDecodeMetricsAbsent":
            tokens = set(re.findall(r"[\w:]+", rule["expr"]))
            assert not tokens & names, rule


def test_stage_names_come_from_the_catalog():
    text = render_rules()
    for stage in catalog.STAGES:
        assert stage in text
    assert 'stage=~"draft|draft_extend"' in text


def test_parameters_change_the_output():
    default = render_rules()
    short = RuleParams(rate_window="4s", scrape_interval="1s", evaluation_interval="1s",
                       acceptance_for="5s", acceptance_rate_min=0.3)
    text = render_rules(short)
    assert text != default
    assert "rate(spec_decode_accepted_tokens_total[4s])" in text
    assert "method_model_engine:spec_decode_acceptance:ratio_rate4s < 0.3" in text
    assert "[5m]" not in text
    assert "interval: 1s" in text
    assert yaml.safe_load(text)["groups"][1]["rules"][0]["for"] == "5s"
    no_consts = render_rules(RuleParams(const_labels=()))
    assert "sum by (method) (rate(spec_decode_drafts_total[5m]))" in no_consts
    assert "model" not in no_consts
    custom = render_rules(RuleParams(runbook_url="https://example.org/runbook",
                                     extra_labels={"team": "inference"}, severity="page"))
    assert "runbook_url: https://example.org/runbook#specdecodeacceptanceratelow" in custom
    assert "team: inference" in custom and "severity: page" in custom
    k4 = render_rules(RuleParams(max_draft_tokens=4))
    assert 'position="3"}, "position", "4"' not in k4 and 'position="2"}, "position", "3"' in k4


def test_shortened_rules_pass_promtool_check(tmp_path):
    params = RuleParams(rate_window="4s", scrape_interval="1s", evaluation_interval="1s",
                        acceptance_for="5s", const_labels=("model",))
    path = write_rules(tmp_path, params)[0]
    result = _run("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kwargs", [
    {"rate_window": "30s"},  # < 4 x 15s scrape interval
    {"rate_window": "5 minutes"},
    {"const_labels": ("method",)},
    {"const_labels": ("model", "model")},
    {"acceptance_rate_min": 0},
    {"draft_overhead_max": 1.5},
    {"quantiles": (0.5, 0.9)},
    {"max_draft_tokens": 1},
    {"decay_for": "soon"},
    {"runbook_url": "docs/runbook.md"},  # relative: no pager or chat link can open it
    {"runbook_url": "runbooks.example.org/spec"},
    {"grafana_url": "grafana:3000"},
    {"severities": {"SpecDecodeAcceptanceRateLo": "critical"}},  # not an alert
])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        RuleParams(**kwargs)


def test_cli_regenerates_the_committed_rules(tmp_path):
    import sys

    subprocess.run([sys.executable, "-m", "spec_metrics", "rules", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = Path(__file__).resolve().parent.parent / "alerts" / "spec_metrics.rules.yml"
    assert (tmp_path / "spec_metrics.rules.yml").read_text() == committed.read_text()
    shorter = subprocess.run(
        [sys.executable, "-m", "spec_metrics", "rules", "--out", str(tmp_path / "short"),
         "--set", "rate_window=10s", "--set", "scrape_interval=1s"],
        check=True, capture_output=True)
    assert shorter.returncode == 0
    assert "[10s]" in (tmp_path / "short" / "spec_metrics.rules.yml").read_text()


def test_urls_and_severities_are_parameters(tmp_path):
    params = RuleParams(runbook_url="https://runbooks.example.org/spec-decode",
                        grafana_url="https://grafana.example.org/",
                        severities={"SpecDecodeAcceptanceRateLow": "critical"})
    alerts = {r["alert"]: r for r in _rules(build_rules(params)) if "alert" in r}
    low = alerts["SpecDecodeAcceptanceRateLow"]
    assert low["labels"]["severity"] == "critical"
    assert {a["labels"]["severity"] for n, a in alerts.items() if n != low["alert"]} == {
        "warning"}
    assert low["annotations"]["runbook_url"] == (
        "https://runbooks.example.org/spec-decode#specdecodeacceptanceratelow")
    assert low["annotations"]["dashboard_url"].startswith(
        f"https://grafana.example.org/d/{DASHBOARD_UID}?var-method=")
    # No Grafana: no dashboard link, the rest unchanged.
    bare = build_rules(RuleParams(grafana_url=""))
    assert not [r for r in _rules(bare) if "dashboard_url" in r.get("annotations", {})]
    path = write_rules(tmp_path, params)[0]
    result = _run("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_base_url_is_the_projects_repository():
    """The runbook links point into the repository pyproject names (one place: rules.py)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    urls = project.get("urls")
    if not urls:
        pytest.skip("pyproject.toml has no [project.urls]")
    homepage = urls.get("Homepage") or urls.get("Repository") or urls.get("Source")
    assert homepage and rules.DOCS_BASE_URL.startswith(homepage.rstrip("/") + "/"), (
        homepage, rules.DOCS_BASE_URL)
    assert (ROOT / "docs" / "runbook.md").is_file()  # what RUNBOOK_URL names, published


def test_cli_sets_urls_and_severities(tmp_path):
    import sys

    subprocess.run(
        [sys.executable, "-m", "spec_metrics", "rules", "--out", str(tmp_path),
         "--set", "runbook_url=https://runbooks.example.org/sd", "--set", "grafana_url=",
         "--set", "severities=SpecDecodeMetricsAbsent:critical,SpecDecodeNotPayingOff:info"],
        check=True, capture_output=True)
    doc = yaml.safe_load((tmp_path / rules.RULES_FILE).read_text())
    alerts = {r["alert"]: r for r in _rules(doc) if "alert" in r}
    assert alerts["SpecDecodeMetricsAbsent"]["labels"]["severity"] == "critical"
    assert alerts["SpecDecodeNotPayingOff"]["labels"]["severity"] == "info"
    assert alerts["SpecDecodeAcceptanceRateLow"]["labels"]["severity"] == "warning"
    assert alerts["SpecDecodeAcceptanceRateLow"]["annotations"] == {
        "summary": "Speculative decoding acceptance rate is low",
        "description": alerts["SpecDecodeAcceptanceRateLow"]["annotations"]["description"],
        "runbook_url": "https://runbooks.example.org/sd#specdecodeacceptanceratelow"}
    bad = subprocess.run([sys.executable, "-m", "spec_metrics", "rules", "--out", str(tmp_path),
                          "--set", "runbook_url=docs/runbook.md"], capture_output=True, text=True)
    assert bad.returncode != 0 and "absolute" in bad.stderr
