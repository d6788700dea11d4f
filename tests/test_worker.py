"""The default consumer: the engine thread only queues finished steps, spec_metrics' worker
thread (and scrapes, poll(), flush()) consume them. What is recorded must not depend on
where it is consumed; these tests run with the worker (marked `worker`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import spec_metrics
from spec_metrics import StrictModeError

from .conftest import run_step, sample_value, scrape
from .test_fork import run_in_child

pytestmark = pytest.mark.worker

DEADLINE_S = 20.0


def _samples(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in scrape(registry).values() for s in family.samples}


def _span_shapes(exporter: InMemorySpanExporter) -> list:
    """Spans without their ids and wall-clock anchor: name, duration, attributes."""
    return sorted((s.name, s.end_time - s.start_time, tuple(sorted(
        (k, str(v)) for k, v in (s.attributes or {}).items())))
        for s in exporter.get_finished_spans())


def _pair(consumer_options: list[dict], **options: Any) -> list:
    built = []
    for extra in consumer_options:
        registry, exporter = CollectorRegistry(), InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry,
                                             tracer_provider=provider, labels={"model": "m"},
                                             **options, **extra)
        built.append((hooks, registry, exporter))
    return built


def _random_steps(rng: np.random.Generator, n: int) -> list[tuple]:
    """Steps with every kind of input the hooks take, bad ones included."""
    steps = []
    for i in range(n):
        batch = int(rng.integers(1, 12))
        accepted = rng.integers(0, 5, batch)
        drafts: Any = 4 if i % 4 else rng.integers(accepted, 5)
        groups = [("prose", "code", "hex")[j % 3] for j in range(batch)] if i % 5 == 0 else None
        kind = i % 7
        value: Any = accepted if kind < 3 else accepted.tolist() if kind < 5 else \
            tuple(accepted.tolist())
        if i % 11 == 3:
            value = np.append(accepted, 9)  # accepted > drafted (and length differs)
        if i % 13 == 5:
            value = accepted.astype(float)
            value[0] = np.nan
        if i % 17 == 7:
            drafts = 9  # above max_draft_tokens
        if i % 19 == 2:
            value = "not counts"
        durations = tuple(float(x) for x in rng.uniform(0.0005, 0.02, 3))
        steps.append((value, drafts, groups, durations, i % 9 == 0))
    return steps


def test_worker_records_exactly_what_inline_records(clock) -> None:
    """Metrics, drops, spans and exemplar targets after every step: the same whether the
    worker or the engine thread consumed the steps (the scrape consumes what is queued)."""
    (worker, w_reg, w_exp), (inline, i_reg, i_exp) = _pair(
        [{}, {"consumer": "inline"}], group_label="group", max_groups=2, trace_ratio=0.3,
        slow_step_seconds=0.04, max_draft_tokens=4)
    assert not worker._inline and inline._inline
    rng = np.random.default_rng(11)
    for value, drafts, groups, durations, begin in _random_steps(rng, 240):
        for hooks in (worker, inline):
            hooks._tracer._random.seed(5)  # same ratio decisions on both
        for index, (start, end) in enumerate(
                (("draft_start", "draft_end"), ("verify_start", None),
                 ("draft_extend_start", "draft_extend_end"))):
            if begin and index == 0:
                for hooks in (worker, inline):
                    hooks.begin_step(request_ids=list(range(len(np.atleast_1d(drafts)))))
            for hooks in (worker, inline):
                getattr(hooks, start)()
            clock.advance(durations[index])
            for hooks in (worker, inline):
                if end is None:
                    hooks.verify_end(value, drafts, groups)
                else:
                    getattr(hooks, end)()
        for hooks in (worker, inline):
            hooks.end_step()
        assert _samples(w_reg) == _samples(i_reg)
    worker.flush()
    inline.flush()
    assert _samples(w_reg) == _samples(i_reg)
    assert worker.collector.drops.counts == inline.collector.drops.counts
    assert {r for r, n in worker.collector.drops.counts.items() if n} >= {
        "accepted_exceeds_drafted", "non_finite", "draft_tokens_exceed_max", "wrong_type"}
    assert _span_shapes(w_exp) == _span_shapes(i_exp)
    assert len(w_exp.get_finished_spans()) > 40


def test_the_engine_thread_only_queues_and_a_scrape_consumes(make_hooks, registry,
                                                            clock) -> None:
    hooks = make_hooks()
    with hooks._pending._lock:  # the worker is busy with it: nothing can consume
        run_step(hooks, clock, np.array([1, 2]), 2)
        assert len(hooks._pending.handed) == 1
        assert not hooks.collector._series  # nothing aggregated on the engine thread
    families = scrape(registry)  # consumes the queue first
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 3
    assert len(hooks._pending) == 0


def test_the_worker_thread_consumes_without_a_scrape(registry, provider, exporter) -> None:
    threads: list[str] = []
    hooks = spec_metrics.SpecDecodeHooks(
        "eagle", registry=registry, tracer_provider=provider, trace_ratio=1.0,
        on_step=lambda result: threads.append(threading.current_thread().name))
    for _ in range(5):
        run_step(hooks, None, [1, 1], 1)
    deadline = time.monotonic() + DEADLINE_S
    while len(threads) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker looks at least every 50 ms
    assert threads == ["spec-metrics-steps"] * 5
    assert len(exporter.get_finished_spans()) == 5 * 4  # built by the worker


def test_bad_input_is_counted_with_its_step_when_checked(make_hooks, registry, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spec_metrics")
    hooks = make_hooks()
    run_step(hooks, None, [0, 1], 1)
    run_step(hooks, None, [3], 2)  # accepted > drafted, found by the consumer
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="accepted_exceeds_drafted") == 1
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 1
    assert "spec_metrics.verify_end" in caplog.text
    assert "(step 1, checked off the engine thread) request 0 accepted 3 of 2" in caplog.text


def test_counts_are_copied_before_the_engine_reuses_its_buffers(make_hooks, registry) -> None:
    hooks = make_hooks(group_label="g")
    accepted, drafts, groups = np.array([2, 2]), np.array([2, 3]), ["a", "b"]
    with hooks._pending._lock:
        hooks.verify_start()
        hooks.verify_end(accepted, drafts, groups)
        hooks.end_step()
        accepted[:] = 0
        drafts[:] = 0
        groups[:] = ["c", "c"]
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle", g="a") == 2
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total", method="eagle", g="b") == 3


def test_strict_mode_checks_and_consumes_at_the_hook(make_hooks, registry) -> None:
    hooks = make_hooks(strict=True)
    assert hooks._inline
    run_step(hooks, None, [1], 1)
    assert hooks.collector._series  # consumed at end_step, on this thread
    hooks.verify_start()
    with pytest.raises(StrictModeError, match="spec_metrics.verify_end"):
        hooks.verify_end([3], 2)


def test_a_full_queue_is_consumed_here_or_its_oldest_step_dropped(make_hooks,
                                                                  registry) -> None:
    hooks = make_hooks(max_queued_steps=4)
    with hooks._pending._lock:  # someone else holds the queue: after 10 ms, the oldest go
        for _ in range(6):
            run_step(hooks, None, [1], 1)
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="pending_overflow") == 2
    assert sample_value(families, "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count", method="eagle") == 4
    for _ in range(6):  # no one does: end_step consumes the queue itself, nothing is lost
        run_step(hooks, None, [1], 1)
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="pending_overflow") == 2
    assert sample_value(families, "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count", method="eagle") == 10


def test_a_failing_sink_is_counted_and_later_steps_go_on(make_hooks, registry, monkeypatch,
                                                        caplog) -> None:
    hooks = make_hooks()
    original = hooks.collector._consume

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="spec_metrics"):
        with hooks._pending._lock:
            monkeypatch.setattr(hooks.collector, "_consume", broken)
            run_step(hooks, None, [1], 1)
        hooks.poll()  # consumed here: the sink fails
        monkeypatch.setattr(hooks.collector, "_consume", original)
    run_step(hooks, None, [1, 1], 1)
    hooks.flush()
    assert hooks.collector.drops.counts["internal_error"] == 1
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 2
    assert "internal error" in caplog.text


def test_a_listener_that_scrapes_does_not_deadlock(make_hooks, registry) -> None:
    seen: list[float] = []
    hooks = make_hooks(on_step=lambda result: seen.append(
        sample_value(scrape(registry), "spec_decode_step_duration_seconds",
                     "spec_decode_step_duration_seconds_count", method="eagle")))
    with hooks._pending._lock:
        run_step(hooks, None, [1], 1)
        run_step(hooks, None, [1], 1)
    hooks.flush()
    assert seen == [1, 2]


def test_a_forked_child_consumes_with_its_own_worker(make_hooks, registry) -> None:
    hooks = make_hooks()
    run_step(hooks, None, [1], 1)
    hooks.flush()

    def child() -> dict:
        threads: list[str] = []
        other = spec_metrics.SpecDecodeHooks(
            "ngram", registry=None,
            on_step=lambda result: threads.append(threading.current_thread().name))
        for _ in range(3):
            run_step(hooks, None, [2, 2], 2)
            run_step(other, None, [1], 1)
        deadline = time.monotonic() + 10
        while len(threads) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        families = scrape(registry)
        return {"child_tokens": sample_value(families, "spec_decode_accepted_tokens",
                                             "spec_decode_accepted_tokens_total",
                                             method="eagle"),
                "threads": threads}

    result = run_in_child(child)
    assert result["child_tokens"] == 12  # only the child's steps
    assert result["threads"] == ["spec-metrics-steps"] * 3
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == 1


@pytest.mark.parametrize("group_label", [None, "group"])
def test_steps_consumed_in_batches_equal_one_by_one(clock, group_label) -> None:
    """The worker takes runs of plain steps (numpy counts, one K) in one vectorized batch;
    traced steps (slow, outliers, ratio) and bad counts in a run go one by one. Metrics
    (float sums included), drops and spans equal the inline consumer's."""
    (worker, w_reg, w_exp), (inline, i_reg, i_exp) = _pair(
        [{}, {"consumer": "inline"}], group_label=group_label, trace_ratio=0.05,
        slow_step_seconds=0.05, max_draft_tokens=4, outlier_min_samples=50,
        max_traced_steps_per_second=1e6)  # real-time token bucket: not what is compared
    rng = np.random.default_rng(3)
    for hooks in (worker, inline):
        hooks._tracer._random.seed(3)  # the same ratio draws, in the same order
    bad = 0
    with worker._pending._lock:  # the steps queue up: the drain below sees long runs
        for i in range(1500):
            accepted = rng.integers(0, 5, int(rng.integers(1, 40)))
            k = 4 if i % 50 else 2
            if i % 97 == 13:
                accepted[0] = 7  # accepted > drafted: this run goes one by one
            bad += int((accepted > k).any())
            durations = rng.uniform(0.001, 0.004, 3)
            if i % 211 == 100:
                durations[1] = 0.2  # an outlier and a slow step
            for index, (start, end) in enumerate(
                    (("draft_start", "draft_end"), ("verify_start", None),
                     ("draft_extend_start", "draft_extend_end"))):
                if i % 7 == 3 and index == 2:
                    continue  # no draft_extend in this step
                for hooks in (worker, inline):
                    getattr(hooks, start)()
                clock.advance(float(durations[index]))
                for hooks in (worker, inline):
                    if end is None:
                        hooks.verify_end(accepted, np.int64(k) if i % 300 == 5 else k)
                    else:
                        getattr(hooks, end)()
            for hooks in (worker, inline):
                hooks.end_step()
        assert len(worker._pending.handed) == 1500
    assert _samples(w_reg) == _samples(i_reg)
    worker.flush()
    inline.flush()
    assert worker.collector.drops.counts == inline.collector.drops.counts
    assert worker.collector.drops.counts["accepted_exceeds_drafted"] == bad > 16
    assert _span_shapes(w_exp) == _span_shapes(i_exp)
    reasons = {s.attributes["spec_decode.sample_reason"] for s in w_exp.get_finished_spans()
               if s.name == "spec_decode.step"}
    assert reasons >= {"slow", "ratio"}
