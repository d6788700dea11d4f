"""What the hooks add on the device, step by step: the torch profiler over the reference
engine (random-init target, CUDA graphs), one engine per mode, same seeds.

    python benchmarks/gpu_step_profile.py [--batch 1] [--steps 40] [--timer cuda|cpu]
                                          [--json out.json] [--trace-dir DIR]

Per mode it reports the device operations per step by name (kernels, copies, event waits
are not kernels: they show as gaps), and the engine stream's busy time against the span
from a step's first device operation to its last. The difference between a mode and `off`
is what the hooks put on the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from typing import Any, Sequence

import torch
from bench_e2e import build_large_engine, make_hooks
from torch.profiler import ProfilerActivity, profile, record_function

from spec_metrics.demo.records import EngineConfig


def profile_mode(mode: str, args: argparse.Namespace, trace_dir: str | None) -> dict[str, Any]:
    hooks, sink = make_hooks(mode, args.batch, args.k, "cuda", 1, args.timer)
    torch.manual_seed(0)
    config = EngineConfig(batch_size=args.batch, k=args.k, arrival_rate=None, clock="virtual",
                          max_new_tokens=(192, 256), cuda_graphs=True)
    engine = build_large_engine("cuda", hooks, config, d_model=2048, layers=4, heads=16,
                                sigma=0.05, max_seq=336)
    engine.run(steps=40)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                engine.run(steps=1)
        torch.cuda.synchronize()
    if trace_dir:
        prof.export_chrome_trace(f"{trace_dir}/profile_{mode}_b{args.batch}.json")
    steps_cpu = []
    device_ops: dict[str, list[float]] = defaultdict(list)
    spans = []
    busy = []
    events = prof.events()
    step_ranges = [(e.time_range.start, e.time_range.end) for e in events
                   if e.name == "step" and e.device_type.name == "CPU"]
    gpu = sorted((e for e in events if e.device_type.name == "CUDA"),
                 key=lambda e: e.time_range.start)
    for start, end in step_ranges:
        steps_cpu.append(end - start)
    # Group device ops by the step whose CPU range launched them: a device op belongs to
    # the step in which it starts, first op to last op.
    for i, (start, _end) in enumerate(step_ranges):
        nxt = step_ranges[i + 1][0] if i + 1 < len(step_ranges) else float("inf")
        ops = [e for e in gpu if start <= e.time_range.start < nxt]
        if not ops:
            continue
        spans.append(max(e.time_range.end for e in ops) - ops[0].time_range.start)
        busy.append(sum(e.time_range.end - e.time_range.start for e in ops))
        for e in ops:
            device_ops[e.name].append(e.time_range.end - e.time_range.start)
    if hooks is not None:
        hooks.close()
    if sink is not None:
        sink.close()
    n = max(1, len(spans))
    return {
        "mode": mode, "steps": len(spans),
        "step_cpu_us_median": statistics.median(steps_cpu) if steps_cpu else None,
        "device_span_us_median": statistics.median(spans) if spans else None,
        "device_busy_us_median": statistics.median(busy) if busy else None,
        "device_ops_per_step": {name: {"count": len(v) / n, "us_per_step": sum(v) / n}
                                for name, v in sorted(device_ops.items(),
                                                      key=lambda kv: -sum(kv[1]))},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--timer", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--modes", nargs="+", default=["off", "metrics", "metrics+tracing"])
    parser.add_argument("--json")
    parser.add_argument("--trace-dir")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = [profile_mode(mode, args, args.trace_dir) for mode in args.modes]
    for r in results:
        print(f"## {r['mode']} (batch {args.batch}, timer {args.timer}): step CPU "
              f"{r['step_cpu_us_median']:.0f} us, device span {r['device_span_us_median']:.0f} "
              f"us, device busy {r['device_busy_us_median']:.0f} us (medians over "
              f"{r['steps']} steps)")
        for name, v in list(r["device_ops_per_step"].items())[:25]:
            print(f"  {v['count']:6.1f} x {v['us_per_step']:9.1f} us  {name[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "timer": args.timer, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
