"""The Grafana dashboard and the provisioning examples: generated from the catalog, every
query explicit, filtered by the variables, valid PromQL (checked offline by promtool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info < (3, 11):  # the SDK needs 3.11; on 3.11+ a missing SDK is a failure
    pytest.skip("grafana-foundation-sdk needs Python >= 3.11", allow_module_level=True)

from spec_metrics import catalog  # noqa: E402
from spec_metrics.catalog import METRICS, STAGES, by_name  # noqa: E402
from spec_metrics.ops import dashboards  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "dashboards" / dashboards.DASHBOARD_FILE
PROVISIONING = ROOT / "dashboards" / "provisioning"
METRIC_RE = re.compile(r"\b(spec_(?:decode|metrics)_\w+)")
SELECTOR_RE = re.compile(r"\b(spec_(?:decode|metrics)_\w+)\{([^}]*)\}")
PROMTOOL_HELP = (
    "promtool is required to check the dashboard's PromQL offline; install Prometheus "
    "(it ships promtool): apt-get install -y --no-install-recommends prometheus"
)


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return dashboards.build_dashboard()


def _query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def _family(metric: str) -> str:
    """The catalog name of a series name: histogram suffixes map to their family."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = metric[: -len(suffix)]
        if metric.endswith(suffix) and base in {s.name for s in METRICS}:
            if by_name(base).type == "histogram":
                return base
    return metric


def test_committed_json_equals_generator():
    assert COMMITTED.read_text(encoding="utf-8") == dashboards.render_dashboard_json(), (
        "dashboards/spec_metrics.json is out of date: run `spec-metrics dashboards --out "
        "dashboards/` (or spec_metrics.ops.dashboards.write_dashboards('dashboards'))"
    )


def test_render_is_deterministic_and_write(tmp_path):
    assert dashboards.render_dashboard_json() == dashboards.render_dashboard_json()
    paths = dashboards.write_dashboards(tmp_path)
    assert paths == [tmp_path / dashboards.DASHBOARD_FILE]
    assert paths[0].read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")


def test_dashboard_metadata(dash):
    assert dash["uid"] == dashboards.DASHBOARD_UID
    assert dash["title"] and dash["tags"] and dash["refresh"]
    assert dash["time"] == {"from": "now-30m", "to": "now"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in _query_panels(dash)]
    assert len(titles) == len(set(titles))


def test_required_panels_present(dash):
    by_title = {p["title"]: p for p in _query_panels(dash)}
    for stage in STAGES:
        assert by_title[f"{stage} latency p50/p95/p99"]["type"] == "timeseries"
        assert by_title[f"{stage} latency heatmap"]["type"] == "heatmap"
    expected_units = {
        "Step duration p50/p95/p99": "s",
        "Acceptance rate": "percentunit",
        "Mean accepted length": "short",
        "Accepted-length distribution": "short",
        "Acceptance by draft position": "percentunit",
        "Stage share of step time (draft overhead)": "percentunit",
        "Emitted tokens/s": "tokens/s",
        "Drafts/s": "short",
        "Dropped observations by reason": "short",
    }
    for title, unit in expected_units.items():
        assert by_title[title]["fieldConfig"]["defaults"]["unit"] == unit, title


def test_every_panel_has_explicit_unique_ref_ids(dash):
    for panel in _query_panels(dash):
        targets = panel.get("targets") or []
        assert targets, panel["title"]
        refs = [t.get("refId") for t in targets]
        assert all(refs), (panel["title"], refs)
        assert len(refs) == len(set(refs)), (panel["title"], refs)
        for t in targets:
            assert t["expr"].strip(), panel["title"]
            assert t.get("legendFormat"), panel["title"]


def test_every_target_uses_the_datasource_variable(dash):
    for panel in _query_panels(dash):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel


def test_metric_names_come_from_the_catalog_and_selectors_use_the_variables(dash):
    used = set()
    for title, ref, expr in dashboards.panel_queries(dash):
        names = METRIC_RE.findall(expr)
        assert names, (title, ref)
        # every metric reference is a selector filtered by the variables
        assert len(SELECTOR_RE.findall(expr)) == len(names), (title, expr)
        for metric, matchers in SELECTOR_RE.findall(expr):
            spec = by_name(_family(metric))  # KeyError: not in the catalog
            used.add(spec.name)
            wanted = ["method"] if "method" in spec.labels else []
            wanted += list(dashboards.DEFAULT_CONST_LABELS)
            for label in wanted:
                assert f'{label}=~"${label}"' in matchers, (title, metric, label)
    assert used == {spec.name for spec in METRICS}  # the dashboard shows every metric


def test_latency_panels_have_exemplars(dash):
    latency = [p for p in _query_panels(dash)
               if "latency" in p["title"] or p["title"].startswith("Step duration")]
    assert len(latency) == 2 * len(STAGES) + 1
    for panel in latency:
        for t in panel["targets"]:
            assert t.get("exemplar") is True, panel["title"]


def test_heatmaps_use_classic_histogram_buckets(dash):
    heatmaps = [p for p in _query_panels(dash) if p["type"] == "heatmap"]
    assert len(heatmaps) == len(STAGES)
    for panel in heatmaps:
        assert panel["options"]["calculate"] is False
        assert panel["options"]["yAxis"]["unit"] == "s"
        (t,) = panel["targets"]
        assert t["format"] == "heatmap"
        assert t["expr"].startswith("sum by (le) (increase(")
        assert "_bucket{" in t["expr"] and "[$__rate_interval]" in t["expr"]


def test_variables(dash):
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("method", *dashboards.DEFAULT_CONST_LABELS):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["allValue"] == ".*"
        assert v["datasource"]["uid"] == "${datasource}"
        assert f", {name})" in v["query"] and "label_values(" in v["query"]


def test_const_labels_are_a_parameter():
    dash = dashboards.build_dashboard(const_labels=("cluster",))
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "method", "cluster", "group"}
    for _, _, expr in dashboards.panel_queries(dash):
        assert 'cluster=~"$cluster"' in expr and "$model" not in expr


def test_group_label_is_a_parameter_and_filters_grouped_series_only():
    dash = dashboards.build_dashboard(group_label="tenant")
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "method", "model", "engine", "tenant"}
    (variable,) = [v for v in dash["templating"]["list"] if v["name"] == "tenant"]
    assert "spec_decode_drafts_total" in json.dumps(variable["query"])
    grouped = {spec.name for spec in catalog.METRICS if spec.grouped}
    filtered = 0
    for title, _, expr in dashboards.panel_queries(dash):
        for selector in re.findall(r"(\w+)\{([^}]*)\}", expr):
            name, matchers = selector
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base in grouped or name in grouped:
                assert 'tenant=~"$tenant"' in matchers, (title, expr)
                filtered += 1
            elif name.startswith("spec_decode_"):
                assert "tenant" not in matchers, (title, expr)
    assert filtered > 5
    by_title = {t: e for t, _, e in dashboards.panel_queries(dash)}
    assert "sum by (method, tenant)" in by_title["Acceptance rate by group"]
    with pytest.raises(ValueError, match="also a constant label"):
        dashboards.build_dashboard(group_label="model")


@pytest.mark.parametrize("bad", ["method", "stage", "le", "datasource", "__x", "bad-name", ""])
def test_invalid_const_labels_are_rejected(bad):
    with pytest.raises(ValueError):
        dashboards.build_dashboard(const_labels=("model", bad))


def test_substitute_variables():
    expr = ('rate(x{method=~"$method", model=~"${model}"}[$__rate_interval]) '
            '+ increase(x[$__range]) + rate(x[$__interval])')
    out = dashboards.substitute_variables(expr, {"model": "tiny-gpt"}, rate_interval="30s",
                                          range_window="10m")
    assert out == ('rate(x{method=~".*", model=~"tiny-gpt"}[30s]) '
                   '+ increase(x[10m]) + rate(x[30s])')
    for _, _, e in dashboards.panel_queries(dashboards.build_dashboard()):
        assert "$" not in dashboards.substitute_variables(e)


def test_every_query_is_valid_promql(dash, tmp_path):
    """promtool parses PromQL offline only inside rule files: one recording rule per query."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROMTOOL_HELP)
    rules = [
        {"record": f"dashboard:query_{i}", "expr": dashboards.substitute_variables(expr)}
        for i, (_, _, expr) in enumerate(dashboards.panel_queries(dash))
    ]
    annotations = [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    assert annotations  # the drafter-change marks
    rules += [{"record": f"dashboard:annotation_{i}",
               "expr": dashboards.substitute_variables(expr)}
              for i, expr in enumerate(annotations)]
    variables = [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    # label_values(selector, label) is Grafana syntax: check its selector as PromQL.
    for i, query in enumerate(variables):
        selector = re.fullmatch(r"label_values\((.*), \w+\)", query)
        assert selector, query
        rules.append({"record": f"dashboard:variable_{i}",
                      "expr": dashboards.substitute_variables(selector.group(1))})
    path = tmp_path / "dashboard_queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_datasource_provisioning():
    doc = yaml.safe_load((PROVISIONING / "datasources" / "spec_metrics.yml").read_text())
    assert doc["apiVersion"] == 1
    by_type = {ds["type"]: ds for ds in doc["datasources"]}
    prom = by_type["prometheus"]
    destinations = prom["jsonData"]["exemplarTraceIdDestinations"]
    assert any(d["name"] == "trace_id" for d in destinations)
    trace_uids = {ds["uid"] for ds in doc["datasources"] if ds["type"] in ("tempo", "jaeger")}
    assert {d["datasourceUid"] for d in destinations} <= trace_uids
    assert by_type["tempo"]["uid"] == "tempo"


def test_dashboard_provider_provisioning():
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "spec_metrics.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_prometheus_config_example():
    text = (PROVISIONING / "prometheus.yml").read_text()
    assert "--enable-feature=exemplar-storage" in text
    doc = yaml.safe_load(text)
    assert doc["rule_files"] == ["../../alerts/spec_metrics.rules.yml"]
    (job,) = doc["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROMTOOL_HELP)
    result = subprocess.run([promtool, "check", "config", "--syntax-only",
                             str(PROVISIONING / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_regenerates_the_committed_dashboard(tmp_path):
    subprocess.run([sys.executable, "-m", "spec_metrics", "dashboards", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = Path(__file__).resolve().parent.parent / "dashboards" / "spec_metrics.json"
    assert (tmp_path / "spec_metrics.json").read_text() == committed.read_text()


def test_dashboard_docs_are_current_and_every_image_exists():
    from spec_metrics.ops.dashboard_docs import render_dashboard_docs
    from spec_metrics.ops.dashboards import build_dashboard

    docs = Path(__file__).resolve().parent.parent / "docs"
    page = (docs / "dashboards.md").read_text()
    assert page == render_dashboard_docs(build_dashboard())
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    panels = [p for p in json.loads((Path(__file__).resolve().parent.parent / "dashboards" /
                                     "spec_metrics.json").read_text())["panels"]
              if p["type"] != "row"]
    assert len(images) == len(panels)
    for image in images:
        assert (docs / image).read_bytes()[:4] == b"\x89PNG", image
