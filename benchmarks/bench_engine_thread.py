"""Engine-thread cost of the hooks against the floor, with the worker thread running.

    python benchmarks/bench_engine_thread.py [--batches 1 16 64 256 512] [--json out.json]
                                             [--plot out.png]

An engine step here is a "device wait" that releases the GIL, as a serving engine's thread
does while it waits on the device (`time.sleep(--wait-us)`: a blocking wait that costs no
CPU, so the CPU figures are the instrumentation's; `--wait spin` burns the CPU instead, in
C code without the GIL, as a spinning synchronize or torch's CPU kernels would), then the 7
hook calls of a step (draft_start ... end_step, batch `--batch`, K 4), timed back to back.
Modes, interleaved in blocks so that the VM's drift hits them alike:

- off: the wait only (the reference for step time and CPU);
- floor: 7 perf_counter_ns + one np.searchsorted of a duration in the stage buckets + one
  np.bincount of the batch: what any instrumentation of this shape pays on the engine thread;
- worker: the default configuration (metrics + tracing with SpanExportProcessor and a no-op
  exporter, consumer="worker");
- worker-metrics: the same without tracing (what span building adds is the difference);
- inline: the default with consumer="inline" (the cost before issue 16).

Reported per mode and batch: the hooks' time on the engine thread per step (median, mean),
the engine thread's CPU and the process CPU (all threads: the worker, the span export
thread) per step above `off`, and the step's wall time above `off`, which is where GIL
contention from the worker would show (the engine waiting to get the GIL back). Total CPU:
`--tight-steps` steps back to back per round, then flushed (process CPU of all threads per
step, the median of the rounds), as the floor was first measured; the share of steps
traced is reported for both kinds of block, because back to back the default
max_traced_steps_per_second caps tracing (CPU for tracing at a real step rate: the
waited share times the cost of a traced step).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from time import perf_counter_ns, process_time_ns, thread_time_ns
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_hooks import machine_info  # noqa: E402

MODES = ("off", "floor", "worker", "worker-metrics", "inline")
K = 4


def calibrate_wait(wait_us: float, kind: str) -> Callable[[], Any]:
    """The device wait: sleep, or a SHA-256 of a buffer sized to take about `wait_us` of
    CPU (hashlib releases the GIL above 2 KiB)."""
    if kind == "sleep":
        seconds = wait_us / 1e6
        return lambda: time.sleep(seconds)
    size = 1 << 16
    buf = bytes(size)
    t0 = perf_counter_ns()
    for _ in range(50):
        hashlib.sha256(buf).digest()
    per_byte = (perf_counter_ns() - t0) / 50 / size
    data = bytes(max(4096, int(wait_us * 1e3 / per_byte)))
    return lambda: hashlib.sha256(data).digest()


EXPORTERS: dict[int, Any] = {}  # id(hooks) -> its exporter, which counts traced steps


def make_hooks(mode: str, batch: int) -> Any:
    if mode in ("off", "floor"):
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from prometheus_client import CollectorRegistry

    from spec_metrics import SpanExportProcessor, SpecDecodeHooks

    class Null(SpanExporter):
        traced = 0  # step spans received: how many steps were traced

        def export(self, spans: Any) -> SpanExportResult:
            self.traced += sum(1 for span in spans if span.name == "spec_decode.step")
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    provider = TracerProvider()
    exporter = Null()
    provider.add_span_processor(SpanExportProcessor(exporter))
    hooks = SpecDecodeHooks("eagle", registry=CollectorRegistry(), tracer_provider=provider,
                            max_draft_tokens=K, consumer="inline" if mode == "inline" else
                            "worker", tracing=mode != "worker-metrics")
    EXPORTERS[id(hooks)] = exporter
    return hooks


class Block:
    """Runs `n` steps of one mode and accumulates its measurements."""

    def __init__(self, mode: str, batch: int, wait: Callable[[], Any]) -> None:
        self.mode, self.batch, self.wait = mode, batch, wait
        self.hooks = make_hooks(mode, batch)
        # Back-to-back steps get hooks of their own: their short, hot stage times would
        # otherwise move the running quantiles, and the waited steps after them would be
        # taken for outliers.
        self.tight_hooks = make_hooks(mode, batch)
        rng = np.random.default_rng(batch)
        self.pool = [rng.integers(0, K + 1, batch) for _ in range(64)]
        self.hook_ns: list[int] = []
        self.step_ns = self.thread_ns = self.process_ns = self.steps = 0
        self.tight_per_step: list[float] = []  # process CPU µs per step, one per round
        self.traced = {"waited": 0, "tight": 0}  # steps traced in each kind of block
        self.tight_steps = 0

    def _traced(self, hooks: Any) -> int:
        exporter = EXPORTERS.get(id(hooks))
        return exporter.traced if exporter is not None else 0

    def run(self, n: int, keep: bool = True) -> None:
        h, pool, wait = self.hooks, self.pool, self.wait
        pc = perf_counter_ns
        samples = [0] * n
        bounds = np.array([0.0005 * 2 ** i for i in range(16)])
        searchsorted, bincount = np.searchsorted, np.bincount
        traced = self._traced(h)
        t_step, t_thread, t_proc = pc(), thread_time_ns(), process_time_ns()
        for j in range(n):
            acc = pool[j & 63]
            wait()  # the device wait: no GIL held
            if h is None:
                if self.mode == "floor":
                    t0 = pc()
                    pc()
                    pc()
                    pc()
                    searchsorted(bounds, 0.0013)
                    bincount(acc, minlength=K + 1)
                    pc()
                    pc()
                    pc()
                    t1 = pc()
                    samples[j] = t1 - t0
                continue
            t0 = pc()
            h.draft_start()
            h.draft_end()
            h.verify_start()
            h.verify_end(acc, K)
            h.draft_extend_start()
            h.draft_extend_end()
            h.end_step()
            samples[j] = pc() - t0
        if h is not None:
            h.poll()  # what is left of this block is consumed now, counted in this block
        if keep:
            self.step_ns += pc() - t_step
            self.thread_ns += thread_time_ns() - t_thread
            self.process_ns += process_time_ns() - t_proc
            self.steps += n
            self.hook_ns.extend(samples)
            if h is not None:
                h.flush()  # spans exported: counted below, outside the timed section
                self.traced["waited"] += self._traced(h) - traced

    def tight(self, n: int) -> None:
        """Total CPU: `n` steps back to back (no wait), then everything queued consumed;
        process CPU of all threads per step."""
        h, pool, pc = self.tight_hooks, self.pool, perf_counter_ns
        bounds = np.array([0.0005 * 2 ** i for i in range(16)])
        searchsorted, bincount = np.searchsorted, np.bincount
        traced = self._traced(h)
        t_proc = process_time_ns()
        for j in range(n):
            acc = pool[j & 63]
            if h is None:
                pc()
                pc()
                pc()
                pc()
                searchsorted(bounds, 0.0013)
                bincount(acc, minlength=K + 1)
                pc()
                pc()
                pc()
                continue
            h.draft_start()
            h.draft_end()
            h.verify_start()
            h.verify_end(acc, K)
            h.draft_extend_start()
            h.draft_extend_end()
            h.end_step()
        if h is not None:
            h.flush()
        self.tight_per_step.append((process_time_ns() - t_proc) / 1e3 / n)
        self.tight_steps += n
        self.traced["tight"] += self._traced(h) - traced

    def result(self, off: "Block") -> dict[str, float]:
        per = 1e3 * self.steps
        offper = 1e3 * off.steps
        hooks = sorted(self.hook_ns)
        return {
            "steps": self.steps,
            "hook_median_us": statistics.median(hooks) / 1e3 if self.mode != "off" else 0.0,
            "hook_mean_us": statistics.fmean(hooks) / 1e3 if self.mode != "off" else 0.0,
            "thread_cpu_us": self.thread_ns / per - off.thread_ns / offper,
            "process_cpu_us": self.process_ns / per - off.process_ns / offper,
            "step_wall_us": self.step_ns / per - off.step_ns / offper,
            # The median over rounds: one round's figure can double when the worker
            # and the engine thread fall into a bad GIL hand-off pattern.
            "total_cpu_us": (statistics.median(self.tight_per_step)
                             if self.tight_per_step else 0.0),
            "total_cpu_rounds_us": self.tight_per_step,
            "traced_share_waited": self.traced["waited"] / max(1, self.steps),
            "traced_share_tight": self.traced["tight"] / max(1, self.tight_steps),
        }


def run(batches: Sequence[int], steps: int, rounds: int, wait_us: float,
        wait_kind: str = "sleep", tight_steps: int = 20_000) -> dict[str, Any]:
    wait = calibrate_wait(wait_us, wait_kind)
    cells = {b: {m: Block(m, b, wait) for m in MODES} for b in batches}
    for blocks in cells.values():
        for block in blocks.values():
            block.run(300, keep=False)
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        t0 = time.perf_counter()
        for blocks in cells.values():
            for block in blocks.values():
                block.run(per_round)
                if block.mode != "off":
                    block.tight(tight_steps)
        print(f"  round {r + 1}/{rounds}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out: dict[str, Any] = {"batches": list(batches), "steps": per_round * rounds,
                           "rounds": rounds, "wait_us": wait_us, "wait": wait_kind,
                           "tight_steps": tight_steps, "cells": {}}
    for b, blocks in cells.items():
        out["cells"][str(b)] = {m: block.result(blocks["off"]) for m, block in blocks.items()}
    for block in (blk for blocks in cells.values() for blk in blocks.values()):
        if block.hooks is not None:
            drops = {k: v for hooks in (block.hooks, block.tight_hooks)
                     for k, v in hooks.collector.drops.counts.items() if v}
            out["cells"][str(block.batch)][block.mode]["drops"] = drops
    fit = {}
    for mode in MODES[1:]:
        xs = [float(b) for b in batches]
        for stat in ("hook_median_us", "total_cpu_us"):
            ys = [out["cells"][str(b)][mode][stat] for b in batches]
            slope, intercept = np.polyfit(xs, ys, 1) if len(xs) > 1 else (0.0, ys[0])
            fit[f"{mode}:{stat}"] = {"us_per_request": float(slope),
                                     "intercept_us": float(intercept)}
    out["fit"] = fit
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"µs per step; {result['steps']} steps per mode and batch in {result['rounds']} "
        f"interleaved rounds; device wait {result['wait_us']:.0f} µs ({result['wait']}, GIL "
        "released). "
        "hooks: the 7 calls on the engine thread (wall); step wall: the whole step's wall "
        "time above `off` (hooks, and any wait for the GIL the worker holds); total CPU: "
        f"process CPU of all threads per step, {result['tight_steps']} steps run back to back "
        "and then flushed, median of the rounds. traced: the share of steps traced with the "
        "device wait, and back to back (where max_traced_steps_per_second caps it).", "",
        "| batch | mode | hooks median | hooks mean | step wall above off | total CPU | "
        "hooks median / floor | total CPU / floor | traced, waited / back to back |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in result["batches"]:
        cell = result["cells"][str(b)]
        floor = cell["floor"]["hook_median_us"]
        for mode in MODES[1:]:
            r = cell[mode]
            lines.append(
                f"| {b} | {mode} | {r['hook_median_us']:.2f} | {r['hook_mean_us']:.2f} | "
                f"{r['step_wall_us']:.2f} | {r['total_cpu_us']:.2f} | "
                f"{r['hook_median_us'] / floor:.2f} | "
                f"{r['total_cpu_us'] / cell['floor']['total_cpu_us']:.2f} | "
                f"{100 * r['traced_share_waited']:.2f} % / {100 * r['traced_share_tight']:.2f} % |")
    lines += ["", "Least-squares fit against batch size (µs per request, intercept µs):", ""]
    for name, f in result["fit"].items():
        lines.append(f"- {name}: {f['us_per_request']:.5f} per request, "
                     f"{f['intercept_us']:.2f} at batch 0")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = result["batches"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: list[tuple[str, str, Callable[[dict], float], str]] = [
        ("worker", "engine thread (hooks, median)", lambda r: r["hook_median_us"], "-"),
        ("worker", "total CPU, all threads", lambda r: r["total_cpu_us"], "--"),
        ("inline", "inline consumer: engine thread", lambda r: r["hook_median_us"], ":"),
    ]
    for mode, label, get, style in series:
        ax.plot(xs, [get(result["cells"][str(b)][mode]) for b in xs], style, marker="o",
                label=label)
    ax.plot(xs, [result["cells"][str(b)]["floor"]["hook_median_us"] for b in xs], "k-",
            lw=2, label="floor: 7 timestamps + searchsorted + bincount")
    ax.plot(xs, [result["cells"][str(b)]["floor"]["total_cpu_us"] for b in xs], "k:",
            lw=1.5, label="floor, back to back (the total CPU's reference)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (requests per step), K = 4")
    ax.set_ylabel("µs per decode step")
    ax.set_title("spec_metrics cost per step, default configuration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    p.add_argument("--steps", type=int, default=6000, help="steps per mode and batch")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--wait-us", type=float, default=500.0)
    p.add_argument("--wait", choices=("sleep", "spin"), default="sleep")
    p.add_argument("--tight-steps", type=int, default=20_000,
                   help="steps back to back per mode, batch and round (total CPU)")
    p.add_argument("--json")
    p.add_argument("--plot")
    a = p.parse_args(argv)
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    gc.collect()
    result = run(a.batches, a.steps, a.rounds, a.wait_us, a.wait, a.tight_steps)
    result["machine"] = machine_info()
    result["machine"]["loadavg_1m_before_after"] = [load, os.getloadavg()[0]]
    result["command"] = " ".join(["python", *(sys.argv if argv is None else
                                              ["benchmarks/bench_engine_thread.py", *argv])])
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"{result['command']}  ({result['date']}, {result['elapsed_s']} s)")
    print(markdown(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    if a.plot:
        plot(result, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
