"""Shared fixtures: a fresh registry, a real SDK tracer provider with an in-memory exporter,
and a settable clock for tests that need exact durations."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import spec_metrics
from spec_metrics._core import hooks as hooks_module

try:
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
except ImportError:  # a dev extra; the property tests import it themselves
    pass
else:
    # No wall-clock limits on property tests: hypothesis' default 200 ms deadline per example
    # and its too_slow health check (time spent generating data) fail on a loaded machine.
    hypothesis_settings.register_profile(
        "spec_metrics", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    hypothesis_settings.load_profile("spec_metrics")


def pytest_configure(config: pytest.Config) -> None:
    # Here, at the root, so `@pytest.mark.e2e` is known whichever test files are selected.
    config.addinivalue_line(
        "markers", "e2e: end to end against a real Prometheus and the demo (about a minute)")
    config.addinivalue_line(
        "markers", "worker: a unit test that runs with the default consumer, the worker thread")


@pytest.fixture(autouse=True)
def _inline_consumer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit tests in this directory consume finished steps inline, at end_step(), so
    that they can check spans and counters right after a step. What is recorded does not
    depend on the consumer: test_worker.py runs the same steps through the worker thread
    and inline and requires equal metrics, spans and drops; tests marked `worker`, and the
    demo, e2e and integration tests, run the default worker."""
    if os.environ.get("SPEC_METRICS_TEST_CONSUMER") == "worker":
        return  # all of them with the worker (the CUDA tests on a GPU machine, for one)
    if request.node.path.parent.name == "tests" and request.node.get_closest_marker(
            "worker") is None:
        monkeypatch.setenv("SPEC_METRICS_CONSUMER", "inline")


class Clock:
    """Stands in for perf_counter_ns so durations are exact: tests set the time by hand."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.now = start_ns

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider
    tracer_provider.shutdown()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(hooks_module, "perf_counter_ns", fake)
    return fake


@pytest.fixture
def make_hooks(registry: CollectorRegistry, provider: TracerProvider):
    def factory(method: str = "eagle", **options: Any) -> spec_metrics.SpecDecodeHooks:
        options.setdefault("trace_ratio", 0.0)
        options.setdefault("max_draft_tokens", 4)
        return spec_metrics.SpecDecodeHooks(
            method, registry=registry, tracer_provider=provider, **options
        )

    return factory


def run_step(hooks: spec_metrics.SpecDecodeHooks, clock: Clock | None, accepted: Any,
             draft_tokens: Any, durations: tuple[float, float, float] = (0.002, 0.010, 0.001),
             gap: float = 0.0, **step_kwargs: Any) -> None:
    """One step with exact stage durations (when a clock is given)."""
    hooks.begin_step(**step_kwargs)
    for index, (start, end) in enumerate(
        ((hooks.draft_start, hooks.draft_end), (hooks.verify_start, None),
         (hooks.draft_extend_start, hooks.draft_extend_end))
    ):
        start()
        if clock is not None:
            clock.advance(durations[index])
        if end is None:
            hooks.verify_end(accepted, draft_tokens)
        else:
            end()
        if clock is not None and index < 2:
            clock.advance(gap)
    hooks.end_step()


def scrape(registry: CollectorRegistry) -> dict[str, Any]:
    """OpenMetrics exposition parsed back by prometheus_client's own parser, by family."""
    text = openmetrics_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    matches = [
        s.value for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (family, sample, labels, matches)
    return matches[0]
