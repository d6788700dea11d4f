"""The `spec-metrics` command line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from spec_metrics.ops.rules import RuleParams

__all__ = ["main"]


def _catalog(args: argparse.Namespace) -> int:
    from spec_metrics.catalog import markdown_table

    sys.stdout.write(markdown_table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from spec_metrics.demo.run import run

    return run(args)


def _dashboards(args: argparse.Namespace) -> int:
    from spec_metrics.ops.dashboards import DEFAULT_CONST_LABELS, write_dashboards

    labels = tuple(args.const_label) if args.const_label else DEFAULT_CONST_LABELS
    for path in write_dashboards(args.out, const_labels=labels, group_label=args.group_label):
        print(path)
    if args.docs:
        from pathlib import Path

        from spec_metrics.ops.dashboard_docs import render_dashboard_docs
        from spec_metrics.ops.dashboards import build_dashboard

        Path(args.docs).write_text(
            render_dashboard_docs(build_dashboard(labels, args.group_label)), encoding="utf-8")
        print(args.docs)
    return 0


def _rule_params(items: Sequence[str] | None, command: str = "rules") -> RuleParams:
    """RuleParams with the `--set NAME=VALUE` overrides of `spec-metrics <command>`."""
    import dataclasses

    from spec_metrics.ops.rules import RuleParams

    fields = {f.name: f for f in dataclasses.fields(RuleParams)}
    overrides: dict = {}
    for item in items or ():
        name, _, raw = item.partition("=")
        if name not in fields or not _:
            raise SystemExit(f"spec-metrics {command}: --set {item!r}: expected NAME=VALUE with "
                             f"NAME one of {', '.join(fields)}")
        default = getattr(RuleParams(), name)
        if isinstance(default, tuple):
            overrides[name] = tuple(type(default[0])(v) for v in raw.split(",") if v)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            overrides[name] = type(default)(raw)
        elif isinstance(default, dict):
            overrides[name] = dict(kv.split(":", 1) for kv in raw.split(",") if kv)
        else:
            overrides[name] = raw
    try:
        return RuleParams(**overrides)
    except ValueError as exc:
        raise SystemExit(f"spec-metrics {command}: {exc}") from exc


def _rules(args: argparse.Namespace) -> int:
    from spec_metrics.ops.rules import write_rules

    params = _rule_params(args.set)
    for path in write_rules(args.out, params):
        print(path)
    return 0


def _k8s(args: argparse.Namespace) -> int:
    import dataclasses

    from spec_metrics.ops.kubernetes import KubernetesParams, write_manifests

    rules = _rule_params(args.set, "k8s")
    kwargs: dict = {"namespace": args.namespace, "release": args.release or None,
                    "path": args.path, "name": args.name}
    if args.selector:
        pairs = [item.partition("=") for item in args.selector]
        if not all(key and eq for key, eq, _ in pairs):
            raise SystemExit("spec-metrics k8s: --selector takes KEY=VALUE")
        kwargs["selector"] = {key: value for key, _, value in pairs}
    if args.port_name:
        kwargs["port_names"] = tuple(args.port_name)
    try:
        if args.interval:
            rules = dataclasses.replace(rules, scrape_interval=args.interval)
        params = KubernetesParams(rules=rules, **kwargs)
    except ValueError as exc:
        raise SystemExit(f"spec-metrics k8s: {exc}") from exc
    for path in write_manifests(args.out, params):
        print(path)
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    import json

    from spec_metrics.ops.snapshot import SnapshotError, parse_duration, take_snapshot

    try:
        dashboard = json.loads(open(args.dashboard).read()) if args.dashboard else None
        index = take_snapshot(args.prometheus, parse_duration(args.range), args.out,
                              dashboard=dashboard, rate_interval=args.rate_interval)
    except SnapshotError as error:
        raise SystemExit(f"spec-metrics snapshot: {error}") from error
    print(index)
    return 0


def _scrape_config(args: argparse.Namespace) -> int:
    from spec_metrics.multiprocess import render_scrape_config

    try:
        sys.stdout.write(render_scrape_config(args.ranks, args.base_port, args.host or
                                              ["127.0.0.1"], fmt=args.format, job_name=args.job))
    except ValueError as exc:
        raise SystemExit(f"spec-metrics scrape-config: {exc}") from exc
    return 0


def build_parser() -> argparse.ArgumentParser:
    from spec_metrics._version import __version__

    parser = argparse.ArgumentParser(
        prog="spec-metrics",
        description="Prometheus metrics, OpenTelemetry spans and exemplars for "
        "speculative decoding.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    catalog = commands.add_parser("catalog", help="print the metric catalog as a Markdown table")
    catalog.set_defaults(run=_catalog)
    dashboards = commands.add_parser(
        "dashboards", help="write the Grafana dashboard JSON generated from the catalog",
        description="Write the Grafana dashboard (grafana-foundation-sdk, from the metric "
        "catalog). Needs: pip install 'spec_metrics[dashboards]'.")
    dashboards.add_argument("--out", default="dashboards", help="directory (default: dashboards)")
    dashboards.add_argument("--const-label", action="append", default=None, metavar="NAME",
                            help="a constant label to filter by (repeat; default: model, engine)")
    dashboards.add_argument("--group-label", default="group", metavar="NAME",
                            help="the hooks' group_label, for the request-group variable and "
                            "panels (default: group)")
    dashboards.add_argument("--docs", metavar="PATH",
                            help="also write the panel reference page (docs/dashboards.md)")
    dashboards.set_defaults(run=_dashboards)
    rules = commands.add_parser(
        "rules", help="write the Prometheus recording and alerting rules",
        description="Write the Prometheus rules generated from the metric catalog. Defaults "
        "and every parameter: docs/runbook.md.")
    rules.add_argument("--out", default="alerts", help="directory (default: alerts)")
    rules.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="override a parameter, e.g. --set rate_window=2m (repeat)")
    rules.set_defaults(run=_rules)
    k8s = commands.add_parser(
        "k8s", help="write the Kubernetes manifests (PrometheusRule, PodMonitor, "
        "ServiceMonitor, dashboard ConfigMap)",
        description="Write prometheus-operator manifests and the Grafana sidecar ConfigMap, "
        "from the same generators as `rules` and `dashboards`. See docs/kubernetes.md.")
    k8s.add_argument("--out", default="deploy/kubernetes",
                     help="directory (default: deploy/kubernetes)")
    k8s.add_argument("--namespace", help="metadata.namespace (default: none, kubectl's -n)")
    k8s.add_argument("--selector", action="append", metavar="KEY=VALUE",
                     help="a label of the engine's pods / Service (repeat; default: "
                     "app.kubernetes.io/name=inference-engine)")
    k8s.add_argument("--port-name", action="append", metavar="NAME",
                     help="a named port serving /metrics (repeat, e.g. one per rank; "
                     "default: metrics)")
    k8s.add_argument("--path", default="/metrics", help="default: /metrics")
    k8s.add_argument("--interval", help="scrape interval (the rules' scrape_interval, 15s)")
    k8s.add_argument("--release", default="kube-prometheus-stack",
                     help="`release` label kube-prometheus-stack selects by, its helm release "
                     "name; '' for none (default: kube-prometheus-stack)")
    k8s.add_argument("--name", default="spec-metrics", help="object name (default: spec-metrics)")
    k8s.add_argument("--set", action="append", metavar="NAME=VALUE",
                     help="a rule parameter, as for `spec-metrics rules` (repeat)")
    k8s.set_defaults(run=_k8s)
    snapshot = commands.add_parser(
        "snapshot", help="render every dashboard panel from a Prometheus to PNG + index.html",
        description="Run every dashboard panel's queries over a time range against a "
        "Prometheus and render them (matplotlib) to PNG files and one index.html, with the "
        "exemplars of latency panels as points labelled by trace id. Needs: "
        "pip install 'spec_metrics[snapshot]'.")
    snapshot.add_argument("--prometheus", required=True, metavar="URL",
                          help="e.g. http://127.0.0.1:9090")
    snapshot.add_argument("--range", default="15m", help="time range ending now (default 15m)")
    snapshot.add_argument("--out", default="snapshot", help="directory (default: snapshot)")
    snapshot.add_argument("--rate-interval", default="1m",
                          help="what $__rate_interval stands for (>= 4x scrape interval)")
    snapshot.add_argument("--dashboard", metavar="PATH",
                          help="dashboard JSON (default: the generated spec_metrics one)")
    snapshot.set_defaults(run=_snapshot)
    scrape = commands.add_parser(
        "scrape-config", help="print the Prometheus scrape job for one /metrics per rank",
        description="Print the Prometheus scrape job (static) or file_sd targets (JSON) for "
        "processes serving /metrics on base-port + local rank, rank = host index x ranks + "
        "local rank. See docs/integrations/multiprocess.md.")
    scrape.add_argument("--ranks", type=int, required=True, help="processes per host")
    scrape.add_argument("--base-port", type=int, default=9464, help="port of local rank 0")
    scrape.add_argument("--host", action="append", metavar="HOST",
                        help="a host, in node-rank order (repeat; default: 127.0.0.1)")
    scrape.add_argument("--format", choices=("static", "file_sd"), default="static",
                        help="static: a scrape_configs YAML block; file_sd: targets JSON")
    scrape.add_argument("--job", default="spec_metrics", help="job_name (static format)")
    scrape.set_defaults(run=_scrape_config)
    demo = commands.add_parser(
        "demo", help="run the instrumented reference speculative decoder (needs torch)",
        description="Run the torch reference speculative decoder, instrumented, serving "
        "/metrics; prints a summary at the end and on Ctrl-C.")
    from spec_metrics.demo.run import add_arguments

    add_arguments(demo)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
