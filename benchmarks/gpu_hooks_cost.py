"""Where the hooks' time goes on a GPU host: the hooks alone, back to back (hot caches), and
the same hooks between bursts of real CUDA launches, as inside an engine (cold caches).

    python benchmarks/gpu_hooks_cost.py [--steps 2000] [--launches 200] [--batch-steps 1,16]
                                        [--json out.json]

Per configuration, each step is 7 hook calls (begin/draft/verify/draft_extend/end) timed as a
whole with perf_counter_ns; in the "engine-like" variant `--launches` small matmuls (one
kernel each) are enqueued before every hook call, so the hooks run the way they do in a
decode loop: after the CPU spent a while in torch's dispatcher. No synchronization happens
inside the timed section; the GPU queue is drained (synchronize) between steps, outside it.
Configurations: timer cpu with numpy counts; timer cpu with CUDA counts (pinned copy +
event per step); timer cuda with CUDA counts (+ 6 events per step); each for every
`--batch-steps` value (steps handed to the sinks one by one, or in hot batches). The mean
is the throughput figure (a batch's processing lands on one step in N).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from spec_metrics import SpecDecodeHooks


def run(timer: str, counts: str, engine_like: bool, steps: int, launches: int,
        batch: int, k: int, batch_steps: int = 1) -> dict[str, Any]:
    hooks = SpecDecodeHooks("bench", registry=CollectorRegistry(), tracing=False, timer=timer,
                            batch_steps=batch_steps)
    if timer == "cuda" or counts == "cuda":
        hooks.warm_up_device(batch)
    rng = np.random.default_rng(0)
    host = [rng.integers(0, k + 1, batch) for _ in range(16)]
    dev = [torch.as_tensor(a, device="cuda") for a in host]
    x = torch.randn(64, 64, device="cuda")

    def work() -> None:
        if engine_like:
            for _ in range(launches):
                torch.mm(x, x)

    per_step = []
    for i in range(steps + 50):
        accepted = dev[i % 16] if counts == "cuda" else host[i % 16]
        torch.cuda.synchronize()
        total = 0
        for call in ("begin", "ds", "de", "vs", "ve", "xs", "xe", "end"):
            work()
            t0 = time.perf_counter_ns()
            if call == "begin":
                hooks.begin_step()
            elif call == "ds":
                hooks.draft_start()
            elif call == "de":
                hooks.draft_end()
            elif call == "vs":
                hooks.verify_start()
            elif call == "ve":
                hooks.verify_end(accepted, k)
            elif call == "xs":
                hooks.draft_extend_start()
            elif call == "xe":
                hooks.draft_extend_end()
            else:
                hooks.end_step()
            total += time.perf_counter_ns() - t0
        if i >= 50:
            per_step.append(total / 1e3)
    hooks.flush()
    return {"timer": timer, "counts": counts, "engine_like": engine_like, "steps": steps,
            "batch_steps": batch_steps, "mean_us": statistics.fmean(per_step),
            "median_us": statistics.median(per_step),
            "p99_us": float(np.percentile(per_step, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-steps", default="1",
                        help="comma-separated batch_steps values to compare (e.g. 1,16)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    print("| calls | timer | counts | batch_steps | mean µs | median µs | p99 µs |")
    print("|---|---|---|---:|---:|---:|---:|")
    for engine_like in (False, True):
        for timer, counts in (("cpu", "numpy"), ("cpu", "cuda"), ("cuda", "cuda")):
            for batch_steps in (int(b) for b in args.batch_steps.split(",")):
                rows.append(run(timer, counts, engine_like, args.steps, args.launches,
                                args.batch, args.k, batch_steps))
                r = rows[-1]
                print(f"| {'engine-like' if engine_like else 'back to back'} | {timer} | "
                      f"{counts} | {batch_steps} | {r['mean_us']:.1f} | {r['median_us']:.1f} | "
                      f"{r['p99_us']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args), "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
