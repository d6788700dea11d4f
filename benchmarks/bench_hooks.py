"""Hook-overhead benchmark: CPU cost per decode step of SpecDecodeHooks, and of the
per-request instrumentation patterns existing engines use, at one batch size and K.

    python benchmarks/bench_hooks.py [--steps N] [--batch 256] [--k 4] [--json out.json]
    python benchmarks/bench_hooks.py --sweep [--json out.json]   # batch 1..512 x K 1, 4, 8

A step is the minimal realistic sequence an engine calls once per decode step:
draft_start, draft_end, verify_start, verify_end(accepted, K), draft_extend_start,
draft_extend_end, end_step. The 7 calls are timed back to back with perf_counter_ns, so
the numbers are the hooks' own cost (the stages do no work here), minus the cost of an
empty timing pair.

Small shared VMs drift by 1.5x for seconds at a time, so every configuration runs in
`--rounds` interleaved rounds and the samples are pooled: drift then hits every
configuration alike, and the spread of the round medians is reported next to them.

Everything that depends on the workload takes `batch` and `k`, so sweeping batch sizes
and K later is a loop around `run_suite`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from dataclasses import asdict, dataclass, field
from importlib import metadata
from time import perf_counter_ns, process_time_ns
from typing import Any, Callable, Sequence

import numpy as np
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from prometheus_client import CollectorRegistry

from spec_metrics import SpecDecodeHooks

# Targets from issue 2.
TARGET_STEP_US = 25.0  # metrics+tracing median per step, batch 256, K 4
TARGET_DISABLED_NS = 60.0  # one hook call with enabled=False

POOL = 64  # distinct accepted inputs cycled through, so no timed step builds its input
STAGE_NAMES = ("draft", "verify", "draft_extend")


# ---- results -------------------------------------------------------------------------


@dataclass
class Row:
    """One configuration: per-step wall time on the engine thread (pooled over rounds),
    and process CPU per step, all threads (so the span export thread counts too)."""

    name: str
    accepted: str
    steps: int
    median_us: float
    p99_us: float
    mean_us: float
    cpu_us: float
    round_medians_us: list[float]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---- inputs --------------------------------------------------------------------------


def accepted_pool(batch: int, k: int, kind: str, seed: int = 0) -> list[Any]:
    """POOL per-step accepted-count inputs, in the form an engine would pass them."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, k + 1, size=batch, dtype=np.int64) for _ in range(POOL)]
    if kind == "numpy":
        return arrays
    if kind == "list":
        return [a.tolist() for a in arrays]
    if kind == "torch":
        import torch  # only this variant pays for (and is affected by) importing torch

        return [torch.from_numpy(a.copy()) for a in arrays]
    raise ValueError(kind)


# ---- OpenTelemetry plumbing ------------------------------------------------------------


class NullExporter(SpanExporter):
    """Exports nowhere; counts what arrived, so memory stays bounded however long it runs."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's BatchSpanProcessor (default queue 2048, batch 512, 5 s delay), counting
    ended spans and traced steps by reason; ended minus exported = dropped (queue full)."""

    def __init__(self, exporter: NullExporter) -> None:
        super().__init__(exporter)
        self.null = exporter
        self.ended = 0
        self.reasons: dict[str, int] = {}

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1
        reason = span.attributes.get("spec_decode.sample_reason") if span.attributes else None
        if reason is not None:  # only step spans carry it: one per traced step
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        super().on_end(span)


class SpanSink:
    """A real SDK TracerProvider + BatchSpanProcessor into a no-op exporter."""

    def __init__(self) -> None:
        self.processor = CountingBatchSpanProcessor(NullExporter())
        self.provider = TracerProvider()
        self.provider.add_span_processor(self.processor)

    def close(self) -> dict[str, Any]:
        self.provider.force_flush()
        self.provider.shutdown()
        p = self.processor
        return {"spans_ended": p.ended, "spans_exported": p.null.exported,
                "spans_dropped": p.ended - p.null.exported,
                "traced_steps_by_reason": dict(p.reasons)}


# ---- configurations --------------------------------------------------------------------


class Case:
    """One configuration, run in chunks (rounds) interleaved with the others."""

    name: str
    accepted: str

    def __init__(self) -> None:
        self.samples: list[np.ndarray] = []
        self.cpu_ns = 0
        self.round_medians: list[float] = []

    def _loop(self, n: int) -> list[int]:
        raise NotImplementedError

    def run(self, n: int, keep: bool = True) -> None:
        cpu0 = process_time_ns()
        raw = self._loop(n)
        cpu = process_time_ns() - cpu0
        if keep:
            chunk = np.asarray(raw, dtype=np.int64)
            self.samples.append(chunk)
            self.cpu_ns += cpu
            self.round_medians.append(float(np.median(chunk)))

    def close(self) -> tuple[str, dict[str, Any]]:
        """Release resources; return notes and extra fields for the row."""
        return "", {}

    def row(self, pair_ns: float, pair_cpu_ns: float) -> Row:
        samples = np.concatenate(self.samples) - pair_ns
        steps = int(samples.size)
        notes, extra = self.close()
        return Row(
            name=self.name, accepted=self.accepted, steps=steps,
            median_us=float(np.median(samples)) / 1e3,
            p99_us=float(np.percentile(samples, 99)) / 1e3,
            mean_us=float(samples.mean()) / 1e3,
            cpu_us=(self.cpu_ns / steps - pair_cpu_ns) / 1e3,
            round_medians_us=[(m - pair_ns) / 1e3 for m in self.round_medians],
            notes=notes, extra=extra,
        )


MODES: dict[str, dict[str, Any]] = {
    "disabled": {"enabled": False},
    "metrics": {"tracing": False},
    "metrics+tracing": {},  # the defaults: trace_ratio=0.01, running-quantile outliers
    "metrics+tracing@1.0": {"trace_ratio": 1.0},
}


class HooksCase(Case):
    """Our hooks in one mode; the 7 calls are written inline, as an engine writes them."""

    def __init__(self, mode: str, batch: int, k: int, accepted: str = "numpy") -> None:
        super().__init__()
        self.name, self.accepted, self.k = mode, accepted, k
        self.pool = accepted_pool(batch, k, accepted)
        self.i = 0
        options = MODES[mode]
        traced = options.get("enabled", True) and options.get("tracing", True)
        self.sink = SpanSink() if traced else None
        self.hooks = SpecDecodeHooks(
            "eagle", labels={"model": "bench"}, registry=CollectorRegistry(),
            tracer_provider=self.sink.provider if self.sink else None,
            max_draft_tokens=max(k, 8), **options,
        )

    def _loop(self, n: int) -> list[int]:
        hooks, pool, k, pc = self.hooks, self.pool, self.k, perf_counter_ns
        n_pool, start = len(pool), self.i
        samples = [0] * n
        for j in range(n):
            acc = pool[(start + j) % n_pool]
            t0 = pc()
            hooks.draft_start()
            hooks.draft_end()
            hooks.verify_start()
            hooks.verify_end(acc, k)
            hooks.draft_extend_start()
            hooks.draft_extend_end()
            hooks.end_step()
            t1 = pc()
            samples[j] = t1 - t0
        self.i += n
        return samples

    def close(self) -> tuple[str, dict[str, Any]]:
        self.hooks.close()
        dropped = {r: n for r, n in self.hooks.collector.drops.counts.items() if n}
        if dropped:  # the benchmark feeds valid input: any drop means a broken measurement
            raise RuntimeError(f"{self.name}: the hooks dropped input: {dropped}")
        if self.sink is None:
            return "", {}
        extra = self.sink.close()
        reasons = extra["traced_steps_by_reason"]
        notes = (f"{sum(reasons.values())} of {self.i} steps traced ("
                 + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) + ")")
        if extra["spans_dropped"]:
            notes += (f"; {extra['spans_dropped']} of {extra['spans_ended']} spans dropped "
                      "by the full BSP queue")
        return notes, extra


class StepCase(Case):
    """A baseline: `step(accepted)` once per step (one extra call, ~50 ns, negligible
    next to the baselines' hundreds of µs)."""

    def __init__(self, name: str, step: Callable[[Any], None], pool: Sequence[Any],
                 closer: Callable[[], tuple[str, dict[str, Any]]] | None = None) -> None:
        super().__init__()
        self.name, self.accepted = name, "numpy"
        self.step, self.pool, self.closer = step, pool, closer
        self.i = 0

    def _loop(self, n: int) -> list[int]:
        step, pool, pc = self.step, self.pool, perf_counter_ns
        n_pool, start = len(pool), self.i
        samples = [0] * n
        for j in range(n):
            acc = pool[(start + j) % n_pool]
            t0 = pc()
            step(acc)
            t1 = pc()
            samples[j] = t1 - t0
        self.i += n
        return samples

    def close(self) -> tuple[str, dict[str, Any]]:
        return self.closer() if self.closer else ("", {})


# ---- baselines: the per-request patterns of existing engines ---------------------------


def prometheus_loop_case(batch: int, k: int) -> StepCase:
    """(a) prometheus_client Histogram.observe per request on a `.labels()`-bound child,
    plus one observe per stage."""
    from prometheus_client import Histogram

    registry = CollectorRegistry()
    length = Histogram("bl_accepted_length", "accepted tokens per request", ["model"],
                       buckets=[float(i) for i in range(k + 1)], registry=registry
                       ).labels("bench")
    stage_hist = Histogram("bl_stage_seconds", "stage seconds", ["model", "stage"],
                           registry=registry)
    stages = [stage_hist.labels("bench", s) for s in STAGE_NAMES]
    pc = time.perf_counter

    def step(acc: np.ndarray) -> None:
        t0 = pc()  # engines time stages with perf_counter pairs; count those too
        t1 = pc()
        for value in acc.tolist():  # Python ints: the cheapest per-request form
            length.observe(value)
        t2 = pc()
        t3 = pc()
        t4 = pc()
        stages[0].observe(t1 - t0)
        stages[1].observe(t3 - t2)
        stages[2].observe(t4 - t3)

    return StepCase("baseline (a): prometheus_client observe per request", step,
                    accepted_pool(batch, k, "numpy"),
                    lambda: (f"{batch} + 3 observes per step", {}))


def otel_spans_case(batch: int, k: int) -> StepCase:
    """(b) one SDK span per request per stage, each a child of its request's sampled trace
    context, through the same BatchSpanProcessor + no-op exporter as our tracing."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    sink = SpanSink()
    tracer = sink.provider.get_tracer("baseline")
    rng = np.random.default_rng(1)
    parents = [
        trace.set_span_in_context(NonRecordingSpan(SpanContext(
            int(rng.integers(1, 2**62)), int(rng.integers(1, 2**62)), is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED))))
        for _ in range(batch)
    ]
    names = [f"spec_{s}" for s in STAGE_NAMES]
    now = time.time_ns

    def step(acc: np.ndarray) -> None:
        accepted = acc.tolist()
        for stage, name in enumerate(names):
            start = now()
            end = now()
            for r, parent in enumerate(parents):
                attributes = {"accepted": accepted[r]} if stage == 1 else None
                span = tracer.start_span(name, context=parent, attributes=attributes,
                                         start_time=start)
                span.end(end_time=end)

    def closer() -> tuple[str, dict[str, Any]]:
        extra = sink.close()
        return (f"{batch}x3 spans per step; {extra['spans_dropped']} of "
                f"{extra['spans_ended']} spans dropped by the full BSP queue", extra)

    return StepCase("baseline (b): OTel SDK span per request per stage", step,
                    accepted_pool(batch, k, "numpy"), closer)


def otel_histograms_case(batch: int, k: int) -> StepCase:
    """(c) OTel SDK histograms: record() per request, plus one per stage."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()  # a reader, so measurements are really aggregated
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("baseline")
    length = meter.create_histogram("bl_accepted_length")
    stage_hist = meter.create_histogram("bl_stage_seconds", unit="s")
    attrs = {"model": "bench"}
    stage_attrs = [{"model": "bench", "stage": s} for s in STAGE_NAMES]
    pc = time.perf_counter

    def step(acc: np.ndarray) -> None:
        t0 = pc()
        t1 = pc()
        for value in acc.tolist():
            length.record(value, attrs)
        t2 = pc()
        t3 = pc()
        t4 = pc()
        stage_hist.record(t1 - t0, stage_attrs[0])
        stage_hist.record(t3 - t2, stage_attrs[1])
        stage_hist.record(t4 - t3, stage_attrs[2])

    def closer() -> tuple[str, dict[str, Any]]:
        reader.get_metrics_data()
        provider.shutdown()
        return f"{batch} + 3 records per step", {}

    return StepCase("baseline (c): OTel SDK histogram.record per request", step,
                    accepted_pool(batch, k, "numpy"), closer)


# ---- measurements ------------------------------------------------------------------------


def empty_pair_ns(n: int = 200_000) -> tuple[float, float]:
    """Median ns of `t0 = pc(); t1 = pc()` in the timed loops' shape, and the process CPU
    per iteration of that loop (subtracted from the CPU column)."""
    pc = perf_counter_ns
    samples = [0] * n
    cpu0 = process_time_ns()
    for j in range(n):
        t0 = pc()
        t1 = pc()
        samples[j] = t1 - t0
    cpu = (process_time_ns() - cpu0) / n
    return float(statistics.median(samples)), cpu


def run_interleaved(cases: Sequence[Case], steps: Sequence[int], warmup: Sequence[int],
                    rounds: int) -> None:
    """Warm every case, then `rounds` round-robin passes of steps[i] // rounds each."""
    for case, w in zip(cases, warmup):
        case.run(w, keep=False)
    for _ in range(rounds):
        for case, n in zip(cases, steps):
            case.run(max(1, n // rounds))


def disabled_call_ns(batch: int, k: int, number: int = 500_000, repeat: int = 7
                     ) -> dict[str, float]:
    """timeit of single hook calls with enabled=False, next to a bare method call.
    Best of `repeat`: the least disturbed run is the cost of the call itself."""

    class Bare:
        def f(self) -> None:
            pass

    hooks = SpecDecodeHooks("eagle", registry=None, enabled=False)
    env = {"h": hooks, "o": Bare(), "acc": accepted_pool(batch, k, "numpy")[0], "k": k}

    def best(stmt: str) -> float:
        return min(timeit.Timer(stmt, globals=env).repeat(repeat, number)) / number * 1e9

    out = {
        "hook_draft_start_ns": best("h.draft_start()"),
        "hook_verify_end_ns": best("h.verify_end(acc, k)"),
        "bare_method_ns": best("o.f()"),
        "timeit_loop_ns": best("pass"),  # timeit's own loop, included in all of the above
    }
    out["ratio_draft_start"] = out["hook_draft_start_ns"] / out["bare_method_ns"]
    out["ratio_verify_end"] = out["hook_verify_end_ns"] / out["bare_method_ns"]
    return out


def run_suite(batch: int, k: int, steps: int, rounds: int = 5, torch: bool = True
              ) -> dict[str, Any]:
    """Every configuration at one (batch, K). Baselines cost 20-1000x more per step, so
    they run fewer steps, keeping the suite under ~1 minute on 2 cores."""
    pair_ns, pair_cpu = empty_pair_ns()
    warm = max(500, steps // 10)  # > outlier_min_samples, so outlier capture is live
    hooks_cases: list[Case] = [HooksCase(mode, batch, k) for mode in MODES]
    hooks_cases.append(HooksCase("metrics+tracing", batch, k, "list"))
    if torch:
        # torch is imported here, only for this variant, but before the rounds so that it
        # is interleaved like the rest (run alone, it met a different machine speed).
        # Checked: with torch imported the numpy path measures the same (15.8 vs 15.7 µs).
        try:
            hooks_cases.append(HooksCase("metrics+tracing", batch, k, "torch"))
        except ImportError:
            pass
    baselines: list[Case] = [prometheus_loop_case(batch, k), otel_spans_case(batch, k),
                             otel_histograms_case(batch, k)]
    cases = hooks_cases + baselines
    base_steps = [max(rounds * 20, steps // 10), max(rounds * 10, steps // 50),
                  max(rounds * 10, steps // 50)]
    run_interleaved(cases, [steps] * len(hooks_cases) + base_steps,
                    [warm] * len(hooks_cases) + [max(1, n // 10) for n in base_steps], rounds)
    rows = [c.row(pair_ns, pair_cpu) for c in hooks_cases]
    base_rows = [c.row(pair_ns, pair_cpu) for c in baselines]
    disabled = disabled_call_ns(batch, k)
    ours = next(r for r in rows if r.name == "metrics+tracing" and r.accepted == "numpy")
    targets = {
        "metrics+tracing median per step (µs)": {
            "value": ours.median_us, "target": TARGET_STEP_US,
            "pass": ours.median_us <= TARGET_STEP_US},
        "disabled hook call, hooks.draft_start() (ns)": {
            "value": disabled["hook_draft_start_ns"], "target": TARGET_DISABLED_NS,
            "pass": disabled["hook_draft_start_ns"] <= TARGET_DISABLED_NS},
    }
    return {
        "batch": batch, "k": k, "steps": steps, "rounds": rounds, "warmup": warm,
        "empty_timing_pair_ns": pair_ns,
        "rows": [asdict(r) for r in rows], "baselines": [asdict(b) for b in base_rows],
        "baseline_ratio_over_metrics_tracing_median": {
            b.name: b.median_us / ours.median_us for b in base_rows},
        "disabled_call": disabled, "targets": targets,
    }


# ---- reporting -------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for package in ("numpy", "prometheus_client", "opentelemetry-api", "opentelemetry-sdk",
                    "opentelemetry-exporter-otlp-proto-http", "spec_metrics"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    try:  # which library code was measured
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--",
                                "spec_metrics", ":!spec_metrics/demo"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        note = " + uncommitted spec_metrics changes" if dirty else ""
        git = f"{commit}{note}" if commit else None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "git": git,
        "cpu_model": cpu, "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(), "versions": versions,
        "gil_switch_interval_ms": sys.getswitchinterval() * 1e3,
    }


def header(result: dict[str, Any]) -> str:
    """The first line of every benchmark's output: code, machine, versions."""
    m = result["machine"]
    return (f"spec_metrics at {m['git']}; {m['cpu_model']}, {m['cores']} cores, {m['python']}; "
            + ", ".join(f"{p} {v}" for p, v in m["versions"].items() if v))


def report(result: dict[str, Any], table: str, script: str, argv: Sequence[str] | None,
           started: float, load_before: float, json_path: str | None) -> None:
    """Stamp a result with machine, command, date and load; print it; save it as JSON."""
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    result["machine"]["loadavg_1m_before_after"] = [load_before, os.getloadavg()[0]]
    shown = sys.argv if argv is None else [script, *argv]
    result["command"] = " ".join(["python", *shown])
    result["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load = result["machine"]["loadavg_1m_before_after"]
    print(header(result))
    print(f"{result['command']}  ({result['date']}, {result['elapsed_s']} s, "
          f"load average {load[0]:.2f} before, {load[1]:.2f} after)\n")
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)


def _us(value: float) -> str:
    """µs with sensible digits: 0.28, 19.4, 345, 25,890."""
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Per step (7 hook calls), batch {result['batch']}, K {result['k']}; µs; "
        f"{result['rounds']} interleaved rounds pooled; empty timing pair "
        f"({result['empty_timing_pair_ns']:.0f} ns) subtracted. CPU/step: process CPU "
        "time of all threads (span export thread included) per step.",
        "",
        "| configuration | accepted as | steps | median | p99 | mean | CPU/step | "
        "round medians | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"] + result["baselines"]:
        spread = f"{_us(min(r['round_medians_us']))}–{_us(max(r['round_medians_us']))}"
        lines.append(
            f"| {r['name']} | {r['accepted']} | {r['steps']} | {_us(r['median_us'])} | "
            f"{_us(r['p99_us'])} | {_us(r['mean_us'])} | {_us(r['cpu_us'])} | {spread} | "
            f"{r['notes']} |")
    d = result["disabled_call"]
    lines += [
        "",
        f"Disabled hooks, one call (timeit, best of 7 × 500k; timeit's loop, "
        f"{d['timeit_loop_ns']:.1f} ns, included):",
        "",
        "| call | ns | × bare `obj.f()` |",
        "|---|---:|---:|",
        f"| `hooks.draft_start()`, enabled=False | {d['hook_draft_start_ns']:.1f} | "
        f"{d['ratio_draft_start']:.2f} |",
        f"| `hooks.verify_end(acc, k)`, enabled=False | {d['hook_verify_end_ns']:.1f} | "
        f"{d['ratio_verify_end']:.2f} |",
        f"| bare `obj.f()` doing nothing | {d['bare_method_ns']:.1f} | 1.00 |",
        "",
        "Baselines over our `metrics+tracing` median:",
        "",
        "| baseline | median µs | × ours |",
        "|---|---:|---:|",
    ]
    for r in result["baselines"]:
        ratio = result["baseline_ratio_over_metrics_tracing_median"][r["name"]]
        lines.append(f"| {r['name']} | {_us(r['median_us'])} | {ratio:.0f}× |")
    lines += ["", "Targets:", ""]
    for name, t in result["targets"].items():
        verdict = "PASS" if t["pass"] else "MISS"
        lines.append(f"- {name}: {t['value']:.2f} (target ≤ {t['target']:g}) **{verdict}**")
    return "\n".join(lines)


# ---- sweep: batch sizes x K (issue 5) ----------------------------------------------------

SWEEP_BATCHES = (1, 8, 32, 128, 256, 512)
SWEEP_KS = (1, 4, 8)
SPAN_BASELINE_MAX_STEPS = 30  # baseline (b) costs ~85 µs per request: cap it per cell
BASELINE_KEYS = {"baseline (a)": "prometheus_loop", "baseline (b)": "otel_spans",
                 "baseline (c)": "otel_histograms"}


class FloorCase(Case):
    """The floor: what any instrumentation of this shape must pay per step, the 7
    timestamps (one per hook) and one vectorized update of the batch (`np.bincount`)."""

    def __init__(self, batch: int, k: int) -> None:
        super().__init__()
        self.name, self.accepted, self.k = "floor", "numpy", k
        self.pool = accepted_pool(batch, k, "numpy")
        self.i = 0

    def _loop(self, n: int) -> list[int]:
        pool, pc, bincount, width = self.pool, perf_counter_ns, np.bincount, self.k + 1
        n_pool, start = len(pool), self.i
        samples = [0] * n
        for j in range(n):
            acc = pool[(start + j) % n_pool]
            t0 = pc()
            pc()
            pc()
            pc()
            bincount(acc, minlength=width)
            pc()
            pc()
            pc()
            pc()
            t1 = pc()
            samples[j] = t1 - t0
        self.i += n
        return samples


def _key(name: str) -> str:
    for prefix, key in BASELINE_KEYS.items():
        if name.startswith(prefix):
            return key
    return name


def sweep_cell_cases(batch: int, k: int, steps: int, rounds: int
                     ) -> tuple[list[Case], list[int], list[int]]:
    """Every mode, the floor and the three baselines at one (batch, K): cases, timed steps,
    warm-up steps."""
    hooks_cases: list[Case] = [HooksCase(mode, batch, k) for mode in MODES]
    baselines: list[Case] = [prometheus_loop_case(batch, k), otel_spans_case(batch, k),
                             otel_histograms_case(batch, k)]
    cases = hooks_cases + [FloorCase(batch, k)] + baselines
    base_steps = [max(rounds * 20, steps // 10),
                  max(rounds * 2, min(SPAN_BASELINE_MAX_STEPS, steps // 50)),
                  max(rounds * 10, steps // 30)]
    warm = [300] * (len(hooks_cases) + 1) + [max(1, n // 10) for n in base_steps]
    return cases, [steps] * (len(hooks_cases) + 1) + base_steps, warm


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x; returns (b, a): µs per request, µs at batch 0."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(b), float(a)


def run_sweep(batches: Sequence[int], ks: Sequence[int], steps: int, rounds: int
              ) -> dict[str, Any]:
    """All cells' cases are built first and then run in `rounds` round-robin passes over
    every case of every cell, so the VM's speed drift spreads over all batch sizes instead
    of landing on whichever cells ran during a slow spell (which would fake a slope)."""
    pair_ns, pair_cpu = empty_pair_ns()
    grid = [(batch, k) for k in ks for batch in batches]
    built = [sweep_cell_cases(batch, k, steps, rounds) for batch, k in grid]
    cases = [c for cs, _, _ in built for c in cs]
    n_steps = [n for _, ns, _ in built for n in ns]
    warm = [w for _, _, ws in built for w in ws]
    for case, w in zip(cases, warm):
        case.run(w, keep=False)
    for r in range(rounds):
        t0 = time.perf_counter()
        for case, n in zip(cases, n_steps):
            case.run(max(1, n // rounds))
        print(f"  round {r + 1}/{rounds}: {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    cells = []
    for (batch, k), (cs, _, _) in zip(grid, built):
        res: dict[str, Any] = {}
        for case in cs:
            row = case.row(pair_ns, pair_cpu)
            res[_key(row.name)] = {"median_us": row.median_us, "p99_us": row.p99_us,
                                   "mean_us": row.mean_us, "cpu_us": row.cpu_us,
                                   "steps": row.steps, "round_medians_us":
                                   row.round_medians_us, "notes": row.notes}
        cells.append({"batch": batch, "k": k, "results": res})
    names = list(cells[0]["results"])
    slopes: dict[str, dict[str, Any]] = {}
    for name in names:
        slopes[name] = {}
        for k in ks:
            pts = [(c["batch"], c["results"][name]["median_us"]) for c in cells if c["k"] == k]
            b, a = fit_slope(*zip(*pts))
            slopes[name][str(k)] = {"us_per_request": b, "intercept_us": a}
        pts = [(c["batch"], c["results"][name]["median_us"]) for c in cells]
        b, a = fit_slope(*zip(*pts))
        slopes[name]["all"] = {"us_per_request": b, "intercept_us": a}
    return {"batches": list(batches), "ks": list(ks), "steps": steps, "rounds": rounds,
            "empty_timing_pair_ns": pair_ns, "series": names, "cells": cells,
            "slopes": slopes}


def sweep_markdown(result: dict[str, Any]) -> str:
    names, cells = result["series"], result["cells"]
    lines = []
    for stat in ("median_us", "p99_us"):
        label = "median" if stat == "median_us" else "p99"
        lines += [
            f"Per-step cost, {label}, µs (empty timing pair "
            f"{result['empty_timing_pair_ns']:.0f} ns subtracted; {result['rounds']} "
            "interleaved rounds pooled):", "",
            "| K | batch | " + " | ".join(names) + " |",
            "|---:|---:|" + "---:|" * len(names),
        ]
        for c in cells:
            lines.append(f"| {c['k']} | {c['batch']} | " + " | ".join(
                _us(c["results"][n][stat]) for n in names) + " |")
        lines.append("")
    steps = {n: cells[0]["results"][n]["steps"] for n in names}
    lines += ["Steps per cell: " + ", ".join(f"{n} {s}" for n, s in steps.items()), ""]
    ks = [str(k) for k in result["ks"]]
    lines += ["Least-squares slope of the median against batch size, µs per request "
              "(intercept in µs):", "",
              "| series | " + " | ".join(f"K={k}" for k in ks) + " | all K |",
              "|---|" + "---:|" * (len(ks) + 1)]
    for n in names:
        sl = result["slopes"][n]
        lines.append(f"| {n} | " + " | ".join(
            f"{sl[k]['us_per_request']:.4f} ({_us(sl[k]['intercept_us'])})" for k in ks + ["all"])
            + " |")
    ours = result["slopes"]["metrics+tracing"]["all"]["us_per_request"]
    lines += ["", "Per request, the baselines add " + ", ".join(
        f"{n} {result['slopes'][n]['all']['us_per_request']:.2f} µs"
        for n in BASELINE_KEYS.values() if n in result["slopes"])
        + f"; metrics+tracing {ours:.4f} µs (all-K fit)."]
    lines += ["", "Traced steps (K=4):", ""]
    for c in cells:
        if c["k"] == 4:
            lines.append(f"- batch {c['batch']}: " + "; ".join(
                f"{n}: {c['results'][n]['notes']}" for n in ("metrics+tracing",
                                                             "metrics+tracing@1.0")
                if n in c["results"]))
    lines += ["", "Over the floor (median / floor median), per batch, K=4:", "",
              "| batch | " + " | ".join(n for n in names if n != "floor") + " |",
              "|---:|" + "---:|" * (len(names) - 1)]
    for c in cells:
        if c["k"] != 4 and 4 in result["ks"]:
            continue
        fl = c["results"]["floor"]["median_us"]
        lines.append(f"| {c['batch']} | " + " | ".join(
            f"{c['results'][n]['median_us'] / fl:.1f}×" for n in names if n != "floor") + " |")
    return "\n".join(lines)


def main_sweep(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    gc.collect()
    result = run_sweep(SWEEP_BATCHES, SWEEP_KS, args.sweep_steps, args.sweep_rounds)
    report(result, sweep_markdown(result), "bench_hooks.py", argv, started, load_before,
           args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000,
                        help="timed steps per hook configuration (baselines run fewer)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch variant")
    parser.add_argument("--json", help="write the results and machine info here")
    parser.add_argument("--sweep", action="store_true",
                        help="sweep batch 1..512 x K 1,4,8 instead (ignores --steps, "
                        "--batch, --k, --rounds)")
    parser.add_argument("--sweep-steps", type=int, default=10_000,
                        help="timed steps per hook mode per sweep cell")
    parser.add_argument("--sweep-rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.sweep:
        return main_sweep(args, argv)
    if args.steps < 100 or args.batch < 1 or not 1 <= args.k <= 64 or args.rounds < 1:
        parser.error("need --steps >= 100, --batch >= 1, 1 <= --k <= 64, --rounds >= 1")

    # The SDK warns (once, deduplicated) when its queue is full; we count drops instead.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]  # other work on a small box shows up in every number
    gc.collect()  # start clean; GC stays enabled: engines run with it on
    result = run_suite(args.batch, args.k, args.steps, args.rounds, not args.no_torch)
    report(result, markdown(result), "bench_hooks.py", argv, started, load_before, args.json)
    return 0 if all(t["pass"] for t in result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
