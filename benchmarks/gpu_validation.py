"""GPU validation of the hooks on the reference engine (run on a CUDA machine):

    python benchmarks/gpu_validation.py --json gpu_validation.json

1. Timing: stage durations from CUDA events (timer="cuda", read later without
   synchronizing) against a synchronized reference: the device is synchronized right
   before each stage's start hook and right before its end hook, and the wall time
   between the two synchronizations is the reference (the hooks' own CPU work, such as
   queueing the copy of the accepted counts, is not stage work and lies outside both).
2. Synchronizations: the engine's steps are profiled with and without the hooks; the
   CUDA runtime's synchronize calls per step must be the same (the engine itself makes one
   per step, its bookkeeping copy). Every hook call also runs under
   torch.cuda.set_sync_debug_mode("error").
Two targets: the demo's trained tiny model, and a wider random-init one whose steps take
milliseconds of device time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

import spec_metrics
from spec_metrics.catalog import STAGES
from spec_metrics.demo.drafters import ModelDrafter
from spec_metrics.demo.engine import Engine
from spec_metrics.demo.factory import build_engine
from spec_metrics.demo.models import GPT, GPTConfig
from spec_metrics.demo.records import EngineConfig

_HOOKS = ("begin_step", "draft_start", "draft_end", "verify_start", "verify_end",
          "draft_extend_start", "draft_extend_end", "end_step")


class SyncReference:
    """Wraps the real hooks: synchronizes before each start and end hook (outside the
    real hook) and keeps the wall time between the two synchronizations."""

    def __init__(self, hooks: spec_metrics.SpecDecodeHooks) -> None:
        self._hooks = hooks
        self.reference: dict[int, list[list[float]]] = {}  # step index -> per stage seconds
        self._starts = [0] * len(STAGES)
        self._step: list[float] = [float("nan")] * len(STAGES)
        self._index = 0

    def begin_step(self, **kwargs: Any) -> None:
        self._step = [float("nan")] * len(STAGES)
        self._hooks.begin_step(**kwargs)

    def end_step(self) -> None:
        self._hooks.end_step()
        self.reference[self._index] = self._step
        self._index += 1

    def _start(self, stage: int, call: Any, *args: Any) -> None:
        torch.cuda.synchronize()
        self._starts[stage] = time.perf_counter_ns()
        call(*args)

    def _end(self, stage: int, call: Any, *args: Any) -> None:
        torch.cuda.synchronize()
        self._step[stage] = (time.perf_counter_ns() - self._starts[stage]) / 1e9
        call(*args)

    def draft_start(self) -> None:
        self._start(0, self._hooks.draft_start)

    def draft_end(self) -> None:
        self._end(0, self._hooks.draft_end)

    def verify_start(self) -> None:
        self._start(1, self._hooks.verify_start)

    def verify_end(self, accepted: Any, draft_tokens: Any) -> None:
        self._end(1, self._hooks.verify_end, accepted, draft_tokens)

    def draft_extend_start(self) -> None:
        self._start(2, self._hooks.draft_extend_start)

    def draft_extend_end(self) -> None:
        self._end(2, self._hooks.draft_extend_end)


class SyncForbidden:
    """Runs every hook call under set_sync_debug_mode("error"): a sync inside raises."""

    def __init__(self, hooks: spec_metrics.SpecDecodeHooks) -> None:
        self._hooks = hooks
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._hooks, name)
        if name not in _HOOKS:
            return method

        def guarded(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self.calls += 1
        return guarded


def _engine(kind: str, hooks: Any, batch: int, k: int) -> Engine:
    config = EngineConfig(batch_size=batch, k=k, arrival_rate=None, seed=0)
    if kind == "tiny":
        return build_engine("model", device="cuda", hooks=hooks, config=config)
    # Wider random-init target: timing only (its acceptance means nothing).
    torch.manual_seed(0)
    target = GPT(GPTConfig(d_model=1024, n_layer=8, n_head=16)).to("cuda").eval()
    return Engine(target, ModelDrafter(target, sigma=0.05, k=k), config, hooks=hooks)


def timing_agreement(kind: str, steps: int, batch: int, k: int) -> dict:
    results: list[Any] = []
    hooks = spec_metrics.SpecDecodeHooks("draft_model", registry=CollectorRegistry(),
                                         tracing=False, timer="cuda", max_draft_tokens=8,
                                         on_step=results.append)
    hooks.warm_up_device(batch)
    wrapper = SyncReference(hooks)
    engine = _engine(kind, wrapper, batch, k)
    engine.run(steps=20)  # warm-up: kernels compiled, caches filled
    results.clear()
    engine.run(steps=steps)
    hooks.flush()
    table: dict = {}
    for stage_index, stage in enumerate(STAGES):
        events, refs = [], []
        for result in results:
            ref = wrapper.reference[result.index][stage_index]
            if result.stage_seconds[stage_index] is not None and ref == ref:
                events.append(result.stage_seconds[stage_index])
                refs.append(ref)
        events_a, refs_a = np.asarray(events), np.asarray(refs)
        relative = (events_a - refs_a) / refs_a
        table[stage] = {
            "steps": len(events),
            "event_ms_median": float(np.median(events_a) * 1e3),
            "reference_ms_median": float(np.median(refs_a) * 1e3),
            "relative_error_median": float(np.median(relative)),
            "relative_error_p95_abs": float(np.percentile(np.abs(relative), 95)),
            "sum_ratio": float(events_a.sum() / refs_a.sum()),
        }
    return table


def sync_counts(kind: str, steps: int, batch: int, k: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label in ("without hooks", "with hooks"):
        guard = None
        if label == "with hooks":
            hooks = spec_metrics.SpecDecodeHooks("draft_model", registry=CollectorRegistry(),
                                                 trace_ratio=0.2, timer="cuda",
                                                 max_draft_tokens=8)
            hooks.warm_up_device(batch)
            guard = SyncForbidden(hooks)
        engine = _engine(kind, guard, batch, k)
        engine.run(steps=20)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.run(steps=steps)
        syncs = sum(e.count for e in prof.key_averages() if "Synchronize" in e.key)
        out[label] = {"steps": steps, "synchronize_calls": syncs,
                      "per_step": syncs / steps,
                      "hook_calls_under_error_mode": guard.calls if guard else 0}
        if guard is not None:
            guard._hooks.flush()
    out["added_by_hooks_per_step"] = (out["with hooks"]["per_step"]
                                      - out["without hooks"]["per_step"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--skip-syncs", action="store_true", help="timing agreement only")
    args = parser.parse_args()
    report: dict = {
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "command": "python benchmarks/gpu_validation.py "
                   f"--steps {args.steps} --batch-size {args.batch_size} --k {args.k}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for kind in ("tiny", "wide"):
        began = time.monotonic()
        report[kind] = {"timing": timing_agreement(kind, args.steps, args.batch_size, args.k)}
        if not args.skip_syncs:
            report[kind]["syncs"] = sync_counts(kind, min(args.steps, 100), args.batch_size,
                                                args.k)
        print(f"{kind}: {time.monotonic() - began:.0f} s", flush=True)
    print(f"{report['machine']}  {report['command']}  {report['date']}")
    print("| target | stage | event ms (median) | synced ref ms (median) | median rel. error "
          "| p95 abs rel. error | sum ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind in ("tiny", "wide"):
        for stage, row in report[kind]["timing"].items():
            print(f"| {kind} | {stage} | {row['event_ms_median']:.3f} | "
                  f"{row['reference_ms_median']:.3f} | {row['relative_error_median']:+.2%} | "
                  f"{row['relative_error_p95_abs']:.2%} | {row['sum_ratio']:.4f} |")
    for kind in ("tiny", "wide") if not args.skip_syncs else ():
        s = report[kind]["syncs"]
        print(f"{kind}: synchronize calls per step without hooks "
              f"{s['without hooks']['per_step']:.2f}, with hooks {s['with hooks']['per_step']:.2f}"
              f" (added {s['added_by_hooks_per_step']:+.2f}); "
              f"{s['with hooks']['hook_calls_under_error_mode']} hook calls ran under "
              "sync_debug_mode('error') without an error")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
