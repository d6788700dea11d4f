"""Exemplars: only from exported spans, kept until scraped, never in the classic format."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest as classic_latest

from spec_metrics._prometheus.exemplars import ExemplarSlots
from spec_metrics._tracing.step_exemplars import PRIORITY

from .conftest import run_step, scrape


def _exemplars(families):
    return [
        (family.name, sample.labels, sample.exemplar)
        for family in families.values() for sample in family.samples
        if sample.exemplar is not None
    ]


def test_every_exemplar_resolves_to_an_exported_span(make_hooks, registry, exporter, clock):
    # No per-second cap here: how many steps a machine runs per second must not matter.
    hooks = make_hooks(trace_ratio=0.3, outlier_quantile=0.95, outlier_min_samples=50,
                       max_traced_steps_per_second=1e9)
    hooks._tracer._random.seed(7)
    for index in range(300):
        verify = 0.2 if index % 97 == 96 else 0.010 + (index % 5) * 0.001
        run_step(hooks, clock, [index % 3, 2], 2, durations=(0.002, verify, 0.001))
    exported = {(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x")): s
                for s in exporter.get_finished_spans()}
    found = _exemplars(scrape(registry))
    assert len(found) >= 10
    for family, labels, exemplar in found:
        key = (exemplar.labels["trace_id"], exemplar.labels["span_id"])
        assert key in exported, (family, labels, exemplar)
        span = exported[key]
        if family == "spec_decode_stage_duration_seconds":
            assert span.name == "spec_decode." + labels["stage"]
            assert abs((span.end_time - span.start_time) / 1e9 - exemplar.value) < 1e-9
        if family == "spec_decode_step_duration_seconds":
            assert span.name == "spec_decode.step"


def test_exemplar_value_lies_in_its_bucket(make_hooks, registry, clock):
    hooks = make_hooks(trace_ratio=1.0)
    run_step(hooks, clock, [1, 2], 2, durations=(0.003, 0.2, 0.0002))
    for family, labels, exemplar in _exemplars(scrape(registry)):
        if "le" in labels and labels["le"] != "+Inf":
            assert exemplar.value <= float(labels["le"]), (family, labels, exemplar)


def test_classic_text_format_carries_no_exemplars(make_hooks, registry, clock):
    hooks = make_hooks(trace_ratio=1.0)
    run_step(hooks, clock, [1, 2], 2)
    assert _exemplars(scrape(registry))  # OpenMetrics has them...
    text = classic_latest(registry).decode()
    assert "trace_id" not in text and " # {" not in text  # ...the classic format never


def _prometheus_scrape(registry):
    """Scrape like Prometheus does: through spec_metrics' /metrics app, asking for
    OpenMetrics; returns the parsed families."""
    import io

    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    import spec_metrics

    app = spec_metrics.make_wsgi_app(registry)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "HTTP_ACCEPT": "application/openmetrics-text;version=1.0.0",
               "wsgi.input": io.BytesIO()}
    body = b"".join(app(environ, lambda status, headers: None)).decode()
    return {f.name: f for f in text_string_to_metric_families(body)}


def _classic_scrape(registry):
    import io

    import spec_metrics

    app = spec_metrics.make_wsgi_app(registry)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "HTTP_ACCEPT": "text/plain", "wsgi.input": io.BytesIO()}
    return b"".join(app(environ, lambda status, headers: None)).decode()


def test_spike_exemplar_survives_ordinary_sampled_steps_until_scraped(make_hooks, registry, clock):
    # Every step is traced (ratio 1.0); verify above 0.2 s is slow. 0.15 s and 0.22 s both
    # fall into the (0.1, 0.25] bucket.
    hooks = make_hooks(trace_ratio=1.0, outlier_quantile=None, slow_stage_seconds=0.2)
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.22, 0.001))  # spike
    for _ in range(5):
        run_step(hooks, clock, [1], 2, durations=(0.001, 0.15, 0.001))  # ordinary, same bucket
    assert _verify_exemplar(scrape(registry), "0.25") == 0.22  # the spike survived...
    assert "trace_id" not in _classic_scrape(registry)  # ...and a classic scrape, which
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.15, 0.001))  # cannot show it,
    assert _verify_exemplar(_prometheus_scrape(registry), "0.25") == 0.22  # keeps it held.
    # Once an OpenMetrics scrape has shown it, a newer ordinary exemplar may take the slot.
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.15, 0.001))
    assert _verify_exemplar(_prometheus_scrape(registry), "0.25") == 0.15
    # A newer spike replaces an unscraped ordinary one at once.
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.24, 0.001))
    assert _verify_exemplar(_prometheus_scrape(registry), "0.25") == 0.24


def test_without_the_policy_the_spike_would_be_lost(make_hooks, registry, clock):
    # Same sequence, but the spike is only ratio-sampled (no slow limit): newest wins.
    hooks = make_hooks(trace_ratio=1.0, outlier_quantile=None)
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.22, 0.001))
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.15, 0.001))
    assert _verify_exemplar(scrape(registry), "0.25") == 0.15


def test_hold_time_bounds_an_unscraped_exemplar(make_hooks, registry, clock, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("spec_metrics._prometheus.collector.time.monotonic", lambda: now[0])
    hooks = make_hooks(trace_ratio=1.0, outlier_quantile=None, slow_stage_seconds=0.2,
                       exemplar_hold_seconds=30.0)
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.22, 0.001))
    now[0] += 29.0
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.15, 0.001))
    assert _verify_exemplar(scrape(registry), "0.25") == 0.22
    now[0] += 1.0  # held 30 s and never shown by an OpenMetrics scrape: replaceable
    run_step(hooks, clock, [1], 2, durations=(0.001, 0.15, 0.001))
    assert _verify_exemplar(scrape(registry), "0.25") == 0.15


def _verify_exemplar(families, le):
    """The value of the exemplar on the verify bucket `le`, or None."""
    for sample in families["spec_decode_stage_duration_seconds"].samples:
        if sample.labels.get("stage") == "verify" and sample.labels.get("le") == le:
            return None if sample.exemplar is None else round(sample.exemplar.value, 9)
    raise AssertionError("bucket not found")


def test_slot_policy():
    from prometheus_client.samples import Exemplar

    slots = ExemplarSlots(1, hold_seconds=60.0)
    spike = Exemplar({"trace_id": "a" * 32, "span_id": "b" * 16}, 1.0)
    ordinary = Exemplar({"trace_id": "c" * 32, "span_id": "d" * 16}, 0.5)
    assert slots.offer(0, spike, PRIORITY["slow"], now=0.0)
    assert not slots.offer(0, ordinary, PRIORITY["ratio"], now=1.0)  # unshown spike stays
    assert not slots.offer(0, ordinary, PRIORITY["outlier"], now=1.0)  # slow > outlier
    assert slots.peek(0) is spike
    slots.mark_shown(0, spike)
    assert slots.offer(0, ordinary, PRIORITY["ratio"], now=2.0)  # shown: may be replaced
    slots.mark_shown(0, spike)  # a stale mark (another exemplar now) changes nothing
    newer = Exemplar({"trace_id": "e" * 32, "span_id": "f" * 16}, 2.0)
    assert slots.offer(0, newer, PRIORITY["outlier"], now=3.0)
    assert not slots.offer(0, ordinary, PRIORITY["ratio"], now=62.9)
    assert slots.offer(0, ordinary, PRIORITY["ratio"], now=63.0)  # held 60 s: replaceable
