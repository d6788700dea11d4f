"""Scrape benchmark: time to render /metrics for a SpecDecodeCollector, and how long the
engine's hooks wait while scrapes render concurrently.

    python benchmarks/bench_scrape.py [--renders 400] [--seconds 4] [--scrapers 2,4]
                                       [--json out.json]

1. Render: a registry holding only one SpecDecodeCollector with 1, 8 and 64 label sets
   (distinct `method` values sharing the collector), each with steps recorded at
   trace_ratio=1.0 through a real SDK TracerProvider (no-op exporter), so every bucket that
   was hit carries an exemplar. Timed: what spec_metrics' /metrics serves
   (`spec_metrics._prometheus.exposition.render`, OpenMetrics and classic: the collector's
   cached-prefix writer), and for comparison `collect()` alone and prometheus_client's own
   OpenMetrics and classic `generate_latest` on the same registry (the same bytes, checked);
   median and p99 over `--renders` renders, interleaved across writers.
2. Concurrent: one thread runs hook steps at full rate (batch 256, K 4, numpy accepted,
   default tracing: ratio 0.01 + outliers) while N threads answer /metrics requests in a
   tight loop (`metrics_response` with Prometheus' Accept header, then
   `.sent()` as spec_metrics' server does, then the classic format).
   Phases of `--seconds` each: no scrapers, then N scrapers for each N in `--scrapers`,
   each with the collector's lock plain and with a timing wrapper (acquire-wait and hold
   per acquisition). Reported: each `end_step()` call (it hands the step to the collector),
   each whole step (7 hook calls), lock wait of the hook thread, lock hold inside scrapes,
   and how many steps found the lock held and were queued instead of waiting.

Everything is in-process; the run is bounded by --renders and --seconds and stops by itself.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
import time
from time import perf_counter_ns
from typing import Any, Sequence

import numpy as np
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics

from spec_metrics import SpecDecodeHooks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hooks import report  # noqa: E402

from spec_metrics._prometheus.exposition import metrics_response, render

# What Prometheus 2.42 sends when it scrapes.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")

TARGET_RENDER_MS = 5.0  # issue 5: /metrics render for 8 label sets
BATCH, K, POOL = 256, 4, 64


# ---- plumbing --------------------------------------------------------------------------


class NullExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def null_provider() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))
    return provider


def accepted_pool(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, K + 1, size=BATCH, dtype=np.int64) for _ in range(POOL)]


def run_step(hooks: SpecDecodeHooks, accepted: np.ndarray) -> None:
    hooks.draft_start()
    hooks.draft_end()
    hooks.verify_start()
    hooks.verify_end(accepted, K)
    hooks.draft_extend_start()
    hooks.draft_extend_end()
    hooks.end_step()


class TimedLock:
    """Stands in for the collector's threading.Lock: records, per acquisition, the
    acquiring thread, how long it waited for the lock and how long it held it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = 0
        self._wait = 0
        self.records: list[tuple[int, int, int]] = []  # (thread ident, wait ns, hold ns)
        self.refused: list[int] = []  # thread idents of non-blocking tries that failed

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        t0 = perf_counter_ns()
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self._since = t1 = perf_counter_ns()
            self._wait = t1 - t0
        else:
            self.refused.append(threading.get_ident())
        return ok

    def release(self) -> None:
        hold = perf_counter_ns() - self._since
        self.records.append((threading.get_ident(), self._wait, hold))
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def locked(self) -> bool:
        return self._lock.locked()


def install_timed_lock(collector: Any) -> TimedLock:
    lock = TimedLock()
    collector._lock = lock
    # Marking exemplars shown takes the same lock (ShownExemplars reads it at render).
    return lock


def stats_us(ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    if a.size == 0:
        return {"n": 0, "median": float("nan"), "p99": float("nan"), "p999": float("nan"),
                "max": float("nan")}
    return {"n": int(a.size), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "p999": float(np.percentile(a, 99.9)), "max": float(a.max())}


# ---- 1. render time ----------------------------------------------------------------------


def build(label_sets: int, steps_per_set: int, provider: TracerProvider,
          trace_ratio: float = 1.0) -> tuple[CollectorRegistry, list[SpecDecodeHooks]]:
    registry = CollectorRegistry()
    common = dict(trace_ratio=trace_ratio, tracer_provider=provider,
                  max_traced_steps_per_second=1e9)
    first = SpecDecodeHooks("method_0", labels={"model": "bench", "engine": "bench"},
                            registry=registry, **common)
    hooks = [first] + [SpecDecodeHooks(f"method_{i}", collector=first.collector, **common)
                       for i in range(1, label_sets)]
    pool = accepted_pool()
    for h in hooks:
        for s in range(steps_per_set):
            run_step(h, pool[s % POOL])
    return registry, hooks


def bench_render(label_sets: int, renders: int, steps_per_set: int,
                 provider: TracerProvider, budget_s: float) -> dict[str, Any]:
    registry, hooks = build(label_sets, steps_per_set, provider)
    collector = hooks[0].collector
    body_om = openmetrics.generate_latest(registry)
    body_classic = classic.generate_latest(registry)
    identical = (render(registry, openmetrics.generate_latest) == body_om
                 and render(registry, classic.generate_latest) == body_classic)
    exemplars = body_om.count(b" # {")
    samples = sum(1 for line in body_classic.splitlines() if line and not line.startswith(b"#"))
    timers = {
        "openmetrics": lambda: render(registry, openmetrics.generate_latest),
        "classic": lambda: render(registry, classic.generate_latest),
        "collect": lambda: list(collector.collect()),
        "pc_openmetrics": lambda: openmetrics.generate_latest(registry),
        "pc_classic": lambda: classic.generate_latest(registry),
    }
    for f in timers.values():  # warm up
        for _ in range(5):
            f()
    times: dict[str, list[int]] = {name: [] for name in timers}
    budget = time.perf_counter() + budget_s
    done = 0
    for done in range(1, renders + 1):  # interleaved, so drift hits every format alike
        if done > 30 and time.perf_counter() > budget:
            done -= 1
            break
        for name, f in timers.items():
            t0 = perf_counter_ns()
            f()
            times[name].append(perf_counter_ns() - t0)
    for h in hooks:
        h.flush()
    return {
        "label_sets": label_sets, "steps_per_set": steps_per_set, "renders": done,
        "samples": samples, "exemplars": exemplars, "bytes_identical": identical,
        "bytes_openmetrics": len(body_om), "bytes_classic": len(body_classic),
        **{f"{name}_us": stats_us(t) for name, t in times.items()},
    }


# ---- 2. concurrent scraping --------------------------------------------------------------


def scraper(registry: CollectorRegistry, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        t0 = perf_counter_ns()
        metrics_response(registry, "GET", PROMETHEUS_ACCEPT, None, "").sent()
        metrics_response(registry, "GET", "text/plain", None, "")
        out.append(perf_counter_ns() - t0)


def concurrent_phase(scrapers: int, seconds: float, timed_lock: bool, label_sets: int,
                     provider: TracerProvider) -> dict[str, Any]:
    registry, hooks_list = build(label_sets, 300, provider, trace_ratio=0.01)
    hooks = hooks_list[0]  # the engine loop; the other label sets only make scrapes bigger
    lock = install_timed_lock(hooks.collector) if timed_lock else None
    pool = accepted_pool(1)
    stop = threading.Event()
    scrape_times: list[list[int]] = [[] for _ in range(scrapers)]
    threads = [threading.Thread(target=scraper, args=(registry, stop, scrape_times[i]),
                                name=f"scraper-{i}", daemon=True) for i in range(scrapers)]
    end_ns: list[int] = []
    step_ns: list[int] = []
    hook_ident = threading.get_ident()
    if lock is not None:
        lock.records.clear()
    for t in threads:
        t.start()
    deadline = time.perf_counter() + seconds
    i = 0
    while True:
        acc = pool[i % POOL]
        t0 = perf_counter_ns()
        hooks.draft_start()
        hooks.draft_end()
        hooks.verify_start()
        hooks.verify_end(acc, K)
        hooks.draft_extend_start()
        hooks.draft_extend_end()
        t1 = perf_counter_ns()
        hooks.end_step()
        t2 = perf_counter_ns()
        end_ns.append(t2 - t1)
        step_ns.append(t2 - t0)
        i += 1
        if i % 256 == 0 and time.perf_counter() >= deadline:
            break
    stop.set()
    for t in threads:
        t.join(timeout=30)
    for h in hooks_list:
        h.flush()
    row: dict[str, Any] = {
        "scrapers": scrapers, "timed_lock": timed_lock, "seconds": seconds,
        "steps": i, "steps_per_s": i / seconds,
        "scrapes": sum(len(s) for s in scrape_times),
        "scrape_pair_ms_median": (float(np.median(np.concatenate(scrape_times))) / 1e6
                                  if scrapers and any(scrape_times) else None),
        "end_step_us": stats_us(end_ns), "step_us": stats_us(step_ns),
    }
    if lock is not None:
        recs = np.asarray(lock.records, dtype=np.int64).reshape(-1, 3)
        mine = recs[:, 0] == hook_ident
        row["hook_lock_wait_us"] = stats_us(recs[mine, 1])
        row["hook_lock_hold_us"] = stats_us(recs[mine, 2])
        row["scrape_lock_hold_us"] = stats_us(recs[~mine, 2])
        row["scrape_lock_acquisitions"] = int((~mine).sum())
        row["hook_steps_queued"] = sum(1 for ident in lock.refused if ident == hook_ident)
    return row


# ---- reporting ---------------------------------------------------------------------------


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or v != v else f"{v:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Render time of /metrics, registry holding one SpecDecodeCollector; "
        f"up to {result['renders']} renders per writer (or {result['budget_s']:g} s per size), "
        "interleaved; ms. spec_metrics: what its /metrics serves; prometheus_client: its own "
        "generate_latest on the same registry, for comparison (same bytes: checked).",
        "",
        "| label sets | renders | samples | exemplars | bytes OM / classic | same bytes | "
        "spec_metrics OM median | OM p99 | classic median | classic p99 | "
        "prometheus_client OM median | classic median | collect() median |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["render"]:
        ms = {k: {s: v / 1e3 for s, v in r[f"{k}_us"].items() if s != "n"}
              for k in ("collect", "openmetrics", "classic", "pc_openmetrics", "pc_classic")}
        lines.append(
            f"| {r['label_sets']} | {r['renders']} | {r['samples']} | {r['exemplars']} | "
            f"{r['bytes_openmetrics']:,} / {r['bytes_classic']:,} | "
            f"{'yes' if r['bytes_identical'] else 'NO'} | "
            f"{_f(ms['openmetrics']['median'], 2)} | {_f(ms['openmetrics']['p99'], 2)} | "
            f"{_f(ms['classic']['median'], 2)} | {_f(ms['classic']['p99'], 2)} | "
            f"{_f(ms['pc_openmetrics']['median'], 2)} | {_f(ms['pc_classic']['median'], 2)} | "
            f"{_f(ms['collect']['median'], 2)} |")
    t = result["target"]
    lines += ["", f"Target: OpenMetrics render ≤ {t['target_ms']:g} ms for 8 label sets "
              f"(p99 {t['p99_ms']:.2f} ms, median {t['median_ms']:.2f} ms): "
              f"**{'PASS' if t['pass'] else 'MISS'}**", ""]
    c = result["concurrent"]
    lines += [
        f"Hook thread at full rate (batch {BATCH}, K {K}, numpy accepted, trace_ratio 0.01 + "
        f"outliers) while N threads render OpenMetrics + classic in a tight loop; "
        f"{c['label_sets']} label sets in the collector; {c['seconds']} s per phase; µs. "
        f"GIL switch interval {sys.getswitchinterval() * 1e3:g} ms.",
        "",
        "| scrapers | lock | steps/s | scrape pairs | step p50 | step p99 | step max | "
        "end_step p50 | end_step p99 | end_step max | hook lock wait p99 | "
        "hook lock wait max | scrape lock hold p99 | scrape lock hold max | steps queued |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in c["phases"]:
        w = r.get("hook_lock_wait_us", {})
        h = r.get("scrape_lock_hold_us", {})
        lines.append(
            f"| {r['scrapers']} | {'timed' if r['timed_lock'] else 'plain'} | "
            f"{r['steps_per_s']:,.0f} | {r['scrapes']} | {_f(r['step_us']['median'])} | "
            f"{_f(r['step_us']['p99'])} | {_f(r['step_us']['max'])} | "
            f"{_f(r['end_step_us']['median'])} | {_f(r['end_step_us']['p99'])} | "
            f"{_f(r['end_step_us']['max'])} | {_f(w.get('p99'))} | {_f(w.get('max'))} | "
            f"{_f(h.get('p99'))} | {_f(h.get('max'))} | "
            f"{r.get('hook_steps_queued', '–')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--renders", type=int, default=400, help="renders per format and size")
    parser.add_argument("--label-sets", default="1,8,64")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of rendering per size at most (at least 30 renders)")
    parser.add_argument("--steps-per-set", type=int, default=300,
                        help="steps recorded per label set before rendering")
    parser.add_argument("--seconds", type=float, default=4.0, help="per concurrent phase")
    parser.add_argument("--scrapers", default="2,4", help="scraper thread counts")
    parser.add_argument("--concurrent-label-sets", type=int, default=8)
    parser.add_argument("--json", help="write the results and machine info here")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.label_sets.split(",")]
    scraper_counts = [int(x) for x in args.scrapers.split(",")]
    if args.renders < 10 or args.seconds <= 0 or min(sizes) < 1 or min(scraper_counts) < 1:
        parser.error("need --renders >= 10, --seconds > 0, label sets and scrapers >= 1")

    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    gc.collect()
    provider = null_provider()
    renders = [bench_render(n, args.renders, args.steps_per_set, provider, args.budget)
               for n in sizes]
    eight = next((r for r in renders if r["label_sets"] == 8), renders[-1])
    target = {"label_sets": eight["label_sets"], "target_ms": TARGET_RENDER_MS,
              "median_ms": eight["openmetrics_us"]["median"] / 1e3,
              "p99_ms": eight["openmetrics_us"]["p99"] / 1e3}
    target["pass"] = target["p99_ms"] <= TARGET_RENDER_MS and eight["classic_us"]["p99"] / 1e3 \
        <= TARGET_RENDER_MS
    phases = [concurrent_phase(0, args.seconds, False, args.concurrent_label_sets, provider),
              concurrent_phase(0, args.seconds, True, args.concurrent_label_sets, provider)]
    for n in scraper_counts:
        phases.append(concurrent_phase(n, args.seconds, False, args.concurrent_label_sets,
                                       provider))
        phases.append(concurrent_phase(n, args.seconds, True, args.concurrent_label_sets,
                                       provider))
    provider.shutdown()
    result: dict[str, Any] = {
        "renders": args.renders, "budget_s": args.budget, "render": renders, "target": target,
        "concurrent": {"label_sets": args.concurrent_label_sets, "seconds": args.seconds,
                       "phases": phases},
    }
    report(result, markdown(result), "bench_scrape.py", argv, started, load_before, args.json)
    return 0 if target["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
