"""The fast /metrics writer (textformat.py, exposition.py) against prometheus_client's own
writers: the bytes must be the same for any collector state, in both formats, next to
foreign collectors; and the lock-free hand-off of steps to the collector (consume)."""

from __future__ import annotations

import gzip
import threading
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString

import spec_metrics
from spec_metrics._prometheus.exposition import metrics_response, render
from spec_metrics._prometheus.textformat import format_count

from .conftest import run_step, sample_value, scrape
from .test_prometheus3 import PROM3_0_ACCEPT, PROM3_ACCEPT, PROM3_PROTO_FIRST
from .test_server import PROMETHEUS_ACCEPT

ENCODERS = {"openmetrics": openmetrics.generate_latest, "classic": classic.generate_latest}


def _drive(hooks: spec_metrics.SpecDecodeHooks, seed: int, steps: int, batch: int,
           groups: list[str] | None = None) -> None:
    """Steps of random acceptance; with `groups`, each request gets one of them (and now
    and then a verify_end without groups: the "default" group)."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        accepted = rng.integers(0, 5, batch)
        if not groups:
            run_step(hooks, None, accepted, 4)
            continue
        chosen = [groups[i] for i in rng.integers(0, len(groups), batch)]
        hooks.verify_start()
        hooks.verify_end(accepted, rng.integers(accepted, 5), chosen if step % 3 else None)
        hooks.end_step()


@given(
    methods=st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=4, unique=True),
    const=st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
                          st.text(max_size=10), max_size=3),
    steps=st.integers(0, 6),
    traced=st.booleans(),
    bad_inputs=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    groups=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=8), min_size=1,
                                         max_size=6, unique=True)),
    max_groups=st.integers(1, 4),
)
@settings(max_examples=160, deadline=None)
def test_fast_writer_matches_prometheus_client(methods, const, steps, traced, bad_inputs,
                                               seed, groups, max_groups) -> None:
    """Any label values (quotes, backslashes, newlines, unicode), any number of methods,
    with and without exemplars and dropped input, with and without a group label (any
    group values, some folded), next to foreign collectors."""
    const = {k: v for k, v in const.items() if k not in ("method", "stage", "position",
                                                         "reason", "le", "quantile", "tenant")}
    grouping = {} if groups is None else {"group_label": "tenant", "max_groups": max_groups}
    registry = CollectorRegistry(target_info={"service": 'a"b'})
    Counter("foreign_requests", "A foreign counter.", ["path"], registry=registry) \
        .labels('/x"y').inc(3)
    hooks_list = []
    collector = None
    for method in methods or ["only"]:
        hooks = spec_metrics.SpecDecodeHooks(
            method, registry=registry if collector is None else None, collector=collector,
            labels=const if collector is None else None,
            trace_ratio=1.0 if traced else 0.0, tracing=traced, **grouping)
        collector = hooks.collector
        hooks_list.append(hooks)
    Gauge("foreign_after", "Registered after ours.", registry=registry).set(1.5)
    for index, hooks in enumerate(hooks_list):
        _drive(hooks, seed + index, steps, 8, groups)
        for _ in range(bad_inputs):
            hooks.verify_end([1])  # end without start: counted as dropped
    for name, encoder in ENCODERS.items():
        assert render(registry, encoder) == encoder(registry), name


@given(st.integers(min_value=0, max_value=2**62))
def test_format_count_is_float_to_go_string(n: int) -> None:
    assert format_count(n) == floatToGoString(float(n))


@pytest.mark.parametrize("n", [0, 1, 999_999, 1_000_000, 1_234_567, 10**15, 2**53 + 1])
def test_format_count_edges(n: int) -> None:
    assert format_count(n) == floatToGoString(n)


def test_large_counts_and_sums_are_written_like_prometheus_client(make_hooks, registry) -> None:
    hooks = make_hooks(max_draft_tokens=8)
    run_step(hooks, None, np.full(1_500_000, 7), 8)  # counters above 1e6: exponent form
    for encoder in ENCODERS.values():
        assert render(registry, encoder) == encoder(registry)
    assert b"spec_decode_draft_tokens_total{method=\"eagle\"} 1.2e+07" in render(
        registry, classic.generate_latest)


@pytest.mark.parametrize("accept", [
    PROMETHEUS_ACCEPT,
    PROM3_ACCEPT,        # Prometheus 3.4+ defaults (tests/test_prometheus3.py)
    PROM3_0_ACCEPT,      # Prometheus 3.0-3.2
    PROM3_PROTO_FIRST,   # Prometheus 3 scraping native histograms: protobuf first
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text; version=1.0.0; escaping=dots",     # prometheus_client's
    "application/openmetrics-text; version=2.0.0",                     # prometheus_client's
    "text/plain; version=1.0.0; escaping=values",                      # prometheus_client's
    "text/plain",
    None,
])
@pytest.mark.parametrize("grouped", [False, True], ids=["", "grouped"])
def test_response_equals_prometheus_client_for_every_accept_header(make_hooks, registry,
                                                                     accept, grouped) -> None:
    hooks = make_hooks(trace_ratio=1.0, **({"group_label": "tenant", "max_groups": 2}
                                           if grouped else {}))
    _drive(hooks, 0, 5, 16, ["lora-a", 'q"uote', "lora-c"] if grouped else None)
    # The info family too, with label values that need escaping.
    hooks.declare_drafter("llama-3-8b", "eagle-head", 4)
    hooks.declare_drafter('target "v2"', "path\\to\nhead", 0, method="ngram")
    encoder, content_type = classic.choose_encoder(accept or "")
    status, headers, body, _ = metrics_response(registry, "GET", accept, None, "")
    assert (status, headers) == ("200 OK", [("Content-Type", content_type)])
    assert body == encoder(registry)


def test_name_filter_gzip_and_methods_as_prometheus_client(make_hooks, registry) -> None:
    _drive(make_hooks(), 0, 3, 4)
    status, headers, body, _ = metrics_response(
        registry, "GET", PROMETHEUS_ACCEPT, "gzip", "name[]=spec_decode_drafts_total")
    assert ("Content-Encoding", "gzip") in headers
    text = gzip.decompress(body).decode()
    assert text == openmetrics.generate_latest(
        registry.restricted_registry(["spec_decode_drafts_total"])).decode()
    assert "spec_decode_drafts_total" in text and "spec_decode_accepted_tokens" not in text
    assert metrics_response(registry, "OPTIONS", None, None, "")[:2] == (
        "200 OK", [("Allow", "OPTIONS,GET")])
    status, headers, body, _ = metrics_response(registry, "POST", None, None, "")
    assert status == "405 Method Not Allowed" and body.startswith(b"# HTTP 405")


def test_served_bytes_equal_prometheus_client(make_hooks, registry) -> None:
    hooks = make_hooks(trace_ratio=1.0)
    _drive(hooks, 1, 4, 8)
    with spec_metrics.start_http_server(port=0, registry=registry) as server:
        for accept, encoder in ((PROMETHEUS_ACCEPT, openmetrics.generate_latest),
                                ("text/plain", classic.generate_latest)):
            request = urllib.request.Request(server.url, headers={"Accept": accept})
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.read() == encoder(registry)


def test_collect_still_serves_other_renderers(make_hooks, registry) -> None:
    """prometheus_client's own writers (someone else's /metrics) still get families."""
    hooks = make_hooks()
    run_step(hooks, None, [1, 2, 3], 4)
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 6


# ---- lock-free hand-off ----------------------------------------------------------------


def _in_thread(fn) -> None:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the hook waited for the collector lock"


def test_steps_finished_while_a_scrape_holds_the_lock_are_queued_not_waited_for(
        make_hooks, registry, clock) -> None:
    hooks = make_hooks(trace_ratio=1.0)
    collector = hooks.collector
    with collector._lock:  # what a scrape does while it copies the counts
        _in_thread(lambda: [run_step(hooks, clock, [1, 2], 2) for _ in range(3)])
        assert len(collector._deferred) == 3
    families = scrape(registry)  # the scrape applies queued steps first
    assert len(collector._deferred) == 0
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 9
    assert sample_value(families, "spec_decode_stage_duration_seconds",
                        "spec_decode_stage_duration_seconds_count", method="eagle",
                        stage="verify") == 3
    assert sample_value(families, "spec_decode_stage_duration_seconds",
                        "spec_decode_stage_duration_seconds_sum", method="eagle",
                        stage="verify") == pytest.approx(0.030)
    assert families["spec_decode_accepted_tokens"].samples[0].exemplar is not None


def test_the_next_step_applies_queued_steps_in_order(make_hooks, registry, clock) -> None:
    hooks = make_hooks()
    collector = hooks.collector
    with collector._lock:
        _in_thread(lambda: run_step(hooks, clock, [2], 2))
    assert len(collector._deferred) == 1
    run_step(hooks, clock, [0], 2)  # lock free now: applies the queued step, then its own
    assert len(collector._deferred) == 0
    hist = collector._series["eagle"].accepted_hist.tolist()
    assert hist[:3] == [1, 0, 1]


def test_collect_honours_the_collector_contract(make_hooks, registry) -> None:
    # prometheus_client's Collector.collect() -> Iterable[Metric]: real families, whatever
    # is rendering (no sentinel), one per catalog entry, in catalog order.
    from prometheus_client.metrics_core import Metric

    from spec_metrics.catalog import METRICS

    hooks = make_hooks(trace_ratio=1.0)
    _drive(hooks, 0, 3, 4)
    families = list(hooks.collector.collect())
    assert all(isinstance(f, Metric) for f in families)
    assert [f.name for f in families] == [spec.family for spec in METRICS]


def test_our_apps_write_our_collectors_with_the_fast_writer(make_hooks, registry,
                                                            monkeypatch) -> None:
    # The registry's other collectors are collected as usual; ours are never asked for
    # families on this path, and the bytes still equal prometheus_client's.
    from spec_metrics._prometheus.exposition import _collectors_in_order, render_marking

    hooks = make_hooks(trace_ratio=1.0)
    Counter("other_requests", "Another library's counter.", registry=registry).inc()
    _drive(hooks, 1, 3, 4)
    expected = openmetrics.generate_latest(registry)
    assert _collectors_in_order(registry) is not None

    def refuse() -> None:
        raise AssertionError("the fast path collected families")

    monkeypatch.setattr(hooks.collector, "collect", refuse)
    body, shown = render_marking(registry, openmetrics.generate_latest)
    assert body == expected and len(shown) == 1
