"""Collector faults: the hook path's cost while the OTLP collector is up, down, stuck, back.

    python benchmarks/bench_collector_faults.py [--seconds 5] [--json out.json]

One engine loop (batch 256, K 4, numpy accepted; metrics + tracing at the defaults:
trace_ratio 0.01, outliers, <= 100 traced steps/s) exports through spec_metrics'
SpanExportProcessor (queue 2048, batch 512, 1 s delay) and the real OTLP/HTTP exporter
(timeout 2 s) to one loopback port. Phases of `--seconds` each, in order:
`up` (oteltap, a real OTLP/HTTP receiver, listens in another process), `down` (nothing
listens: connection refused), `stuck` (a socket accepts and never answers: every export
waits out its timeout), `back` (oteltap again). Per phase: each step's 7 hook calls timed as a whole
(median, p99, max), steps/s, the span queue's largest length, spans exported and lost
(by reason) during the phase, RSS at its end, threads and fds. Stops by itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_hooks import report  # noqa: E402
from bench_memory import open_fds, rss_bytes  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from spec_metrics import SpecDecodeHooks  # noqa: E402
from spec_metrics._tracing.processor import SpanExportProcessor  # noqa: E402
from tests.otlp import free_port  # noqa: E402
from tests.test_collector_faults import HangingCollector  # noqa: E402

BATCH, K = 256, 4
_RECEIVER = """
import asyncio, sys
from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings
async def main():
    settings = OtelTapHttpProtobufReceiverSettings(http_port=int(sys.argv[1]))
    async with OtelTapHttpProtobufReceiver(settings) as receiver:
        async for _ in receiver.stream_traces():
            pass
asyncio.run(main())
"""


class Receiver:
    """oteltap in its own process, as a real collector would be: its work (and its GIL) is
    not the engine's."""

    def __init__(self, port: int) -> None:
        self._process = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(port)])
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.close()
                    raise RuntimeError("the OTLP receiver did not start") from None
                time.sleep(0.1)

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


def phase(name: str, seconds: float, hooks: SpecDecodeHooks, processor: SpanExportProcessor,
          pool: list[np.ndarray]) -> dict[str, Any]:
    before = processor.counts
    withheld_before = hooks.collector.withheld.counts["span_lost"]
    times: list[int] = []
    queue_max = 0
    deadline = time.perf_counter() + seconds
    i = 0
    pc = time.perf_counter_ns
    while True:
        t0 = pc()
        hooks.draft_start()
        hooks.draft_end()
        hooks.verify_start()
        hooks.verify_end(pool[i % len(pool)], K)
        hooks.draft_extend_start()
        hooks.draft_extend_end()
        hooks.end_step()
        times.append(pc() - t0)
        i += 1
        if i % 64 == 0:
            queue_max = max(queue_max, processor.queue_length)
            if time.perf_counter() >= deadline:
                break
    after = processor.counts
    us = np.asarray(times, dtype=np.float64) / 1e3
    return {"phase": name, "steps": i, "steps_per_s": i / seconds,
            "median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "queue_max": queue_max,
            "exported": after["exported"] - before["exported"],
            **{k: after[k] - before[k] for k in after if k.startswith("dropped_")},
            # Traced steps whose exemplars never reached /metrics (their spans were lost);
            # counted once the fate is known, so a phase may count its predecessor's.
            "exemplars_withheld": hooks.collector.withheld.counts["span_lost"] - withheld_before,
            "rss_mb": rss_bytes() / 2**20, "threads": threading.active_count(),
            "fds": open_fds()}


def run(seconds: float) -> dict[str, Any]:
    port = free_port()
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=2)
    processor = SpanExportProcessor(exporter, registry=None)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    hooks = SpecDecodeHooks("eagle", registry=CollectorRegistry(), tracer_provider=provider)
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, K + 1, BATCH) for _ in range(64)]
    rows = []
    receiver = Receiver(port)
    try:
        rows.append(phase("up", seconds, hooks, processor, pool))
    finally:
        receiver.close()
    rows.append(phase("down", seconds, hooks, processor, pool))
    hanging = HangingCollector(port).hang()
    try:
        rows.append(phase("stuck", seconds, hooks, processor, pool))
    finally:
        hanging.close()
    receiver = Receiver(port)
    try:
        rows.append(phase("back", seconds, hooks, processor, pool))
        processor.force_flush(10_000)
        rows[-1]["exported_after_flush"] = processor.counts["exported"]
    finally:
        receiver.close()
    provider.shutdown()
    return {"seconds_per_phase": seconds, "batch": BATCH, "k": K, "rows": rows,
            "final_counts": processor.counts}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Batch {BATCH}, K {K}, metrics + tracing at the defaults, SpanExportProcessor "
        f"(queue 2048) → OTLP/HTTP (timeout 2 s) on loopback; {result['seconds_per_phase']:g} s "
        "per phase; per-step hook time in µs.",
        "",
        "| phase | steps/s | median | p99 | max | queue max | exported | lost: queue full | "
        "lost: export failed | exemplars withheld (steps) | RSS MB | threads | fds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['phase']} | {r['steps_per_s']:,.0f} | {r['median_us']:.1f} | "
            f"{r['p99_us']:.1f} | {r['max_us']:,.0f} | {r['queue_max']} | {r['exported']} | "
            f"{r['dropped_queue_full']} | {r['dropped_export_failed']} | "
            f"{r['exemplars_withheld']} | {r['rss_mb']:.1f} | "
            f"{r['threads']} | {r['fds']} |")
    lines += ["", f"Counts at the end (after a flush in `back`): {result['final_counts']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    result = run(args.seconds)
    report(result, markdown(result), "bench_collector_faults.py", argv, started, load_before,
           args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
