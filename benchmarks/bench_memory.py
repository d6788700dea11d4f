"""Memory benchmark: RSS over many hook steps with tracing on and the trace collector down.

    python benchmarks/bench_memory.py [--steps 1000000] [--every 50000] [--json out.json]

One engine loop runs `--steps` steps (batch 256, K 4, numpy accepted) through
SpecDecodeHooks with the defaults: metrics on, tracing at trace_ratio 0.01 plus running-
quantile outliers, max_traced_steps_per_second 100. Spans go through the SDK's
spec_metrics.SpanExportProcessor (queue 2048) to the OTLP/HTTP exporter pointed at a loopback port
nobody listens on (a port bound, then closed), so every export fails for the whole run;
with `--collector up` an OTLP receiver (oteltap, in its own process) listens there instead.
Every `--every` steps the loop samples RSS (/proc/self/statm), the thread count and the open
file descriptors, and renders /metrics in OpenMetrics (then marks the exemplars shown, as
spec_metrics' server does), like a scraper would.

Reported: RSS at start, after warm-up (the first `--warmup` steps), at the end and the
maximum; the delta after warm-up and the largest rise over the warm-up sample (target:
flat: below 1 MB at every sample); threads and fds at start and end.
The exporter's timeout is `--export-timeout` seconds, so its retries and the final
shutdown are bounded.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from prometheus_client import CollectorRegistry

from spec_metrics import SpecDecodeHooks
from spec_metrics._prometheus.exposition import metrics_response
from spec_metrics._tracing.processor import SpanExportProcessor

OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hooks import report  # noqa: E402

TARGET_DELTA_MB = 1.0
BATCH, K, POOL = 256, 4, 64
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def os_threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def closed_port() -> int:
    """A loopback port that was free a moment ago and that nobody listens on now."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class CountingExporter(OTLPSpanExporter):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = self.failed = self.spans = 0
        self.seconds = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        t0 = time.perf_counter()
        result = super().export(spans)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.spans += len(spans)
        if result is not SpanExportResult.SUCCESS:
            self.failed += 1
        return result


def sample(step: int, started: float) -> dict[str, Any]:
    return {"step": step, "seconds": round(time.perf_counter() - started, 2),
            "rss_mb": rss_bytes() / 2**20, "threads": threading.active_count(),
            "os_threads": os_threads(), "fds": open_fds()}


def run(steps: int, every: int, warmup: int, export_timeout: float,
        collector: str = "down") -> dict[str, Any]:
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    receiver = None
    if collector == "up":  # oteltap in its own process, as a real collector would be
        from bench_collector_faults import Receiver

        receiver = Receiver(port)
    exporter = CountingExporter(endpoint=endpoint, timeout=export_timeout)
    processor = SpanExportProcessor(exporter, registry=None)  # what spec_metrics ships
    provider = TracerProvider()
    provider.add_span_processor(processor)
    registry = CollectorRegistry()
    hooks = SpecDecodeHooks("eagle", labels={"model": "bench", "engine": "bench"},
                            registry=registry, tracer_provider=provider)
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, K + 1, size=BATCH, dtype=np.int64) for _ in range(POOL)]

    gc.collect()
    started = time.perf_counter()
    samples = [sample(0, started)]
    scrape_bytes = 0
    for i in range(1, steps + 1):
        hooks.draft_start()
        hooks.draft_end()
        hooks.verify_start()
        hooks.verify_end(pool[i % POOL], K)
        hooks.draft_extend_start()
        hooks.draft_extend_end()
        hooks.end_step()
        if i % every == 0 or i == steps:
            # A scrape, as Prometheus would, marking its exemplars shown as /metrics does.
            response = metrics_response(registry, "GET", OPENMETRICS_ACCEPT, None, "")
            response.sent()
            body = response.body
            scrape_bytes = len(body)
            samples.append(sample(i, started))
    loop_s = time.perf_counter() - started

    t0 = time.perf_counter()
    hooks.close()  # flushes the provider: one more export attempt, bounded by the timeout
    provider.shutdown()
    if receiver is not None:
        receiver.close()
    shutdown_s = time.perf_counter() - t0
    after_shutdown = sample(steps, started)

    rss = [s["rss_mb"] for s in samples]
    base = next((s for s in samples if s["step"] >= warmup), samples[-1])
    return {
        "collector": collector,
        "steps": steps, "every": every, "warmup_steps": warmup, "endpoint": endpoint,
        "export_timeout_s": export_timeout, "loop_s": loop_s, "steps_per_s": steps / loop_s,
        "shutdown_s": shutdown_s, "scrape_bytes": scrape_bytes,
        "rss_start_mb": rss[0], "rss_after_warmup_mb": base["rss_mb"],
        "rss_end_mb": rss[-1], "rss_max_mb": max(rss),
        "delta_after_warmup_mb": rss[-1] - base["rss_mb"],
        "max_over_warmup_mb": max(s["rss_mb"] for s in samples if s["step"] >= base["step"])
        - base["rss_mb"],
        "spans_ended": sum(processor.counts.values()) + processor.queue_length,
        "export_calls": exporter.calls,
        "export_failed": exporter.failed, "spans_sent_to_exporter": exporter.spans,
        "export_seconds": exporter.seconds,
        "spans_dropped_queue_full": processor.counts["dropped_queue_full"],
        # Steps the hooks dropped (pending_overflow: the worker did not keep up), if any.
        "steps_dropped": {k: v for k, v in hooks.collector.drops.counts.items() if v},
        "start": samples[0], "end": samples[-1], "after_shutdown": after_shutdown,
        "samples": samples,
    }


def markdown(r: dict[str, Any]) -> str:
    s, e = r["start"], r["end"]
    verdict = "PASS" if r["pass"] else "MISS"
    lines = [
        f"{r['steps']:,} steps, batch {BATCH}, K {K}, metrics + tracing (ratio 0.01 + outliers, "
        f"≤ 100 traced steps/s), SpanExportProcessor → OTLP/HTTP to {r['endpoint']} "
        f"({'an OTLP receiver' if r.get('collector') == 'up' else 'nobody'} listening), "
        f"export timeout {r['export_timeout_s']:g} s; an OpenMetrics scrape every "
        f"{r['every']:,} steps. Loop {r['loop_s']:.1f} s ({r['steps_per_s']:,.0f} steps/s), "
        f"shutdown {r['shutdown_s']:.1f} s.",
        "",
        "| step | s | RSS MB | threads (Python / OS) | open fds |",
        "|---:|---:|---:|---|---:|",
    ]
    for x in r["samples"]:
        lines.append(f"| {x['step']:,} | {x['seconds']:.1f} | {x['rss_mb']:.2f} | "
                     f"{x['threads']} / {x['os_threads']} | {x['fds']} |")
    lines += [
        "",
        "| RSS start | after warm-up | end | max | delta after warm-up | max over warm-up |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r['rss_start_mb']:.2f} MB | {r['rss_after_warmup_mb']:.2f} MB "
        f"({r['warmup_steps']:,} steps) | {r['rss_end_mb']:.2f} MB | {r['rss_max_mb']:.2f} MB | "
        f"{r['delta_after_warmup_mb']:+.2f} MB | {r['max_over_warmup_mb']:+.2f} MB |",
        "",
        f"Threads (Python / OS): {s['threads']} / {s['os_threads']} at start, "
        f"{e['threads']} / {e['os_threads']} at end; open fds: {s['fds']} at start, "
        f"{e['fds']} at end ({r['after_shutdown']['fds']} after shutdown).",
        f"Spans ended {r['spans_ended']:,}; handed to the exporter {r['spans_sent_to_exporter']:,} "
        f"in {r['export_calls']} export calls, {r['export_failed']} failed "
        f"({r['export_seconds']:.1f} s inside export); dropped at the full queue "
        f"{r['spans_dropped_queue_full']:,}; input or steps dropped by the hooks: "
        f"{r['steps_dropped'] or 'none'}.",
        "",
        f"Target: RSS flat after warm-up, every sample < {TARGET_DELTA_MB:g} MB above the "
        f"warm-up sample: **{verdict}**",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=50_000, help="sample RSS every N steps")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps before the baseline sample (default: 10%% of --steps, "
                             "rounded to --every)")
    parser.add_argument("--collector", choices=("down", "up"), default="down",
                        help="down: nobody listens on the OTLP port; up: an oteltap receiver")
    parser.add_argument("--export-timeout", type=float, default=1.0,
                        help="OTLP exporter timeout in seconds (bounds retries and shutdown)")
    parser.add_argument("--json", help="write the results and machine info here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.export_timeout <= 0:
        parser.error("need --steps >= 1, --every >= 1, --export-timeout > 0")
    warmup = args.warmup
    if warmup is None:
        warmup = max(args.every, (args.steps // 10) // args.every * args.every)

    # The exporter logs every failed export and the SDK every dropped span; we count them.
    for name in ("opentelemetry.exporter.otlp.proto.http",
                 "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                 "opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    result = run(args.steps, args.every, warmup, args.export_timeout, args.collector)
    result["pass"] = result["max_over_warmup_mb"] < TARGET_DELTA_MB
    report(result, markdown(result), "bench_memory.py", argv, started, load_before, args.json)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
