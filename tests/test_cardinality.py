"""Cardinality cap: a collector keeps at most `max_methods` distinct `method` values; steps of
further methods go to method="other" and spec_metrics_label_values_folded_total counts them."""

from __future__ import annotations

import pytest
from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics

import spec_metrics
from spec_metrics._prometheus.exposition import render

from .conftest import run_step, sample_value, scrape


def _accepted(families, method):
    return sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method=method)


def test_methods_beyond_the_cap_fold_into_other(registry, clock) -> None:
    first = spec_metrics.SpecDecodeHooks("a", registry=registry, max_methods=2, tracing=False,
                                         max_draft_tokens=4)
    hooks = {"a": first}
    for name in ("b", "c", "d"):
        hooks[name] = spec_metrics.SpecDecodeHooks(name, collector=first.collector,
                                                   tracing=False, max_draft_tokens=4)
    steps = {"a": 1, "b": 2, "c": 3, "d": 4}
    for name, count in steps.items():
        for _ in range(count):
            run_step(hooks[name], clock, [1, 2], 2)  # 3 accepted tokens per step
    families = scrape(registry)
    methods = {s.labels["method"] for s in families["spec_decode_accepted_tokens"].samples}
    assert methods == {"a", "b", "other"}
    assert _accepted(families, "a") == 3
    assert _accepted(families, "b") == 6
    assert _accepted(families, "other") == 3 * (3 + 4)
    assert sample_value(families, "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count", method="other") == 7
    assert sample_value(families, "spec_metrics_label_values_folded",
                        "spec_metrics_label_values_folded_total", label="method") == 7
    for encoder in (openmetrics.generate_latest, classic.generate_latest):
        assert render(registry, encoder) == encoder(registry)


def test_nothing_folded_under_the_cap(make_hooks, registry, clock) -> None:
    run_step(make_hooks(), clock, [1], 1)
    assert sample_value(scrape(registry), "spec_metrics_label_values_folded",
                        "spec_metrics_label_values_folded_total", label="method") == 0


def test_a_method_called_other_is_not_folded_twice(registry, clock) -> None:
    first = spec_metrics.SpecDecodeHooks("a", registry=registry, max_methods=1, tracing=False)
    other = spec_metrics.SpecDecodeHooks("other", collector=first.collector, tracing=False)
    run_step(other, clock, [1], 1)
    assert sample_value(scrape(registry), "spec_metrics_label_values_folded",
                        "spec_metrics_label_values_folded_total", label="method") == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, "many"])
def test_max_methods_must_be_a_positive_integer(registry, bad) -> None:
    with pytest.raises(ValueError, match="max_methods"):
        spec_metrics.SpecDecodeHooks("a", registry=registry, max_methods=bad)


def test_a_shared_collector_keeps_its_own_cap(registry) -> None:
    first = spec_metrics.SpecDecodeHooks("a", registry=registry, max_methods=4)
    with pytest.raises(ValueError, match="max_methods=8"):
        spec_metrics.SpecDecodeHooks("b", collector=first.collector, max_methods=8)
