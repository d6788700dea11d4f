"""Regressions of issue 12's smaller defects: a retried `with` stage, the drop counter's
lock on internal errors, an error inside a stage end, overlapping ASGI scrapes, and a wall
clock that moves while the server runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

import spec_metrics
from spec_metrics._core import hooks as hooks_module
from spec_metrics._tracing.sink import CLOCK_RECALIBRATE_S, TraceSink

from .conftest import run_step, sample_value, scrape

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _drops(registry, reason: str) -> float:
    return sample_value(scrape(registry), "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason=reason)


def test_a_stage_retried_after_the_engine_raised_stays_in_its_step(make_hooks, registry,
                                                                  exporter, clock):
    hooks = make_hooks(trace_ratio=0.0, outlier_quantile=None)
    hooks.begin_step(request_ids=["a", "b"], traceparents=[SAMPLED, None])
    with pytest.raises(RuntimeError):
        with hooks.draft():
            clock.advance(0.005)
            raise RuntimeError("the drafter ran out of memory")
    with hooks.draft():  # the engine retries the draft pass
        clock.advance(0.002)
    with hooks.verify() as verify:
        clock.advance(0.010)
        verify.set_accepted([1, 2], 2)
    hooks.end_step()
    assert _drops(registry, "out_of_order") == 0
    families = scrape(registry)
    assert sample_value(families, "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count", method="eagle") == 1
    assert sample_value(families, "spec_decode_stage_duration_seconds",
                        "spec_decode_stage_duration_seconds_sum", method="eagle",
                        stage="draft") == pytest.approx(0.002)
    (step,) = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert step.attributes["spec_decode.sample_reason"] == "request"  # begin_step's context
    assert list(step.attributes["spec_decode.request_ids"]) == ["a", "b"]
    assert len(step.links) == 1


class _LockCheckedCounts(dict):
    """A drop-count dict that fails any write made without the counter's lock held."""

    def __init__(self, counts: dict, lock: threading.Lock) -> None:
        super().__init__(counts)
        self._lock = lock

    def __setitem__(self, key, value):  # type: ignore[no-untyped-def]
        assert self._lock.locked(), f"{key} counted without the drop counter's lock"
        super().__setitem__(key, value)


class _Unreadable:
    """A request-id list whose length works and whose items cannot be read."""

    def __len__(self) -> int:
        return 2

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("unreadable")


def test_internal_errors_are_counted_under_the_lock(make_hooks, registry):
    hooks = make_hooks()
    drops = hooks.collector.drops
    drops.counts = _LockCheckedCounts(drops.counts, drops._lock)
    hooks.begin_step(request_ids=_Unreadable())
    assert drops.counts["internal_error"] == 1


class _FailingEvents:
    """A CUDA event timer whose second mark fails (e.g. the context is gone)."""

    def __init__(self) -> None:
        self.marks = 0

    def mark(self) -> object:
        self.marks += 1
        if self.marks == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _Done()

    def release(self, events: list) -> None:
        return None


class _Done:
    def query(self) -> bool:
        return True


def test_an_error_while_ending_a_stage_never_escapes_the_hook(make_hooks, registry, clock):
    hooks = make_hooks()
    hooks._gpu = _FailingEvents()  # as with timer="cuda"
    hooks.__class__ = hooks_module._CudaTimedHooks
    hooks.draft_start()
    hooks.draft_end()  # its event fails: counted, the stage forgotten, no exception
    assert hooks.collector.drops.counts["internal_error"] == 1
    hooks._gpu = None
    hooks.draft_start()  # the stage may be timed again in the same step
    clock.advance(0.003)
    hooks.draft_end()
    hooks.end_step()
    assert _drops(registry, "out_of_order") == 0
    assert sample_value(scrape(registry), "spec_decode_stage_duration_seconds",
                        "spec_decode_stage_duration_seconds_sum", method="eagle",
                        stage="draft") == pytest.approx(0.003)


def test_overlapping_asgi_scrapes_mark_only_what_each_sent(make_hooks, registry, clock):
    # Two scrapes interleave on one event loop. The first finishes while the second is still
    # sending; the second then fails (the client went away). The second's exemplars were
    # never shown, so a lower-priority exemplar must not replace them.
    slow = make_hooks(trace_ratio=0.0, slow_step_seconds=0.2, outlier_quantile=None)
    ordinary = make_hooks("eagle", collector=slow.collector, trace_ratio=1.0,
                          outlier_quantile=None)
    app = spec_metrics.make_asgi_app(registry)
    accept = "application/openmetrics-text; version=1.0.0"

    async def scrape_with(gate: asyncio.Event, fail: bool) -> None:
        async def receive():  # type: ignore[no-untyped-def]
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.body":
                await gate.wait()
                if fail:
                    raise ConnectionResetError("client went away")

        scope = {"type": "http", "method": "GET", "path": "/metrics", "root_path": "",
                 "query_string": b"", "headers": [(b"accept", accept.encode())]}
        await app(scope, receive, send)

    async def scenario() -> None:
        first_go, second_go = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(scrape_with(first_go, fail=False))
        await asyncio.sleep(0)  # the first scrape rendered and waits in send
        run_step(slow, clock, [1], 2, durations=(0.001, 0.3, 0.001))  # a spike
        second = asyncio.ensure_future(scrape_with(second_go, fail=True))
        await asyncio.sleep(0)  # the second rendered the spike's exemplar, waits in send
        first_go.set()
        await first
        second_go.set()
        with pytest.raises(ConnectionResetError):
            await second

    asyncio.run(scenario())
    spike = _verify_exemplar(registry)
    run_step(ordinary, clock, [1], 2, durations=(0.001, 0.3, 0.001))  # same bucket, ratio
    assert _verify_exemplar(registry) == spike


def _verify_exemplar(registry) -> str:
    (sample,) = [s for s in scrape(registry)["spec_decode_stage_duration_seconds"].samples
                 if s.labels.get("stage") == "verify" and s.labels.get("le") == "0.5"]
    assert sample.exemplar is not None
    return sample.exemplar.labels["trace_id"]


def test_span_times_follow_a_wall_clock_that_moved(make_hooks, exporter, monkeypatch):
    # The wall clock is slewed (NTP) while perf_counter runs on: span and exemplar times
    # follow the wall clock within CLOCK_RECALIBRATE_S.
    perf = [10_000_000_000]
    wall = [1_700_000_000_000_000_000]
    monkeypatch.setattr(TraceSink, "perf_clock_ns", staticmethod(lambda: perf[0]))
    monkeypatch.setattr(TraceSink, "wall_clock_ns", staticmethod(lambda: wall[0]))
    monkeypatch.setattr("spec_metrics._core.hooks.perf_counter_ns", lambda: perf[0])
    hooks = make_hooks(trace_ratio=1.0, outlier_quantile=None)

    def step_start() -> int:
        hooks.verify_start()
        perf[0] += 1_000_000
        hooks.verify_end([1], 1)
        hooks.end_step()
        (span,) = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"][-1:]
        return span.start_time

    wall_at_start, perf_at_start = wall[0], perf[0]  # calibrated when the hooks were made
    assert step_start() == wall_at_start  # a step starting now starts at the wall time
    # 5 s later the wall clock was stepped back by 2 s; not re-measured yet, spans keep
    # the old offset ...
    perf[0] += 5_000_000_000
    wall[0] += 5_000_000_000 - 2_000_000_000
    begun = perf[0]
    assert step_start() == wall_at_start + (begun - perf_at_start)
    # ... and once CLOCK_RECALIBRATE_S have passed they follow the wall clock again (the
    # offset is measured when the step's spans are built, 1 ms after it began).
    perf[0] += int(CLOCK_RECALIBRATE_S * 1e9)
    wall[0] += int(CLOCK_RECALIBRATE_S * 1e9)
    begun, wall_then = perf[0], wall[0]
    assert step_start() == wall_then - 1_000_000
    assert wall_then - 1_000_000 != wall_at_start + (begun - perf_at_start)  # it moved
