"""The OTLP metrics push against real OTLP/HTTP receivers on loopback: what it pushes equals
what /metrics shows at the same moment (every series, bucket, count, sum and exemplar), its
exemplars point at spans a real span receiver got, delta pushes are differences, a collector
that is down or hangs never blocks the hooks and costs exactly one count per lost push, and
the standard variables are honoured."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import spec_metrics
from spec_metrics import catalog
from spec_metrics._prometheus.exposition import metrics_response
from spec_metrics._prometheus.otlp_data import PUSHED, otlp_names_table

from .otlp import MetricsReceiver, OtlpReceiver, free_port

ROOT = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
FAILED = catalog.OTLP_METRIC_EXPORTS_FAILED
EXPORTED = catalog.OTLP_METRIC_EXPORTS


@pytest.fixture
def receiver():
    server = MetricsReceiver()
    yield server
    server.close()


@pytest.fixture
def traced(registry):
    """Hooks whose spans go through SpanExportProcessor to a real span receiver (oteltap),
    so exemplars appear on /metrics once their spans were exported."""
    spans = OtlpReceiver()
    processor = spec_metrics.SpanExportProcessor(OTLPSpanExporter(endpoint=spans.url),
                                                 registry=registry, schedule_delay_millis=50)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    hooks = spec_metrics.SpecDecodeHooks(
        "eagle", registry=registry, tracer_provider=provider, trace_ratio=1.0,
        max_draft_tokens=4, labels={"model": "tiny"}, group_label="group",
        max_traced_steps_per_second=1e6)
    hooks.declare_drafter("tiny-gpt", "tiny-draft", 4)
    yield hooks, processor, spans
    hooks.close()
    provider.shutdown()
    spans.close()


def step(hooks: Any, clock: Any, accepted: list[int], k: int, groups: Any = None,
         durations: tuple[float, float, float] = (0.002, 0.010, 0.001)) -> None:
    hooks.begin_step()
    hooks.draft_start()
    clock.advance(durations[0])
    hooks.draft_end()
    hooks.verify_start()
    clock.advance(durations[1])
    hooks.verify_end(accepted, k, groups)
    hooks.draft_extend_start()
    clock.advance(durations[2])
    hooks.draft_extend_end()
    hooks.end_step()


def run_steps(hooks: Any, clock: Any, n: int, offset: int = 0) -> None:
    for i in range(offset, offset + n):
        if i % 7 == 6:  # a plain decode step (K = 0)
            step(hooks, clock, [0, 0], 0, durations=(0.0, 0.004, 0.0))
            continue
        slow = 0.3 if i % 11 == 10 else 0.0
        step(hooks, clock, [i % 5, (i * 3) % 5, 1], 4, groups=["prose", "hex", "prose"],
             durations=(0.001 + 0.0003 * (i % 9), 0.008 + 0.002 * (i % 13) + slow, 0.0005))


# ---- what /metrics shows and what was pushed, in one shape ------------------------------

def scrape(registry: Any) -> str:
    response = metrics_response(registry, "GET", OPENMETRICS, None, "")
    response.sent()
    return response.body.decode()


def otlp_name_of(family: Any) -> str:
    """The documented mapping, written out independently of the implementation."""
    name = family.name + ("_info" if family.type == "info" else "")
    return name[: -len("_seconds")] if family.unit == "seconds" else name


def _ns(timestamp: Any) -> int:
    return timestamp.sec * 1_000_000_000 + timestamp.nsec


def _exemplar(exemplar: Any) -> tuple:
    return (exemplar.labels["trace_id"], exemplar.labels["span_id"], float(exemplar.value),
            _ns(exemplar.timestamp))


def expected_points(text: str) -> dict[tuple, tuple]:
    """(OTLP name, attributes) -> values, from OpenMetrics text."""
    pushed_families = {spec.family for spec in PUSHED}
    points: dict[tuple, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in pushed_families:
            continue
        name = otlp_name_of(family)
        if family.type == "histogram":
            parts: dict[frozenset, dict] = {}
            for sample in family.samples:
                labels = dict(sample.labels)
                le = labels.pop("le", None)
                part = parts.setdefault(frozenset(labels.items()), {"buckets": []})
                if sample.name.endswith("_bucket"):
                    part["buckets"].append((le, int(sample.value), sample.exemplar))
                elif sample.name.endswith("_count"):
                    part["count"] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    part["sum"] = sample.value
            for attributes, part in parts.items():
                cumulative = [c for _, c, _ in part["buckets"]]
                counts = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]])]
                bounds = [float(le) for le, _, _ in part["buckets"] if le != "+Inf"]
                exemplars = sorted((_exemplar(e) for _, _, e in part["buckets"] if e),
                                   key=lambda e: e[2])
                points[(name, attributes)] = ("histogram", counts, bounds, part["count"],
                                              part["sum"], exemplars)
        else:
            for sample in family.samples:
                kind = "gauge" if family.type == "info" else "sum"
                exemplars = [_exemplar(sample.exemplar)] if sample.exemplar else []
                points[(name, frozenset(sample.labels.items()))] = (kind, sample.value,
                                                                     exemplars)
    return points


def pushed_points(request: ExportMetricsServiceRequest) -> dict[tuple, tuple]:
    points: dict[tuple, Any] = {}
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                for point in getattr(metric, kind).data_points:
                    attributes = frozenset((kv.key, kv.value.string_value)
                                           for kv in point.attributes)
                    exemplars = [(e.trace_id.hex(), e.span_id.hex(), e.as_double,
                                  e.time_unix_nano) for e in point.exemplars]
                    assert [e[2] for e in exemplars] == sorted(e[2] for e in exemplars)
                    key = (metric.name, attributes)
                    assert key not in points, key
                    if kind == "histogram":
                        assert not point.HasField("min") and not point.HasField("max")
                        points[key] = ("histogram", list(point.bucket_counts),
                                       list(point.explicit_bounds), point.count, point.sum,
                                       exemplars)
                    else:
                        points[key] = (kind, point.as_double, exemplars)
    return points


def metrics_of(request: ExportMetricsServiceRequest) -> dict[str, Any]:
    return {m.name: m for r in request.resource_metrics for s in r.scope_metrics
            for m in s.metrics}


def prometheus_name(metric: Any) -> str:
    """What a Prometheus-compatible OTLP receiver names the metric (Prometheus' otlptranslator
    with suffixes: the unit's suffix unless already there, `_total` for monotonic sums)."""
    tokens = metric.name.split("_")
    unit = metric.unit
    suffix = "" if not unit or "{" in unit else {"s": "seconds", "1": ""}.get(unit, unit)
    if suffix and suffix not in tokens:
        tokens.append(suffix)
    if metric.WhichOneof("data") == "sum" and metric.sum.is_monotonic:
        tokens = [t for t in tokens if t != "total"] + ["total"]
    return "_".join(tokens)


def failures(registry: Any) -> dict[str, float]:
    families = {f.name: f for f in text_string_to_metric_families(scrape(registry))}
    out = {s.labels["reason"]: s.value for s in families[FAILED.family].samples}
    out["exported"] = families[EXPORTED.family].samples[0].value
    return out


def start(registry: Any, endpoint: str | None, **options: Any) -> Any:
    options.setdefault("interval_s", 3600.0)  # only explicit pushes, unless a test wants more
    return spec_metrics.start_otlp_metrics_exporter(registry=registry, endpoint=endpoint,
                                                    **options)


# ---- the tests ---------------------------------------------------------------------------

def test_push_equals_metrics_and_exemplars_resolve_to_spans(registry, clock, receiver, traced):
    hooks, processor, spans = traced
    run_steps(hooks, clock, 60)
    hooks.flush()  # every step's spans made (with the worker consumer too)...
    assert processor.force_flush(20_000)  # ...and exported: their exemplars may show
    exporter = start(registry, receiver.endpoint)
    try:
        text = scrape(registry)  # the same moment: nothing happens in between
        assert exporter.force_flush()
        request = receiver.requests[-1]
        expected, pushed = expected_points(text), pushed_points(request)
        assert pushed == expected
        assert receiver.paths == ["/v1/metrics"]
        # Exemplars there are, and every one points at a span the span receiver got.
        keys = {(e[0], e[1]) for point in pushed.values() for e in point[-1]}
        assert len(keys) >= 10
        assert spans.wait_for_spans(keys)
        stage = metrics_of(request)["spec_decode_stage_duration"]
        assert sum(len(p.exemplars) for p in stage.histogram.data_points) >= 3
        drafts = metrics_of(request)["spec_decode_drafts"]
        assert all(len(p.exemplars) == 1 for p in drafts.sum.data_points)
        # Metadata: the catalog's help, UCUM units, cumulative, and names that a Prometheus
        # OTLP receiver maps back to exactly the /metrics names.
        families = {f.name: f for f in text_string_to_metric_families(text)}
        by_otlp = {otlp_name_of(f): f for f in families.values()}
        for name, metric in metrics_of(request).items():
            family = by_otlp[name]
            assert metric.description == family.documentation
            sample_names = {s.name for s in family.samples}
            assert prometheus_name(metric) in sample_names | {family.name}, name
            kind = metric.WhichOneof("data")
            if kind in ("sum", "histogram"):
                data = getattr(metric, kind)
                assert data.aggregation_temporality == 2  # CUMULATIVE
                assert all(p.start_time_unix_nano < p.time_unix_nano for p in data.data_points)
        assert metrics_of(request)["spec_decode_stage_duration"].unit == "s"
        assert metrics_of(request)["spec_decode_draft_tokens"].unit == "{token}"
        assert metrics_of(request)["spec_decode_drafter_info"].WhichOneof("data") == "gauge"
        scope = request.resource_metrics[0].scope_metrics[0].scope
        assert (scope.name, scope.version) == ("spec_metrics", spec_metrics.__version__)
    finally:
        exporter.shutdown()


def test_delta_pushes_the_differences(registry, clock, receiver, traced, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    hooks, processor, _ = traced
    exporter = start(registry, receiver.endpoint)
    try:
        assert exporter.delta
        run_steps(hooks, clock, 30)
        hooks.flush()
        assert processor.force_flush(20_000)
        first_text = scrape(registry)
        assert exporter.force_flush()
        run_steps(hooks, clock, 25, offset=30)
        hooks.flush()
        assert processor.force_flush(20_000)
        second_text = scrape(registry)
        assert exporter.force_flush()
        first, second = receiver.requests
        before, after = expected_points(first_text), expected_points(second_text)
        assert pushed_points(first) == before  # since the start
        differences = {}
        for key, now in after.items():
            old = before.get(key)
            if now[0] == "gauge" or old is None:
                differences[key] = now
            elif now[0] == "sum":
                seen = set(map(tuple, old[2]))
                differences[key] = ("sum", now[1] - old[1], [e for e in now[2] if e not in seen])
            else:
                seen = set(map(tuple, old[5]))
                differences[key] = ("histogram", [a - b for a, b in zip(now[1], old[1])],
                                    now[2], now[3] - old[3], now[4] - old[4],
                                    [e for e in now[5] if e not in seen])
        assert pushed_points(second) == differences
        assert any(point[-1] for point in differences.values())  # new exemplars only
        first_time = metrics_of(first)["spec_decode_drafts"].sum.data_points[0].time_unix_nano
        for metric in metrics_of(second).values():
            if metric.WhichOneof("data") in ("sum", "histogram"):
                data = getattr(metric, metric.WhichOneof("data"))
                assert data.aggregation_temporality == 1  # DELTA
                assert {p.start_time_unix_nano for p in data.data_points} == {first_time}
    finally:
        exporter.shutdown()


def test_collector_down_never_blocks_and_counts_each_failed_push(registry, clock, monkeypatch,
                                                                 caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "0.5")  # seconds (Python exporter)
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    exporter = start(registry, f"http://127.0.0.1:{free_port()}", timeout_s=30)
    caplog.set_level(logging.WARNING, logger="spec_metrics")
    try:
        for round_ in range(3):
            run_steps(hooks, clock, 20, offset=20 * round_)
            assert exporter.force_flush() is False
        counts = failures(registry)
        assert counts == {"export_failed": 3, "export_timeout": 0, "exported": 0}
        families = {f.name: f for f in text_string_to_metric_families(scrape(registry))}
        steps = [s.value for s in families["spec_decode_step_duration_seconds"].samples
                 if s.name.endswith("_count")]
        assert steps == [60]  # every step recorded meanwhile
    finally:
        exporter.shutdown()
        hooks.close()
    assert exporter.counts == {"exported": 0, "export_failed": 4, "export_timeout": 0}
    assert failures(registry)["export_failed"] == 4  # the last push, at shutdown
    warnings = [r for r in caplog.records if r.name == "spec_metrics" and "OTLP" in r.message]
    assert len(warnings) == 1  # rate-limited: once a minute per reason


def test_hanging_collector_is_given_up_on_and_counted(registry, clock, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "60")  # the request itself hangs
    hanging = MetricsReceiver(hang=True)
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    exporter = start(registry, hanging.endpoint, timeout_s=0.2)
    results: list[bool] = []
    try:
        # Pushes on another thread, the engine loop on this one: it never waits for them.
        pusher = threading.Thread(target=lambda: results.extend(
            exporter.force_flush() for _ in range(3)))
        pusher.start()
        steps = 0
        while pusher.is_alive() or steps < 100:
            run_steps(hooks, clock, 1, offset=steps)
            steps += 1
        pusher.join()
        assert results == [False, False, False]
        counts = failures(registry)
        assert counts == {"export_failed": 0, "export_timeout": 3, "exported": 0}
        families = {f.name: f for f in text_string_to_metric_families(scrape(registry))}
        assert [s.value for s in families["spec_decode_step_duration_seconds"].samples
                if s.name.endswith("_count")] == [steps]
        exporter.shutdown(timeout_millis=200)  # returns although the push still hangs
        assert failures(registry)["export_timeout"] == 4
    finally:
        exporter.shutdown()
        hooks.close()
        hanging.close()


def test_standard_variables(registry, clock, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", receiver.endpoint + "/v1/metrics")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-tenant=team-a")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "engine-7")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "50")  # ms
    monkeypatch.setenv("OTEL_METRIC_EXPORT_TIMEOUT", "20000")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "lowmemory")
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    run_steps(hooks, clock, 5)
    exporter = spec_metrics.start_otlp_metrics_exporter(registry=registry)
    try:
        assert (exporter.interval_s, exporter.timeout_s, exporter.delta) == (0.05, 20.0, True)
        assert receiver.wait_for(2)  # pushed by the interval alone
    finally:
        exporter.shutdown()
        hooks.close()
    assert receiver.headers[0]["x-tenant"] == "team-a"
    resource = {kv.key: kv.value.string_value
                for kv in receiver.requests[0].resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "engine-7"
    assert metrics_of(receiver.requests[0])["spec_decode_drafts"].sum.aggregation_temporality == 1


def test_base_endpoint_variable_and_argument(registry, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    exporter = start(registry, None)
    assert exporter.force_flush()
    exporter.shutdown()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporter = start(registry, receiver.endpoint + "/")  # a base URL: the path is added
    exporter.force_flush()
    exporter.shutdown()
    assert set(receiver.paths) == {"/v1/metrics"}
    with pytest.raises(ValueError):
        start(registry, None, temporality="sometimes")


def test_import_stays_light():
    code = ("import sys, spec_metrics; print(any(m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter')) for m in sys.modules)); "
            "spec_metrics.start_otlp_metrics_exporter; "
            "print('opentelemetry.sdk.metrics' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "True"]


def test_docs_tables_are_current():
    page = (ROOT / "docs" / "otlp-metrics.md").read_text()
    names = page.split("<!-- otlp-names:start -->\n")[1].split("<!-- otlp-names:end -->")[0]
    assert names == otlp_names_table()
    counters = page.split("<!-- otlp-catalog:start -->\n")[1].split("<!-- otlp-catalog:end -->")[0]
    assert counters == catalog.markdown_table(catalog.OTLP_METRIC_EXPORT_METRICS)
