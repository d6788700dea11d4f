"""The reference engine with the real hooks: metrics equal the engine's own counts exactly."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import spec_metrics
from spec_metrics.demo.factory import build_engine
from spec_metrics.demo.records import EngineConfig


def _value(families, family, sample, **labels):
    values = [s.value for s in families[family].samples
              if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(values) == 1, (sample, labels, values)
    return values[0]


@pytest.mark.parametrize("drafter,method,temperature,dynamic_k", [
    ("model", "draft_model", 0.0, False), ("model", "draft_model", 1.0, False),
    ("ngram", "ngram", 0.0, False), ("model", "draft_model", 1.0, True)])
def test_metrics_equal_engine_counters(target, drafter, method, temperature, dynamic_k):
    registry, exporter = CollectorRegistry(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = spec_metrics.SpecDecodeHooks(method, registry=registry, tracer_provider=provider,
                                         trace_ratio=0.2, max_draft_tokens=8, strict=True)
    engine = build_engine(drafter, hooks=hooks, seed=3, config=EngineConfig(
        batch_size=6, k=4, temperature=temperature, clock="virtual", seed=3,
        dynamic_k=dynamic_k, arrival_rate=20.0 if dynamic_k else 50.0))
    engine.collapse()  # a mix of acceptance levels: run half collapsed
    counters = engine.run(steps=20)
    engine.restore()
    counters = engine.run(steps=40)
    hooks.flush()
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    m = {"method": method}
    assert _value(families, "spec_decode_drafts", "spec_decode_drafts_total", **m) \
        == counters.drafts
    assert _value(families, "spec_decode_draft_tokens", "spec_decode_draft_tokens_total",
                  **m) == counters.draft_tokens
    assert _value(families, "spec_decode_accepted_tokens",
                  "spec_decode_accepted_tokens_total", **m) == counters.accepted_tokens
    assert _value(families, "spec_decode_emitted_tokens", "spec_decode_emitted_tokens_total",
                  **m) == counters.emitted_tokens
    for p in range(4):
        assert _value(families, "spec_decode_accepted_tokens_per_position",
                      "spec_decode_accepted_tokens_per_position_total", position=str(p),
                      **m) == counters.accepted_per_pos[p]
        assert _value(families, "spec_decode_draft_tokens_per_position",
                      "spec_decode_draft_tokens_per_position_total", position=str(p),
                      **m) == counters.draft_tokens_per_pos[p]
    assert _value(families, "spec_decode_steps_without_drafts",
                  "spec_decode_steps_without_drafts_total", **m) == counters.steps_without_drafts
    assert _value(families, "spec_decode_draft_length", "spec_decode_draft_length_count",
                  **m) == counters.verified
    assert _value(families, "spec_decode_draft_length", "spec_decode_draft_length_sum",
                  **m) == counters.draft_tokens
    if dynamic_k:  # the arrivals fill and drain the batch: K moves, plain steps happen
        assert 0 < counters.steps_without_drafts < counters.steps
    # accepted length is counted over drafts (requests that had draft tokens), like vLLM
    assert _value(families, "spec_decode_accepted_length", "spec_decode_accepted_length_count",
                  **m) == counters.drafts
    stage = "spec_decode_stage_duration_seconds"
    for name in ("draft", "verify", "draft_extend"):
        assert _value(families, stage, stage + "_count", stage=name, **m) == counters.steps
    assert counters.steps == 60 and 0 < counters.accepted_tokens < counters.draft_tokens
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0
    # traced steps carry the same counts as the metrics saw
    verify_spans = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.verify"]
    assert verify_spans and all(s.attributes["spec_decode.method"] == method
                                for s in verify_spans)
    provider.shutdown()
