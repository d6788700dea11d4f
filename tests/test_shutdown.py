"""Shutdown: the last steps' spans reach a real OTLP/HTTP receiver (oteltap) when a process
exits normally, and exiting with the span endpoint down takes a bounded time."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import pytest
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from spec_metrics.ops.telemetry import BoundedShutdownTracerProvider

from .otlp import OtlpReceiver

pytestmark = pytest.mark.worker  # the children use the default consumer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
SPANS_PER_STEP = 4  # spec_decode.step + draft, verify, draft_extend

# Run in a subprocess (cwd: the repository root). argv: endpoint, mode. Records STEPS traced
# steps, prints their trace ids, then leaves by the end of the script (atexit runs).
CHILD = """
import atexit, json, sys
import spec_metrics
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from spec_metrics.ops.telemetry import make_tracer_provider

endpoint, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "sdk-close":
    provider = TracerProvider()
    # 10 min delay: without a flush at exit, no span would leave this process
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint + "/v1/traces"), schedule_delay_millis=600_000))
else:
    provider = make_tracer_provider("shutdown-test", otlp_endpoint=endpoint,
                                    shutdown_timeout=float(sys.argv[4]))
traced = []
hooks = spec_metrics.SpecDecodeHooks("eagle", registry=None, tracer_provider=provider,
                                     trace_ratio=1.0, on_step=lambda r: traced.append(r.trace_id))
for _ in range(steps):
    hooks.begin_step(batch_size=2)
    hooks.draft_start(); hooks.draft_end()
    hooks.verify_start(); hooks.verify_end([1, 2], 3)
    hooks.draft_extend_start(); hooks.draft_extend_end()
    hooks.end_step()
if mode == "sdk-close":
    hooks.close()
    print(json.dumps(traced), flush=True)
else:
    # The worker may not have consumed the last steps yet: they are consumed at exit,
    # before the atexit handlers (this one, then the provider's shutdown).
    atexit.register(lambda: print(json.dumps(traced), flush=True))
"""


def run_child(endpoint: str, mode: str, steps: int = STEPS,
              shutdown_timeout: float = 5.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, endpoint, mode, str(steps), str(shutdown_timeout)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture
def receiver():
    pytest.importorskip("oteltap")
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    tap = OtlpReceiver()
    try:
        yield tap
    finally:
        tap.close()


@pytest.mark.parametrize("mode", ["sdk-close", "bounded-atexit"])
def test_spans_of_the_last_steps_reach_the_receiver_on_normal_exit(receiver, mode):
    """sdk-close: a plain SDK provider, hooks.close() before exit. bounded-atexit: the
    provider of make_tracer_provider, nothing called: its shutdown at exit flushes."""
    done = run_child(receiver.endpoint, mode)
    assert done.returncode == 0, done.stderr
    traced = json.loads(done.stdout)
    assert len(traced) == STEPS and None not in traced
    spans = receiver.wait_for(STEPS * SPANS_PER_STEP)
    assert len(spans) == STEPS * SPANS_PER_STEP
    assert {span.trace_id.hex() for span in spans} == set(traced)
    names = sorted(span.name for span in spans)
    assert names == sorted(["spec_decode.step", "spec_decode.draft", "spec_decode.verify",
                            "spec_decode.draft_extend"] * STEPS)
    steps = [span for span in spans if span.name == "spec_decode.step"]
    attributes = [{kv.key: kv.value for kv in span.attributes} for span in steps]
    assert sorted(a["spec_decode.step"].int_value for a in attributes) == list(range(STEPS))
    assert {a["spec_decode.accepted_tokens"].int_value for a in attributes} == {3}


def test_exit_with_the_span_endpoint_down_is_bounded():
    """An OTLP/HTTP endpoint that refuses connections: the SDK alone retries for ~7 s per
    batch at exit (up to 30 s); the bounded provider gives up after shutdown_timeout."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        done = run_child(endpoint, "bounded-atexit", steps=200, shutdown_timeout=1.0)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 200
    assert "spec_metrics: spans not exported within 1s at tracer provider shutdown" in (
        done.stderr)


class StuckExporter(SpanExporter):
    """Export waits until shutdown() — as the OTLP exporter's retry backoff does."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.exported: list[str] = []
        self.shutdowns = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        if self.stop.wait(60):
            return SpanExportResult.FAILURE
        self.exported.extend(s.name for s in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.stop.set()


def test_bounded_provider_gives_up_flush_and_shutdown_at_their_deadlines(caplog):
    exporter = StuckExporter()
    provider = BoundedShutdownTracerProvider(shutdown_timeout=0.2, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000))
    provider.get_tracer("t").start_span("one").end()
    assert provider.force_flush(timeout_millis=100) is False  # the export is stuck
    assert exporter.shutdowns == 0  # a flush past its deadline abandons nothing
    with caplog.at_level(logging.WARNING, logger="spec_metrics"):
        provider.shutdown()
    assert exporter.shutdowns >= 1 and exporter.exported == []
    assert "spans not exported within 0.2s" in caplog.text


def test_bounded_provider_flushes_normally_within_the_deadline():
    names: list[str] = []
    provider = BoundedShutdownTracerProvider(shutdown_timeout=10, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_Recorder(names),
                                                   schedule_delay_millis=600_000))
    provider.get_tracer("t").start_span("one").end()
    assert provider.force_flush(timeout_millis=10_000) is True
    assert names == ["one"]
    provider.get_tracer("t").start_span("two").end()
    provider.shutdown()
    assert names == ["one", "two"]
    with pytest.raises(ValueError, match="shutdown_timeout must be > 0"):
        BoundedShutdownTracerProvider(shutdown_timeout=0)


class _Recorder(SpanExporter):
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.names.extend(s.name for s in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass
