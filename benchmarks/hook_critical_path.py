"""Which part of a graphed engine step do the hooks lengthen? Two identical engines (no
hooks, and hooks in the given mode) alternate step by step; the host phases of each step
are timed, and steps where requests joined (prefill) are set apart.

    python benchmarks/hook_critical_path.py --batch 64 [--mode metrics]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    import torch
    from bench_e2e import build_large_engine, make_hooks

    from spec_metrics.demo.records import EngineConfig

    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mode", default="metrics")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-steps", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--timer", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--max-new", type=int, nargs=2, default=(192, 256))
    p.add_argument("--max-seq", type=int, default=336)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    engines, phases = {}, {}
    for mode in ("off", a.mode):
        hooks, _ = make_hooks(mode, a.batch, 4, "cuda", a.batch_steps, timer=a.timer)
        torch.manual_seed(0)
        cfg = EngineConfig(batch_size=a.batch, k=4, arrival_rate=None, clock="virtual",
                           max_new_tokens=tuple(a.max_new), cuda_graphs=True)
        eng = build_large_engine("cuda", hooks, cfg, 2048, 4, 16, 0.05, a.max_seq, a.dtype)
        eng.run(steps=30)
        cur: dict[str, float] = collections.defaultdict(float)
        phases[mode] = cur

        def wrap(obj, name, key, cur=cur):
            fn = getattr(obj, name)

            def timed(*args, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    cur[key] += time.perf_counter() - t0
            setattr(obj, name, timed)

        # GPU span of the decode stages: an event before the first replay's input copy
        # and one after the last replay, on both engines alike.
        spans = []

        def gpu_marks(g=eng.graphs, spans=spans):
            prepare, extend = g.prepare, g.extend

            def marked_prepare(*args):
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                spans.append([ev, None])
                prepare(*args)

            def marked_extend(*args):
                extend(*args)
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                spans[-1][1] = ev
            g.prepare, g.extend = marked_prepare, marked_extend
        gpu_marks()
        eng.gpu_spans = spans
        wrap(eng, "_admit", "admit")
        wrap(eng, "_bookkeep", "bookkeep")
        if hooks is not None:
            for h in ("begin_step", "draft_start", "draft_end", "verify_start", "verify_end",
                      "draft_extend_start", "draft_extend_end", "end_step"):
                wrap(hooks, h, "hook:" + h)
        engines[mode] = eng
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in engines}
    joins = []
    pc = time.perf_counter
    for i in range(a.steps):
        order = list(engines) if i % 2 else list(engines)[::-1]
        started = {}
        for mode in order:
            eng, cur = engines[mode], phases[mode]
            cur.clear()
            before = eng.counters.requests_started
            torch.cuda.synchronize()
            t0 = pc()
            eng.run(steps=1)
            torch.cuda.synchronize()
            cur["step"] = pc() - t0
            if eng.gpu_spans and eng.gpu_spans[-1][1] is not None:
                a0, a1 = eng.gpu_spans[-1]
                cur["gpu decode span"] = a0.elapsed_time(a1) / 1e3
                eng.gpu_spans.clear()
            started[mode] = eng.counters.requests_started - before
            rows[mode].append(dict(cur))
        joins.append(max(started.values()) > 0)
    print("tokens identical:", len({e.counters.emitted_tokens for e in engines.values()}) == 1)
    for label, sel in (("decode-only steps", False), ("steps with joins", True)):
        idx = [i for i, j in enumerate(joins) if j == sel]
        if not idx:
            continue
        print(f"{label}: {len(idx)}")
        keys = sorted({k for m in rows for i in idx for k in rows[m][i]})
        for k in keys:
            med = {m: statistics.median(rows[m][i].get(k, 0.0) for i in idx) * 1e6
                   for m in rows}
            print(f"  {k:28s} " + "  ".join(f"{m} {v:9.1f} us" for m, v in med.items()))
        diff = [rows[a.mode][i]["step"] / rows["off"][i]["step"] - 1 for i in idx]
        print(f"  paired step loss: median {100 * statistics.median(diff):+.2f}%, "
              f"mean {100 * statistics.fmean(diff):+.2f}% ± "
              f"{100 * statistics.stdev(diff) / len(diff) ** 0.5:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
