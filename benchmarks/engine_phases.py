"""Where a reference-engine step's wall time goes (host phases), to tell host-bound from
GPU-bound configurations apart.

    python benchmarks/engine_phases.py --d-model 2048 --layers 4 --batch 64 [--cuda-graphs]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    import torch
    from bench_e2e import build_large_engine

    from spec_metrics.demo.records import EngineConfig

    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--max-new", type=int, nargs=2, default=(32, 64))
    p.add_argument("--max-seq", type=int, default=192)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = EngineConfig(batch_size=a.batch, k=4, arrival_rate=None, clock="virtual",
                       max_new_tokens=tuple(a.max_new), cuda_graphs=a.cuda_graphs)
    eng = build_large_engine("cuda", None, cfg, a.d_model, a.layers, a.heads, 0.05, a.max_seq,
                             a.dtype)
    spent: dict[str, float] = collections.defaultdict(float)
    pc = time.perf_counter

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = pc()
            try:
                return fn(*args, **kw)
            finally:
                spent[name] += pc() - t0
        return wrapper

    eng.run(steps=20)
    eng._admit = timed("admit (prefill)", eng._admit)
    eng._bookkeep = timed("bookkeep", eng._bookkeep)
    eng._retire = timed("retire (compact)", eng._retire)
    torch.cuda.synchronize()
    t0 = pc()
    c0 = eng.counters.copy()
    eng.run(steps=a.steps)
    torch.cuda.synchronize()
    wall = pc() - t0
    c = eng.counters
    print(f"step {wall / a.steps * 1e3:.2f} ms; joined {c.requests_started - c0.requests_started}"
          f" requests in {a.steps} steps")
    for k, v in spent.items():
        print(f"  {k}: {v / a.steps * 1e3:.2f} ms/step")
    # GPU time of the decode part alone: CUDA events around one step without bookkeeping
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if eng.graphs is not None and len(eng.rows) == a.batch:
        g = eng.graphs
        torch.cuda.synchronize()
        t0 = pc()
        s.record()
        for _ in range(20):
            for graph in g._graphs:  # draft, verify, draft_extend
                graph.replay()
        e.record()
        host = (pc() - t0) / 20
        torch.cuda.synchronize()
        print(f"graph replays only: GPU {s.elapsed_time(e) / 20:.2f} ms/step, "
              f"host enqueue {host * 1e3:.3f} ms/step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        eng.run(steps=10)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
