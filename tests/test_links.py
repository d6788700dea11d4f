"""A step span links to the sampled request contexts of its batch at any batch size, up to
a configurable limit; what is left out is counted on the span, never dropped silently by
the SDK's span limit."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import spec_metrics
from spec_metrics.ops.telemetry import make_tracer_provider

from .conftest import run_step


def _contexts(batch: int) -> list[str | None]:
    """Request i carries a context; every third one is sampled; every fifth has none."""
    out: list[str | None] = []
    for i in range(batch):
        if i % 5 == 4:
            out.append(None)
        else:
            flags = "01" if i % 3 == 0 else "00"
            out.append(f"00-{i + 1:032x}-{i + 1:016x}-{flags}")
    return out


def _step_span(provider: TracerProvider, exporter: InMemorySpanExporter, clock, batch: int,
               **options):  # type: ignore[no-untyped-def]
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=None, tracer_provider=provider,
                                         trace_ratio=1.0, max_draft_tokens=4, **options)
    run_step(hooks, clock, [1] * batch, 2, request_ids=[f"r{i}" for i in range(batch)],
             traceparents=_contexts(batch))
    hooks.flush()
    (step,) = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    return step


def _expected(batch: int) -> tuple[list[int], list[int]]:
    contexts = _contexts(batch)
    sampled = [i for i, c in enumerate(contexts) if c is not None and c.endswith("-01")]
    unsampled = [i for i, c in enumerate(contexts) if c is not None and c.endswith("-00")]
    return sampled, unsampled


@pytest.mark.parametrize("batch", [256, 1024])
def test_every_request_is_linked_through_make_tracer_provider(batch, clock):
    provider = make_tracer_provider("links", environ={}, registry=None)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    step = _step_span(provider, exporter, clock, batch, max_links_per_step=1024)
    sampled, unsampled = _expected(batch)
    linked = [link.context.trace_id - 1 for link in step.links]
    assert linked == sampled + unsampled  # sampled contexts first, then the others
    assert [dict(link.attributes)["spec_decode.request_id"] for link in step.links] == [
        f"r{i}" for i in sampled + unsampled]
    assert "spec_decode.links_dropped" not in step.attributes
    assert step.dropped_links == 0
    provider.shutdown()


@pytest.mark.parametrize("batch", [256, 1024])
def test_the_default_limit_keeps_sampled_contexts_and_counts_the_rest(batch, clock):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # the SDK's default span limit: 128 links
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    step = _step_span(provider, exporter, clock, batch)  # max_links_per_step 256
    sampled, unsampled = _expected(batch)
    assert len(step.links) == 128 and step.dropped_links == 0  # none dropped by the SDK
    assert [link.context.trace_id - 1 for link in step.links] == (sampled + unsampled)[:128]
    assert step.attributes["spec_decode.links_dropped"] == len(sampled) + len(unsampled) - 128


def test_our_limit_applies_below_the_sdks(clock):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    step = _step_span(provider, exporter, clock, 256, max_links_per_step=10)
    sampled, _ = _expected(256)
    assert [link.context.trace_id - 1 for link in step.links] == sampled[:10]
    assert step.attributes["spec_decode.links_dropped"] == 205 - 10  # 205 contexts of 256


def test_make_tracer_provider_leaves_an_explicit_link_limit_alone(monkeypatch):
    monkeypatch.delenv("OTEL_SPAN_LINK_COUNT_LIMIT", raising=False)
    provider = make_tracer_provider("links", registry=None)
    assert provider._span_limits.max_links == 1024
    provider.shutdown()
    monkeypatch.setenv("OTEL_SPAN_LINK_COUNT_LIMIT", "64")
    provider = make_tracer_provider("links", registry=None)
    assert provider._span_limits.max_links == 64
    provider.shutdown()
