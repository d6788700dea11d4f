"""Kubernetes manifests for the prometheus-operator and Grafana's dashboard sidecar.

Built from the generators' in-memory output, never from the committed files: the
`PrometheusRule` carries `build_rules(params.rules)`'s groups as they are, the dashboard
ConfigMap carries `render_dashboard_json(...)` for the rules' constant and group labels, and
the monitors scrape at the rules' `scrape_interval`, so one `RuleParams` keeps the rules, the
dashboard and the scrape interval they assume consistent. `render_manifests(KubernetesParams())`
is the text of the files in `deploy/kubernetes/`; a test keeps them equal. See
docs/kubernetes.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spec_metrics.ops.rules import RuleParams, build_rules

try:
    import yaml
except ImportError as exc:  # an ops tool: pyyaml comes with the extra
    raise ImportError("spec_metrics.ops.kubernetes writes YAML: pip install "
                      "'spec_metrics[ops]' (pyyaml)") from exc

__all__ = [
    "KubernetesParams", "MANIFEST_FILES", "SCRAPE_PROTOCOLS", "MIN_OPERATOR_VERSION",
    "DASHBOARD_LABEL", "CONFIGMAP_MAX_BYTES", "CLIENT_SIDE_APPLY_MAX_BYTES",
    "build_manifests", "dashboard_configmap", "render_manifests", "write_manifests",
]

MONITORING_API = "monitoring.coreos.com/v1"
# The first operator release whose PodMonitor and ServiceMonitor have `scrapeProtocols`.
MIN_OPERATOR_VERSION = "v0.72.0"
# OpenMetrics first: the only format that carries exemplars. PrometheusText1.0.0 is left out:
# Prometheus 2 and operators before v0.79 refuse it. Needs Prometheus >= 2.49.
SCRAPE_PROTOCOLS = ("OpenMetricsText1.0.0", "OpenMetricsText0.0.1", "PrometheusText0.0.4")
# Grafana's sidecar (grafana and kube-prometheus-stack helm charts) loads ConfigMaps with it.
DASHBOARD_LABEL = ("grafana_dashboard", "1")
DASHBOARD_KEY = "spec_metrics.json"
CONFIGMAP_MAX_BYTES = 1024 * 1024  # the API server refuses larger ConfigMap data
# Client-side `kubectl apply` copies the object into an annotation; annotations are capped.
CLIENT_SIDE_APPLY_MAX_BYTES = 256 * 1024
MANIFEST_FILES = {
    "PrometheusRule": "prometheusrule.yaml",
    "PodMonitor": "podmonitor.yaml",
    "ServiceMonitor": "servicemonitor.yaml",
    "ConfigMap": "grafana-dashboard-configmap.yaml",
}

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_DURATION = re.compile(r"(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                       r"(([0-9]+)s)?(([0-9]+)ms)?)")


def _check_label(key: str, value: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))) \
            or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"{key!r} is not a Kubernetes label key")
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"{value!r} (label {key}) is not a Kubernetes label value")


@dataclass(frozen=True)
class KubernetesParams:
    """Names, selectors and ports of the generated manifests; `rules` also sets the dashboard's
    labels (`const_labels`, `group_label`) and the monitors' interval (`scrape_interval`)."""

    name: str = "spec-metrics"  # of every object; the ConfigMap is `<name>-dashboard`
    namespace: str | None = None  # None: no metadata.namespace (kubectl apply -n decides)
    # Labels of the engine's pods (PodMonitor) or of its Service (ServiceMonitor).
    selector: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "inference-engine"})
    # Named container ports (PodMonitor) / Service ports (ServiceMonitor) serving /metrics;
    # one per rank when each rank serves its own (docs/integrations/multiprocess.md).
    port_names: tuple[str, ...] = ("metrics",)
    path: str = "/metrics"
    # `release: <name>` on the rule and the monitors, which kube-prometheus-stack's default
    # selectors require (its helm release name); None leaves the label out.
    release: str | None = "kube-prometheus-stack"
    rules: RuleParams = field(default_factory=RuleParams)

    def __post_init__(self) -> None:
        if len(self.name) > 253 - len("-dashboard") or not _DNS_SUBDOMAIN.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} is not a DNS subdomain (lowercase a-z, 0-9, "
                             "'-', '.')")
        if self.namespace is not None and (len(self.namespace) > 63
                                           or not re.fullmatch(_DNS_LABEL, self.namespace)):
            raise ValueError(f"namespace {self.namespace!r} is not a DNS label")
        if not self.selector:
            raise ValueError("selector must have at least one label (an empty one selects "
                             "every pod or service)")
        for key, value in self.selector.items():
            _check_label(key, value)
        if self.release is not None:
            _check_label("release", self.release)
        if not self.port_names or len(set(self.port_names)) != len(self.port_names):
            raise ValueError("port_names must be distinct and at least one")
        for port in self.port_names:
            if len(port) > 15 or not _PORT_NAME.fullmatch(port) or "--" in port \
                    or not re.search("[a-z]", port):
                raise ValueError(f"port name {port!r} is not a Kubernetes port name (at most "
                                 "15 of a-z, 0-9, '-', with a letter)")
        if not self.path.startswith("/"):
            raise ValueError(f"path {self.path!r} must start with '/'")
        if not _DURATION.fullmatch(self.rules.scrape_interval):
            raise ValueError(f"scrape_interval {self.rules.scrape_interval!r} is not a "
                             "duration the operator accepts (e.g. 15s)")


def _metadata(p: KubernetesParams, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if p.namespace is not None:
        meta["namespace"] = p.namespace
    meta["labels"] = {"app.kubernetes.io/name": "spec-metrics", **labels}
    return meta


def _operator_labels(p: KubernetesParams) -> dict[str, str]:
    return {} if p.release is None else {"release": p.release}


def _endpoints(p: KubernetesParams) -> list[dict[str, Any]]:
    return [{"port": port, "path": p.path, "interval": p.rules.scrape_interval}
            for port in p.port_names]


def _monitor(p: KubernetesParams, kind: str, endpoints_key: str) -> dict[str, Any]:
    return {
        "apiVersion": MONITORING_API,
        "kind": kind,
        "metadata": _metadata(p, p.name, _operator_labels(p)),
        "spec": {
            "selector": {"matchLabels": dict(p.selector)},
            "scrapeProtocols": list(SCRAPE_PROTOCOLS),
            endpoints_key: _endpoints(p),
        },
    }


def _prometheus_rule(p: KubernetesParams) -> dict[str, Any]:
    return {
        "apiVersion": MONITORING_API,
        "kind": "PrometheusRule",
        "metadata": _metadata(p, p.name, _operator_labels(p)),
        "spec": {"groups": build_rules(p.rules)["groups"]},
    }


def dashboard_configmap(p: KubernetesParams, dashboard_json: str) -> dict[str, Any]:
    """The ConfigMap Grafana's sidecar loads `dashboard_json` from; ValueError over 1 MiB."""
    size = len(dashboard_json.encode("utf-8"))
    if size > CONFIGMAP_MAX_BYTES:
        raise ValueError(f"the dashboard JSON is {size} bytes; a ConfigMap holds at most "
                         f"{CONFIGMAP_MAX_BYTES}: split it into several dashboards")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(p, f"{p.name}-dashboard", dict([DASHBOARD_LABEL])),
        "data": {DASHBOARD_KEY: dashboard_json},
    }


def build_manifests(params: KubernetesParams | None = None,
                    dashboard_json: str | None = None) -> dict[str, dict[str, Any]]:
    """Each manifest as a dict, by kind (the keys of MANIFEST_FILES). `dashboard_json`
    defaults to the generated dashboard for the rules' constant and group labels."""
    p = params or KubernetesParams()
    if dashboard_json is None:
        from spec_metrics.ops.dashboards import render_dashboard_json

        dashboard_json = render_dashboard_json(p.rules.const_labels, p.rules.group_label)
    return {
        "PrometheusRule": _prometheus_rule(p),
        "PodMonitor": _monitor(p, "PodMonitor", "podMetricsEndpoints"),
        "ServiceMonitor": _monitor(p, "ServiceMonitor", "endpoints"),
        "ConfigMap": dashboard_configmap(p, dashboard_json),
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &anchors: each manifest reads alone
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

_HEADERS = {
    "PrometheusRule": "The groups of alerts/spec_metrics.rules.yml, for the prometheus-operator.",
    "PodMonitor": "Scrapes /metrics of the engine's pods, OpenMetrics first (exemplars). Use "
                  "this or\n# servicemonitor.yaml, not both.",
    "ServiceMonitor": "Scrapes /metrics behind the engine's Service, OpenMetrics first "
                      "(exemplars). Use this or\n# podmonitor.yaml, not both.",
    "ConfigMap": "dashboards/spec_metrics.json for Grafana's dashboard sidecar.",
}


def _render(kind: str, manifest: dict[str, Any]) -> str:
    header = [f"# {_HEADERS[kind]}",
              "# Generated by `spec-metrics k8s --out deploy/kubernetes`: do not edit, "
              "regenerate.",
              "# Prerequisites and parameters: docs/kubernetes.md"]
    if kind == "ConfigMap" and len(json.dumps(manifest)) > CLIENT_SIDE_APPLY_MAX_BYTES:
        header.append("# Too large for client-side apply: kubectl apply --server-side -f ...")
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1000,
                     default_flow_style=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body


def render_manifests(params: KubernetesParams | None = None,
                     dashboard_json: str | None = None) -> dict[str, str]:
    """The YAML text of each manifest, by file name; the same params give the same bytes."""
    return {MANIFEST_FILES[kind]: _render(kind, manifest)
            for kind, manifest in build_manifests(params, dashboard_json).items()}


def write_manifests(out_dir: str | Path, params: KubernetesParams | None = None) -> list[Path]:
    """Write the manifests into `out_dir` (created if needed); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_manifests(params).items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
