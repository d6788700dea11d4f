"""A forked child starts from fresh state: no parent series, drops or exemplars, no lock the
parent's threads held, no span exported twice. Each child is waited for with a deadline and
killed past it, so a deadlock fails the test instead of hanging it."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import threading
import time
import traceback
import urllib.request
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import spec_metrics
from spec_metrics._core.record import StepRecord
from spec_metrics._prometheus.exposition import render, render_marking
from spec_metrics._support.forking import _INHERITED
from spec_metrics._tracing.processor import SpanExportProcessor
from spec_metrics._tracing.sink import TraceSink

from .conftest import run_step

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

CHILD_DEADLINE_S = float(os.environ.get("FORK_TEST_DEADLINE", "30"))


def run_in_child(body: Callable[[], dict]) -> dict:
    """Fork; the child runs `body` and sends its JSON result through a pipe, then leaves by
    os._exit (no pytest teardown there). The parent reads and reaps it within the deadline,
    or kills it and fails."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            try:
                result = {"ok": True, **body()}
            except BaseException:
                result = {"ok": False, "error": traceback.format_exc()}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_fd, data):]
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + CHILD_DEADLINE_S
    reaped = False
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail(f"the forked child sent nothing within {CHILD_DEADLINE_S} s "
                            "(deadlocked?)")
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        while not reaped:
            reaped = os.waitpid(pid, os.WNOHANG)[0] == pid
            if not reaped:
                if time.monotonic() > deadline:
                    pytest.fail("the forked child did not exit within the deadline")
                time.sleep(0.01)
    finally:
        os.close(read_fd)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    assert result.get("ok"), result.get("error", "the child sent no result")
    return result


def totals(text: str) -> dict[str, Any]:
    """Counter totals, per-stage histogram counts, drops and exemplar trace ids of one
    OpenMetrics exposition."""
    out: dict[str, Any] = {"drops": {}, "stage_counts": {}, "exemplar_traces": []}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                out["exemplar_traces"].append(sample.exemplar.labels["trace_id"])
            if sample.name in ("spec_decode_drafts_total", "spec_decode_draft_tokens_total",
                               "spec_decode_accepted_tokens_total"):
                out[sample.name] = sample.value
            elif sample.name == "spec_metrics_dropped_total":
                out["drops"][sample.labels["reason"]] = sample.value
            elif sample.name == "spec_decode_stage_duration_seconds_count":
                out["stage_counts"][sample.labels["stage"]] = sample.value
            elif sample.name == "spec_decode_step_duration_seconds_count":
                out["step_count"] = sample.value
    return out


class NeverLands:
    """A device copy still in flight (what a CUDA DeviceArray is until its event completes):
    the step holding it waits in the pending queue."""

    def ready(self) -> bool:
        return False

    def discard(self) -> None:
        pass


class LockHolder:
    """A thread holding locks, as a scrape thread does mid-snapshot at the instant of fork."""

    def __init__(self, *locks: Any) -> None:
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(locks,), daemon=True)

    def _run(self, locks: Sequence[Any]) -> None:
        for lock in locks:
            lock.acquire()
        self._held.set()
        self._release.wait(60)
        for lock in reversed(locks):
            lock.release()

    def __enter__(self) -> "LockHolder":
        self._thread.start()
        assert self._held.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release.set()
        self._thread.join(10)


def test_child_starts_fresh_even_when_parent_threads_hold_the_locks(
        registry, provider, exporter, make_hooks):
    hooks = make_hooks(trace_ratio=1.0)
    collector = hooks.collector
    for _ in range(3):
        run_step(hooks, None, np.array([4, 4]), 4)
    hooks.verify_start()
    hooks.verify_end("not counts", 4)  # one wrong_type drop in the parent
    hooks.end_step()
    parent_before = totals(openmetrics_latest(registry).decode())
    assert parent_before["exemplar_traces"]  # the parent has exemplars the child must not see

    with LockHolder(collector._lock, collector.drops._lock):
        run_step(hooks, None, np.array([1]), 4)  # lock held: this step is deferred
        assert len(collector._deferred) == 1
        waiting = StepRecord(99, "eagle")
        waiting.accepted, waiting.draft_tokens = NeverLands(), 4
        hooks._pending.add(waiting)  # a step waiting for device results
        hooks.begin_step()
        hooks.draft_start()  # a stage open at the instant of fork

        def child() -> dict:
            known = {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()}
            queued = [len(collector._deferred), len(hooks._pending)]
            run_step(hooks, None, np.array([1, 2]), 3)
            run_step(hooks, None, [3, 0, 1], 3)
            hooks.end_step()  # one end_without_start drop: the drop counter's lock works
            om_bytes, shown = render_marking(registry, openmetrics_latest)
            om = om_bytes.decode()
            for exemplars in shown:  # what the /metrics app does after an OpenMetrics reply
                exemplars.mark()
            mine = [format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()]
            kept = any(isinstance(held, deque) and waiting in held for held in _INHERITED)
            return {"totals": totals(om), "own_traces": sorted(set(mine) - known),
                    "queued_at_start": queued, "waiting_kept": kept}

        result = run_in_child(child)

    assert result["queued_at_start"] == [0, 0]  # no parent step deferred or pending
    assert result["waiting_kept"]  # set aside, never freed in the child (CUDA would abort)
    got = result["totals"]
    assert got["spec_decode_drafts_total"] == 5.0
    assert got["spec_decode_draft_tokens_total"] == 15.0
    assert got["spec_decode_accepted_tokens_total"] == 7.0
    assert got["stage_counts"] == {"draft": 2.0, "verify": 2.0, "draft_extend": 2.0}
    assert got["step_count"] == 2.0
    assert {k: v for k, v in got["drops"].items() if v} == {"end_without_start": 1.0}
    assert len(result["own_traces"]) == 2  # both child steps traced (ratio 1)
    assert got["exemplar_traces"] and set(got["exemplar_traces"]) <= set(result["own_traces"])
    assert not set(got["exemplar_traces"]) & set(parent_before["exemplar_traces"])

    # The parent is untouched: its deferred step is applied by the next lock holder.
    parent = totals(openmetrics_latest(registry).decode())
    assert parent["spec_decode_drafts_total"] == 7.0
    assert parent["spec_decode_accepted_tokens_total"] == 25.0
    assert {k: v for k, v in parent["drops"].items() if v} == {"wrong_type": 1.0}
    assert len(hooks._pending) == 1


def test_child_reseeds_trace_sampling_and_restarts_rate_and_outliers(make_hooks, monkeypatch):
    # The token bucket's clock stands still: the parent's bucket is drawn down and never
    # refilled however slowly the steps run, so only the child's reset can fill it again.
    monkeypatch.setattr(TraceSink, "monotonic", staticmethod(lambda: 1000.0))
    hooks = make_hooks(trace_ratio=1.0, max_traced_steps_per_second=5.0,
                       outlier_min_samples=10)
    sink = hooks._tracer
    for _ in range(20):
        run_step(hooks, None, [1], 2)
    assert sink._tokens < 5.0 and sink.rate_limited >= 20 - 5  # no refill: <= 5 traced
    assert sink._running[0]._total == 20

    def child() -> dict:
        return {"draws": [sink._random.random() for _ in range(8)], "tokens": sink._tokens,
                "rate_limited": sink.rate_limited,
                "observed": [q._total for q in sink._running]}

    result = run_in_child(child)
    parent_draws = [sink._random.random() for _ in range(8)]
    assert result["draws"] != parent_draws  # else parent and child trace the same steps
    assert result["tokens"] == 5.0 and result["rate_limited"] == 0
    assert result["observed"] == [0, 0, 0, 0]


class PidFileExporter(SpanExporter):
    """Appends `pid trace_id span_id name` per exported span, one write per batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        pid = os.getpid()
        lines = "".join(f"{pid} {s.context.trace_id:032x} {s.context.span_id:016x} {s.name}\n"
                        for s in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("processor", [BatchSpanProcessor, SpanExportProcessor])
def test_spans_queued_at_fork_are_exported_once_by_the_parent_only(tmp_path, registry,
                                                                   processor):
    path = str(tmp_path / "spans.txt")
    provider = TracerProvider(shutdown_on_exit=False)
    # A long delay: the parent's spans are still queued in the processor at fork time.
    options = {"registry": None} if processor is SpanExportProcessor else {}
    provider.add_span_processor(processor(PidFileExporter(path), schedule_delay_millis=600_000,
                                          **options))
    traced: list[str] = []
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         trace_ratio=1.0, max_draft_tokens=4,
                                         on_step=lambda r: traced.append(r.trace_id))
    try:
        for _ in range(3):
            run_step(hooks, None, [2, 1], 4)
        assert not os.path.exists(path)  # nothing exported yet

        def child() -> dict:
            before = len(traced)
            for _ in range(2):
                run_step(hooks, None, [1], 4)
            hooks.flush()
            return {"traces": traced[before:]}

        result = run_in_child(child)
        hooks.flush()
    finally:
        provider.shutdown()
    rows = [line.split() for line in open(path).read().splitlines()]
    span_ids = [row[2] for row in rows]
    assert len(span_ids) == len(set(span_ids)) == 4 * 5  # 5 steps, 4 spans each, each once
    by_pid: dict[int, set[str]] = {}
    for pid, trace_id, _span_id, _name in rows:
        by_pid.setdefault(int(pid), set()).add(trace_id)
    child_pids = set(by_pid) - {os.getpid()}
    assert len(child_pids) == 1
    assert by_pid[os.getpid()] == set(traced) and len(traced) == 3
    assert by_pid[child_pids.pop()] == set(result["traces"]) and len(result["traces"]) == 2


def test_child_serves_its_own_metrics_and_cannot_take_the_parents_port(registry, make_hooks):
    hooks = make_hooks()
    run_step(hooks, None, [3, 3, 3], 4)
    server = spec_metrics.start_http_server(port=0, registry=registry)
    try:
        def child() -> dict:
            try:
                spec_metrics.start_http_server(port=server.port, registry=registry)
                clash = None
            except OSError as exc:
                clash = exc.errno
            server.close()  # a no-op here: nothing serves in the child (else it would hang)
            run_step(hooks, None, [1], 4)
            own = spec_metrics.start_http_server(port=0, registry=registry)
            try:
                with urllib.request.urlopen(own.url,
                                            timeout=10) as response:
                    body = response.read().decode()
            finally:
                own.close()
            return {"clash": clash, "body": body}

        result = run_in_child(child)
        with urllib.request.urlopen(server.url, timeout=10) as response:
            parent_body = response.read().decode()
    finally:
        server.close()
    assert result["clash"] == errno.EADDRINUSE
    child_line = 'spec_decode_accepted_tokens_total{method="eagle"} 1.0'
    parent_line = 'spec_decode_accepted_tokens_total{method="eagle"} 9.0'
    assert child_line in result["body"] and parent_line not in result["body"]
    assert parent_line in parent_body


def test_a_live_child_does_not_keep_the_parents_port_after_the_parent_closes(registry):
    server = spec_metrics.start_http_server(port=0, registry=registry)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stays alive, holding whatever it inherited, until told to leave
        try:
            os.close(write_fd)
            select.select([read_fd], [], [], CHILD_DEADLINE_S)
        finally:
            os._exit(0)
    os.close(read_fd)
    try:
        server.close()
        # Had the child kept the listening socket, the kernel would still accept (and
        # nobody would answer): the scrape would hang instead of being refused.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    finally:
        os.write(write_fd, b"x")
        os.close(write_fd)
        deadline = time.monotonic() + CHILD_DEADLINE_S
        while os.waitpid(pid, os.WNOHANG)[0] != pid:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)


def test_child_of_a_cuda_engine_survives_the_reset(registry, make_hooks):
    """Freeing the parent's pinned buffers or CUDA events in a forked child aborts it
    (SIGABRT): the reset must set them aside. Runs where torch sees a GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    hooks = make_hooks(timer="cuda")
    hooks.warm_up_device(8)
    for _ in range(3):
        run_step(hooks, None, torch.tensor([1, 2], device="cuda"), 4)
    torch.cuda.synchronize()

    def child() -> dict:
        # CPU counts and CPU timer through a twin sharing the collector: no CUDA call here.
        twin = spec_metrics.SpecDecodeHooks("eagle", collector=hooks.collector,
                                            max_draft_tokens=4)
        run_step(twin, None, [3], 4)
        return totals(render(registry, openmetrics_latest).decode())

    got = run_in_child(child)  # an abort during the reset leaves no result: the test fails
    assert got["spec_decode_accepted_tokens_total"] == 3.0
    assert got["spec_decode_drafts_total"] == 1.0
