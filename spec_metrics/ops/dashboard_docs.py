"""docs/dashboards.md, generated from the dashboard: each panel, its queries, a snapshot.

The images are `spec-metrics snapshot` output of a demo run, committed under docs/img/;
a test keeps this page equal to what the generator produces now.
"""

from __future__ import annotations

from typing import Any, Mapping

from spec_metrics.ops.snapshot import panel_image_name, panels_of

__all__ = ["render_dashboard_docs", "IMAGE_DIR"]

IMAGE_DIR = "img/dashboard"


def render_dashboard_docs(dashboard: Mapping[str, Any]) -> str:
    lines = [
        "# The spec_metrics Grafana dashboard",
        "",
        "Generated from `dashboards/spec_metrics.json` (itself generated from the metric",
        "catalog) by `spec-metrics dashboards --out dashboards --docs docs/dashboards.md`; do",
        "not edit. Every panel filters by the `method` variable (where the metric has it) and",
        "by the constant labels `model` and `engine`. `$__rate_interval` should be at least",
        "4x the scrape interval.",
        "",
        "The pictures are `spec-metrics snapshot` output of one `spec-metrics demo` run on a CPU",
        "(a 300 ms verify spike every 3 s, the drafter collapsing halfway), scraped every",
        "second by Prometheus 2.42 with exemplar storage on. Red diamonds are exemplars,",
        "labelled with the first characters of their trace id.",
        "",
    ]
    for number, panel in enumerate(panels_of(dashboard)):
        title = panel.get("title", "")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        lines += [f"## {title}", ""]
        if panel.get("description"):
            lines += [panel["description"], ""]
        facts = [f"type `{panel['type']}`"] + ([f"unit `{unit}`"] if unit else [])
        if any(t.get("exemplar") for t in panel.get("targets", [])):
            facts.append("exemplars on")
        lines += [", ".join(facts) + ".", ""]
        for target in panel.get("targets", []):
            legend = target.get("legendFormat", "")
            lines += [f"Query {target['refId']}" + (f" (legend `{legend}`)" if legend else "")
                      + ":", "", "```promql", target["expr"], "```", ""]
        lines += [f"![{title}]({IMAGE_DIR}/{panel_image_name(number, title)})", ""]
    return "\n".join(lines)
