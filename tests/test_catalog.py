"""Golden test: what /metrics says equals what the catalog says."""

from __future__ import annotations

from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from spec_metrics import catalog
from spec_metrics.catalog import METRICS, STAGES

from .conftest import run_step


def test_exposition_matches_catalog(make_hooks, registry, clock):
    hooks = make_hooks(labels={"model": "tiny", "engine": "e"}, max_draft_tokens=3)
    run_step(hooks, clock, [0, 3], 3)
    text = openmetrics_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {spec.family for spec in METRICS}
    for spec in METRICS:
        family = families[spec.family]
        assert family.type == spec.type, spec.name
        assert family.documentation == spec.help, spec.name
        assert family.unit == spec.unit, spec.name
        expected_labels = set(spec.labels) | {"model", "engine"}
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == expected_labels, (spec.name, sample)
    stage = families["spec_decode_stage_duration_seconds"]
    assert {s.labels["stage"] for s in stage.samples} == set(STAGES)
    les = [s.labels["le"] for s in stage.samples
           if s.name.endswith("_bucket") and s.labels["stage"] == "draft"]
    assert les == [floatToGoString(b) for b in catalog.DEFAULT_STAGE_BUCKETS] + ["+Inf"]
    step_les = [s.labels["le"] for s in families["spec_decode_step_duration_seconds"].samples
                if s.name.endswith("_bucket")]
    assert step_les == [floatToGoString(b) for b in catalog.DEFAULT_STEP_BUCKETS] + ["+Inf"]
    length_les = [s.labels["le"] for s in families["spec_decode_accepted_length"].samples
                  if s.name.endswith("_bucket")]
    assert length_les == ["0.0", "1.0", "2.0", "3.0", "+Inf"]
    positions = {s.labels["position"]
                 for s in families["spec_decode_accepted_tokens_per_position"].samples}
    assert positions == {"0", "1", "2"}
    reasons = {s.labels["reason"] for s in families["spec_metrics_dropped"].samples}
    assert reasons == set(catalog.DROP_REASONS)


def test_names_follow_prometheus_conventions():
    for spec in METRICS:
        assert spec.name.startswith(("spec_decode_", "spec_metrics_"))
        if spec.type == "counter":
            assert spec.name.endswith("_total"), spec.name
        if spec.unit:
            assert spec.family.endswith("_" + spec.unit), spec.name
        assert "request_id" not in spec.labels
    assert catalog.by_name("spec_decode_drafts_total").type == "counter"


def test_markdown_table_lists_every_metric():
    table = catalog.markdown_table()
    for spec in METRICS:
        assert f"`{spec.name}`" in table
    assert len(table.strip().splitlines()) == len(METRICS) + 2


def test_readme_catalog_table_is_current():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("<!-- catalog:start -->\n")[1].split("<!-- catalog:end -->")[0]
    assert section == catalog.markdown_table()


def test_readme_documents_every_environment_variable():
    from pathlib import Path

    from spec_metrics._support.config import ENV_VARS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for option, (variable, _) in ENV_VARS.items():
        assert f"`{variable}`" in readme and f"`{option}`" in readme


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    blocks = readme.split("## Quick start")[1].split("```bash\n")[1:3]
    demo, tests = (block.split("\n```")[0].strip() for block in blocks)
    assert "spec-metrics demo" in demo  # the first command runs the demo...
    assert tests in (root / ".ci" / "run").read_text().splitlines()  # ...the second is CI's


def test_readme_span_metrics_table_is_current():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("<!-- span-catalog:start -->\n")[1].split("<!-- span-catalog:end -->")[0]
    assert section == catalog.markdown_table(catalog.SPAN_EXPORT_METRICS)


def test_span_processor_exposes_exactly_the_catalog():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    from spec_metrics._tracing.processor import SpanExportProcessor

    registry = CollectorRegistry()
    SpanExportProcessor(InMemorySpanExporter(), registry=registry)
    names = {family.name for family in registry.collect()}
    assert names == {spec.family for spec in catalog.SPAN_EXPORT_METRICS}


def test_no_metric_name_is_spelled_outside_the_catalog():
    # The catalog is the one source of names: any string constant elsewhere in the package
    # that spells a metric (family, sample or exposition name) is a second source.
    import ast
    from pathlib import Path

    names: set[str] = set()
    for spec in (*catalog.METRICS, *catalog.SPAN_EXPORT_METRICS, *catalog.VLLM_COMPAT_METRICS,
                 *catalog.OTLP_METRIC_EXPORT_METRICS):
        names |= {spec.name, spec.family}
        names |= {spec.family + suffix for suffix in ("_bucket", "_count", "_sum", "_created")}
    package = Path(catalog.__file__).resolve().parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "catalog.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(package)}:{node.lineno} {node.value!r}")
    assert not found, "metric names spelled outside catalog.py: " + "; ".join(found)
