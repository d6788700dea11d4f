"""The Kubernetes manifests: committed files equal the generators' output, the PrometheusRule
holds the groups of alerts/, the ConfigMap holds dashboards/, and every manifest passes a real
schema validator: kubernetes-validate (strict) for the ConfigMap, the Service example of the
docs and every object's metadata; jsonschema against the prometheus-operator CRDs'
openAPIV3Schema, vendored from the oldest operator the manifests support and a recent one
(tests/data/k8s-schemas/), with the API server's strict field validation emulated."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from spec_metrics.ops import kubernetes as k8s
from spec_metrics.ops.kubernetes import MANIFEST_FILES, KubernetesParams, build_manifests
from spec_metrics.ops.rules import RULES_FILE, RuleParams, build_rules

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = ROOT / "tests" / "data" / "k8s-schemas"
OPERATORS = sorted(p.name for p in SCHEMAS.glob("prometheus-operator-v*"))
CUSTOM_KINDS = ("PrometheusRule", "PodMonitor", "ServiceMonitor")
K8S_VERSION = kubernetes_validate.latest_version()  # the newest the pinned package bundles
needs_sdk = pytest.mark.skipif(sys.version_info < (3, 11),
                               reason="grafana-foundation-sdk needs Python >= 3.11")


def _committed(kind: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / MANIFEST_FILES[kind]).read_text(encoding="utf-8"))


def _strict(node: Any) -> Any:
    """An openAPIV3Schema as the API server applies it with strict field validation (kubectl's
    default): unknown fields are errors, `set` lists unique; Go's `^(?i)` made Python's."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if isinstance(node.get("pattern"), str) and node["pattern"].startswith("^(?i)"):
        out["pattern"] = "(?i)^" + node["pattern"][len("^(?i)"):]
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any,
                   schema: dict) -> Iterator[jsonschema.ValidationError]:
    """`x-kubernetes-list-type: map`: no two items with the same key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen: set[str] = set()
    for item in instance:
        key = json.dumps([item.get(k) for k in keys]) if isinstance(item, dict) else ""
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate list-map key {keys}={key}")
        seen.add(key)


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


def _validate(manifest: dict[str, Any], operator: str = OPERATORS[-1]) -> None:
    """Raise jsonschema.ValidationError unless `manifest` is valid for its kind."""
    meta_only = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest.get("metadata")}
    if manifest["kind"] not in CUSTOM_KINDS:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(meta_only, K8S_VERSION, strict=True)  # ObjectMeta
    path = SCHEMAS / operator / f"{manifest['kind'].lower()}-monitoring-v1.json"
    schema = _strict(json.loads(path.read_text(encoding="utf-8")))
    CRDValidator(schema).validate(manifest)


def test_committed_manifests_equal_generator_output():
    assert sorted(p.name for p in DEPLOY.glob("*.yaml")) == sorted(MANIFEST_FILES.values())
    for name, text in k8s.render_manifests(KubernetesParams()).items():
        assert (DEPLOY / name).read_text(encoding="utf-8") == text, (
            f"deploy/kubernetes/{name} differs from the generator: regenerate with "
            "`spec-metrics k8s --out deploy/kubernetes`")


def test_prometheus_rule_holds_the_groups_of_the_rule_file():
    groups = _committed("PrometheusRule")["spec"]["groups"]
    rule_file = yaml.safe_load((ROOT / "alerts" / RULES_FILE).read_text(encoding="utf-8"))
    assert groups == rule_file["groups"] == build_rules(RuleParams())["groups"]
    custom = RuleParams(rate_window="2m", scrape_interval="30s", evaluation_interval="1m",
                        extra_labels={"team": "inference"})
    manifest = build_manifests(KubernetesParams(rules=custom), dashboard_json="{}\n")
    assert manifest["PrometheusRule"]["spec"]["groups"] == build_rules(custom)["groups"]
    assert manifest["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["interval"] == "30s"
    _validate(manifest["PrometheusRule"])


@needs_sdk
def test_configmap_holds_the_dashboard_for_grafanas_sidecar():
    from spec_metrics.ops.dashboards import DASHBOARD_FILE, render_dashboard_json

    configmap = _committed("ConfigMap")
    text = (ROOT / "dashboards" / DASHBOARD_FILE).read_text(encoding="utf-8")
    assert configmap["data"] == {"spec_metrics.json": text}
    assert text == render_dashboard_json()
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    # Fits a ConfigMap and the annotation client-side `kubectl apply` writes.
    assert len(json.dumps(configmap)) < k8s.CLIENT_SIDE_APPLY_MAX_BYTES < k8s.CONFIGMAP_MAX_BYTES
    other = build_manifests(KubernetesParams(rules=RuleParams(const_labels=("cluster",),
                                                              group_label="tenant")))
    assert other["ConfigMap"]["data"]["spec_metrics.json"] == render_dashboard_json(
        ("cluster",), "tenant")


def test_large_dashboards_are_refused_or_flagged():
    big = json.dumps({"x": "a" * (300 * 1024)})
    assert "kubectl apply --server-side" in k8s.render_manifests(
        dashboard_json=big)["grafana-dashboard-configmap.yaml"]
    assert "server-side" not in (DEPLOY / MANIFEST_FILES["ConfigMap"]).read_text()
    with pytest.raises(ValueError, match="ConfigMap holds at most"):
        build_manifests(dashboard_json=json.dumps({"x": "a" * k8s.CONFIGMAP_MAX_BYTES}))


@pytest.mark.parametrize("kind,endpoints", [("PodMonitor", "podMetricsEndpoints"),
                                            ("ServiceMonitor", "endpoints")])
def test_monitors_scrape_openmetrics_at_the_rules_interval(kind, endpoints):
    spec = _committed(kind)["spec"]
    assert spec["scrapeProtocols"][0] == "OpenMetricsText1.0.0"  # exemplars
    assert spec[endpoints] == [{"port": "metrics", "path": "/metrics",
                                "interval": RuleParams().scrape_interval}]
    assert spec["selector"] == {"matchLabels": {"app.kubernetes.io/name": "inference-engine"}}
    assert _committed(kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("kind", CUSTOM_KINDS)
def test_custom_resources_pass_the_operators_crd_schema(kind, operator):
    _validate(_committed(kind), operator)


def test_configmap_passes_kubernetes_validate():
    _validate(_committed("ConfigMap"))


def test_vendored_schemas_cover_the_oldest_supported_operator():
    assert OPERATORS[0] == f"prometheus-operator-{k8s.MIN_OPERATOR_VERSION}"
    assert len(OPERATORS) >= 2
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    assert all(operator.removeprefix("prometheus-operator-") in readme for operator in OPERATORS)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    *parents, last = path.split("/")

    def mutate(doc: dict) -> None:
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
    return mutate


BROKEN = [
    ("PodMonitor", _set("spec/scrapeProtocols/0", "OpenMetrics"), "is not one of"),
    ("PodMonitor", _set("spec/podMetricEndpoints", []), "Additional properties"),
    ("ServiceMonitor", _set("spec/endpoints/0/interval", "15 seconds"), "does not match"),
    ("ServiceMonitor", _set("spec/endpoints/0/port", 9464), "is not of type"),
    ("PrometheusRule", _set("spec/groups/0/rules/0/for", "10 minutes"), "does not match"),
    ("PrometheusRule", _set("spec/groups/1/name", "spec_decode.recording"), "duplicate"),
    ("PrometheusRule", _set("spec/groups/0/rules/0/labels", {"severity": 1}), "not of type"),
    ("PrometheusRule", _set("metadata/labels/release", 7), "not of type"),
    ("ConfigMap", _set("data/spec_metrics.json", {"panels": []}), "not of type"),
    ("ConfigMap", _set("spec", {}), "Additional properties"),
]


@pytest.mark.parametrize("kind,mutate,message", BROKEN)
def test_broken_manifests_are_rejected(kind, mutate, message):
    manifest = copy.deepcopy(_committed(kind))
    mutate(manifest)
    with pytest.raises(jsonschema.ValidationError, match=message):
        _validate(manifest)


def test_params_are_checked():
    for bad in ({"namespace": "Inference"}, {"name": "spec_metrics"}, {"selector": {}},
                {"selector": {"app": "a b"}}, {"selector": {"-app": "x"}},
                {"port_names": ("metrics-port-rank0",)}, {"port_names": ("9464",)},
                {"port_names": ("metrics", "metrics")}, {"path": "metrics"},
                {"release": "kube prometheus"}):
        with pytest.raises(ValueError):
            KubernetesParams(**bad)


def test_params_reach_every_manifest():
    p = KubernetesParams(name="spec", namespace="inference", selector={"app": "vllm"},
                         port_names=("metrics-0", "metrics-1"), release=None)
    manifests = build_manifests(p, dashboard_json="{}\n")
    for manifest in manifests.values():
        assert manifest["metadata"]["namespace"] == "inference"
        assert "release" not in manifest["metadata"]["labels"]
        _validate(manifest)
    assert manifests["ConfigMap"]["metadata"]["name"] == "spec-dashboard"
    ports = [e["port"] for e in manifests["ServiceMonitor"]["spec"]["endpoints"]]
    assert ports == ["metrics-0", "metrics-1"]
    assert manifests["PodMonitor"]["spec"]["selector"] == {"matchLabels": {"app": "vllm"}}


@needs_sdk
def test_cli_regenerates_the_committed_manifests(tmp_path):
    def k8s_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spec_metrics", "k8s", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    assert k8s_cli("--out", str(tmp_path / "a")).returncode == 0
    for name in MANIFEST_FILES.values():
        assert (tmp_path / "a" / name).read_text() == (DEPLOY / name).read_text()
    result = k8s_cli("--out", str(tmp_path / "b"), "--namespace", "llm", "--selector",
                     "app=vllm", "--port-name", "metrics-0", "--port-name", "metrics-1",
                     "--release", "", "--interval", "30s", "--set", "rate_window=2m")
    assert result.returncode == 0, result.stderr
    monitor = yaml.safe_load((tmp_path / "b" / "podmonitor.yaml").read_text())
    assert monitor["metadata"] == {"name": "spec-metrics", "namespace": "llm",
                                   "labels": {"app.kubernetes.io/name": "spec-metrics"}}
    assert [e["interval"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["30s", "30s"]
    assert "[2m]" in (tmp_path / "b" / "prometheusrule.yaml").read_text()
    refused = k8s_cli("--out", str(tmp_path / "c"), "--interval", "2m")  # rate_window 5m < 4 x 2m
    assert refused.returncode != 0 and "rate_window" in refused.stderr


def test_docs_examples_are_valid():
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    objects = [b for b in blocks if isinstance(b, dict) and "kind" in b]
    assert objects, "docs/kubernetes.md has no example object to check"
    for obj in objects:
        _validate(obj)
    for name in MANIFEST_FILES.values():
        assert name in text
