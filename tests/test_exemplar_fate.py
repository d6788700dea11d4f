"""Exemplars appear on /metrics only once the spans they point at were exported (through
SpanExportProcessor), never when those spans were lost, and a spike's exemplar still
survives until it is scraped. With other span processors the library cannot know: it says
so once, at construction, and shows exemplars at once."""

from __future__ import annotations

import logging
import threading

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

import spec_metrics
from spec_metrics._prometheus.exposition import metrics_response
from spec_metrics._tracing.processor import SpanExportProcessor

from .conftest import run_step, sample_value, scrape

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class GatedExporter(SpanExporter):
    """Each export waits until the test says how it ends: "ok" or "fail"."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.exported: set[tuple[str, str]] = set()
        self._turn = threading.Condition()

    def decide(self, outcome: str) -> None:
        with self._turn:
            self.outcomes.append(outcome)
            self._turn.notify_all()

    def export(self, spans):  # type: ignore[no-untyped-def]
        with self._turn:
            self._turn.wait_for(lambda: self.outcomes, timeout=30)
            outcome = self.outcomes.pop(0) if self.outcomes else "fail"
        if outcome == "fail":
            return SpanExportResult.FAILURE
        self.exported |= {(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
                          for s in spans}
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.decide("fail")


def _setup(registry: CollectorRegistry, **options):  # type: ignore[no-untyped-def]
    exporter = GatedExporter()
    processor = SpanExportProcessor(exporter, schedule_delay_millis=5, registry=registry)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    options.setdefault("trace_ratio", 1.0)
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         max_traced_steps_per_second=1e9, max_draft_tokens=4,
                                         outlier_quantile=None, **options)
    return exporter, processor, provider, hooks


def _exemplars(registry: CollectorRegistry, family: str = "spec_decode_stage_duration_seconds"
               ) -> dict[tuple[str, str], tuple[str, str]]:
    """(stage, le) -> (trace_id, span_id) of the exemplars a scrape shows on `family`."""
    return {(s.labels.get("stage", ""), s.labels["le"]): (s.exemplar.labels["trace_id"],
                                                          s.exemplar.labels["span_id"])
            for s in scrape(registry)[family].samples if s.exemplar is not None}


def test_exemplars_wait_for_export_and_never_show_lost_spans(registry, clock):
    exporter, processor, provider, hooks = _setup(registry)
    try:
        run_step(hooks, clock, [1, 2], 2)
        assert _exemplars(registry) == {}  # the spans are still queued: nothing to click
        exporter.decide("ok")
        assert processor.force_flush(10_000)
        first = _exemplars(registry)
        assert set(first) == {("draft", "0.0025"), ("verify", "0.01"),
                              ("draft_extend", "0.001")}
        assert set(first.values()) <= exporter.exported

        # The next step's spans are lost: its exemplars never show, the held ones stay.
        run_step(hooks, clock, [1, 2], 2)
        exporter.decide("fail")
        assert processor.force_flush(10_000)
        assert _exemplars(registry) == first
        assert sample_value(scrape(registry), "spec_metrics_exemplars_withheld",
                            "spec_metrics_exemplars_withheld_total", reason="span_lost") == 1
        counter = [s for s in scrape(registry)["spec_decode_accepted_tokens"].samples
                   if s.exemplar is not None]
        assert [(s.exemplar.labels["trace_id"], s.exemplar.labels["span_id"])
                for s in counter] == [first[("verify", "0.01")]]
    finally:
        exporter.decide("fail")
        provider.shutdown()


def test_a_pending_spike_keeps_its_slot_until_exported_and_scraped(registry, clock):
    exporter, processor, provider, hooks = _setup(registry, slow_step_seconds=0.2,
                                                  trace_ratio=0.0)
    try:
        run_step(hooks, clock, [1], 2, durations=(0.001, 0.3, 0.001))  # slow: traced
        assert _exemplars(registry) == {}
        exporter.decide("ok")
        assert processor.force_flush(10_000)
        spike = _exemplars(registry)[("verify", "0.5")]
        assert spike in exporter.exported
        # Ordinary steps traced by ratio afterwards land in the same bucket; they do not
        # replace the spike's exemplar before an OpenMetrics response showed it.
        ordinary = spec_metrics.SpecDecodeHooks(
            "eagle", collector=hooks.collector, tracer_provider=provider, trace_ratio=1.0,
            max_traced_steps_per_second=1e9, max_draft_tokens=4, outlier_quantile=None)
        run_step(ordinary, clock, [1], 2, durations=(0.001, 0.3, 0.001))
        exporter.decide("ok")
        assert processor.force_flush(10_000)
        assert _exemplars(registry)[("verify", "0.5")] == spike  # scrapes without the app
        metrics_response(registry, "GET", OPENMETRICS, None, "").sent()  # shown now
        run_step(ordinary, clock, [1], 2, durations=(0.001, 0.3, 0.001))
        exporter.decide("ok")
        assert processor.force_flush(10_000)
        assert _exemplars(registry)[("verify", "0.5")] != spike
    finally:
        exporter.decide("fail")
        provider.shutdown()


def test_other_processors_show_exemplars_at_once_and_are_named_once(registry, exporter, clock,
                                                                   caplog):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with caplog.at_level(logging.INFO, logger="spec_metrics"):
        hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry,
                                             tracer_provider=provider, trace_ratio=1.0,
                                             max_draft_tokens=4)
    notes = [r.getMessage() for r in caplog.records if "SimpleSpanProcessor" in r.getMessage()]
    assert len(notes) == 1 and "may point at spans that were lost" in notes[0]
    run_step(hooks, clock, [1], 2)
    assert len(_exemplars(registry)) == 3


def test_with_span_export_processor_nothing_is_said(registry, clock, caplog):
    with caplog.at_level(logging.INFO, logger="spec_metrics"):
        _, _, provider, _ = _setup(registry)
    provider.shutdown()
    assert not [r for r in caplog.records if "do not report" in r.getMessage()]
