"""End-to-end benchmark: the reference engine's tokens/s with instrumentation off vs on.

    python benchmarks/bench_e2e.py [--device cpu] [--batch 8] [--k 4] [--steps 60]
        [--rounds 25] [--json benchmarks/results/e2e_cpu.json]

One engine per mode, built alike (same cached target, same seed, closed loop with the batch
kept full, virtual clock), so every engine runs exactly the same steps and emits exactly the
same tokens (checked). Modes: `off` (hooks=None: the engine skips every hook call), then our
hooks `disabled`, `metrics`, `metrics+tracing` (the defaults: ratio 0.01, outlier capture,
exemplars) and `metrics+tracing@1.0`, the tracing modes into a real SDK TracerProvider +
BatchSpanProcessor + no-op exporter.

Small shared VMs drift in speed by up to 1.5x for seconds at a time, so the modes run
interleaved: `--rounds` rounds, each running every engine for `--steps` steps, in an order
rotated every round. Many short rounds (default 25 x 60 steps, ~0.6 s per run on a 2-core
CPU) pair each mode with an `off` run a few seconds away, which tracks the drift better than
a few long rounds. Tokens/s = emitted tokens (accepted + 1 per request per step) / wall
time of the run. The loss against `off` is computed per round (paired with the `off` run of
the same round) and reported as mean ± standard deviation over rounds.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_hooks import MODES, SpanSink, report  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from spec_metrics import SpecDecodeHooks  # noqa: E402

MODE_NAMES = ("off", *MODES)  # off, disabled, metrics, metrics+tracing, metrics+tracing@1.0


def make_hooks(mode: str, batch: int, k: int, device: str,
               batch_steps: int = 1, timer: str | None = None) -> tuple[Any, SpanSink | None]:
    if mode == "off":
        return None, None
    options = MODES[mode]
    traced = options.get("enabled", True) and options.get("tracing", True)
    sink = SpanSink() if traced else None
    hooks = SpecDecodeHooks(
        "draft_model", labels={"model": "tiny-gpt", "engine": "bench_e2e"},
        registry=CollectorRegistry(), tracer_provider=sink.provider if sink else None,
        max_draft_tokens=max(8, k),
        timer=timer or ("cuda" if device == "cuda" else "cpu"),
        batch_steps=batch_steps, **options)
    if device == "cuda" and options.get("enabled", True):
        hooks.warm_up_device(batch)  # pinned buffers at start-up, as the demo does
    return hooks, sink


class TimedHooks:
    """Wraps a hooks object; sums the wall time spent inside its calls (engine thread)."""

    def __init__(self, hooks: Any) -> None:
        self._hooks, self.ns, self.calls = hooks, 0, 0

    def __getattr__(self, name: str) -> Any:
        fn, pc = getattr(self._hooks, name), time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = pc()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns += pc() - t0
                self.calls += 1
        return timed


def hook_time_per_step(engines: dict[str, Any], steps: int) -> dict[str, dict[str, float]]:
    """Drift-proof view of the same cost: time inside the hook calls per step, in the real
    engine, against that pass's own step time (after the interleaved rounds)."""
    pc = time.perf_counter_ns
    t0 = pc()
    for _ in range(1000):
        pc()
    pair = (pc() - t0) / 1001  # ~ one perf_counter_ns call: the part of the pair inside
    out = {}
    for mode, eng in engines.items():
        if eng.hooks is None:
            continue
        inner = eng.hooks
        eng.hooks = wrapped = TimedHooks(inner)
        t0 = time.perf_counter()
        eng.run(steps=steps)
        wall = time.perf_counter() - t0
        eng.hooks = inner
        hook_us = (wrapped.ns - wrapped.calls * pair) / steps / 1e3
        out[mode] = {"hook_us_per_step": hook_us, "calls_per_step": wrapped.calls / steps,
                     "step_ms": wall / steps * 1e3,
                     "hook_share_pct": 100.0 * hook_us / (wall / steps * 1e6)}
    return out


def build_large_engine(device: str, hooks: Any, config: Any, d_model: int, layers: int,
                       heads: int, sigma: float, max_seq: int = 192,
                       dtype: str = "float32") -> Any:
    """A randomly initialised target of the demo's architecture, large enough that a step
    takes milliseconds on a GPU (training it is not the point: the benchmark measures the
    hooks against the step, and every mode runs the same seeded weights)."""
    import torch

    from spec_metrics.demo.drafters import ModelDrafter
    from spec_metrics.demo.engine import Engine
    from spec_metrics.demo.models import GPT, GPTConfig

    torch.manual_seed(1234)
    cfg = GPTConfig(d_model=d_model, n_layer=layers, n_head=heads, max_seq=max_seq)
    target = GPT(cfg).eval().requires_grad_(False).to(device, getattr(torch, dtype))
    drafter = ModelDrafter(target, sigma=sigma, seed=0, k=config.k)
    return Engine(target, drafter, config, hooks=hooks)


def run_bench(device: str, batch: int, k: int, steps: int, rounds: int, warmup: int,
              attribution_steps: int = 300, large: dict[str, Any] | None = None,
              batch_steps: int = 1, cuda_graphs: bool = False,
              max_new: tuple[int, int] = (32, 64), interleave: str = "run",
              timer: str | None = None) -> dict[str, Any]:
    import torch

    from spec_metrics.demo.factory import build_engine
    from spec_metrics.demo.records import EngineConfig

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what a serving stack would run

    engines: dict[str, Any] = {}
    sinks: dict[str, SpanSink | None] = {}
    hooks_of: dict[str, Any] = {}
    for mode in MODE_NAMES:
        hooks, sink = make_hooks(mode, batch, k, device, batch_steps, timer)
        torch.manual_seed(0)
        config = EngineConfig(batch_size=batch, k=k, arrival_rate=None, clock="virtual",
                              max_new_tokens=max_new, cuda_graphs=cuda_graphs)
        if large:
            if device == "cpu":
                torch.set_num_threads(1)
            engines[mode] = build_large_engine(device, hooks, config, **large)
        else:
            engines[mode] = build_engine("model", device=device, hooks=hooks, config=config,
                                         num_threads=1 if device == "cpu" else None)
        sinks[mode], hooks_of[mode] = sink, hooks
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(mode: str, n: int) -> tuple[float, int, int]:
        eng = engines[mode]
        before = eng.counters.emitted_tokens
        sync()
        t0 = time.perf_counter()
        eng.run(steps=n)
        sync()
        wall = time.perf_counter() - t0
        return wall, eng.counters.emitted_tokens - before, n

    for mode in MODE_NAMES:  # warm-up: JIT-free, but caches, allocator, outlier window
        timed(mode, warmup)
    per_round: dict[str, list[dict[str, float]]] = {m: [] for m in MODE_NAMES}
    step_s: dict[str, list[float]] = {m: [] for m in MODE_NAMES}  # interleave="step" only
    joined: list[bool] = []  # per step: did requests join (a prefill ran) in any mode?
    diverged = 0  # steps whose work (joins, emitted tokens) differed between modes
    order = list(MODE_NAMES)
    pc = time.perf_counter
    for r in range(rounds):
        rot = order[r % len(order):] + order[:r % len(order)]
        gc.collect()
        if interleave == "run":
            for mode in rot:
                wall, tokens, n = timed(mode, steps)
                per_round[mode].append({"wall_s": wall, "tokens": tokens, "steps": n,
                                        "tokens_per_s": tokens / wall,
                                        "step_ms": wall / n * 1e3})
        else:
            # Step i of every engine does the same work (same seed, same tokens), so
            # timing the modes' step i back to back pairs identical work seconds apart.
            before = {m: engines[m].counters.emitted_tokens for m in MODE_NAMES}
            walls = dict.fromkeys(MODE_NAMES, 0.0)
            for i in range(steps):
                j = (r * steps + i) % len(order)
                work = set()
                for mode in order[j:] + order[:j]:
                    c = engines[mode].counters
                    started, emitted = c.requests_started, c.emitted_tokens
                    sync()
                    t0 = pc()
                    engines[mode].run(steps=1)
                    sync()
                    dt = pc() - t0
                    walls[mode] += dt
                    step_s[mode].append(dt)
                    work.add((c.requests_started - started, c.emitted_tokens - emitted))
                joined.append(any(n > 0 for n, _ in work))
                diverged += len(work) > 1
            for mode in MODE_NAMES:
                tokens = engines[mode].counters.emitted_tokens - before[mode]
                per_round[mode].append({"wall_s": walls[mode], "tokens": tokens,
                                        "steps": steps, "tokens_per_s": tokens / walls[mode],
                                        "step_ms": walls[mode] / steps * 1e3})
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{m} {per_round[m][-1]['tokens_per_s']:.0f}" for m in MODE_NAMES) + " tok/s",
            file=sys.stderr, flush=True)

    attribution = hook_time_per_step(engines, attribution_steps) if attribution_steps else {}
    tokens_equal = all(
        len({per_round[m][r]["tokens"] for m in MODE_NAMES}) == 1 for r in range(rounds))
    off = [x["tokens_per_s"] for x in per_round["off"]]
    rows = []
    for mode in MODE_NAMES:
        tps = [x["tokens_per_s"] for x in per_round[mode]]
        loss = [100.0 * (1.0 - t / o) for t, o in zip(tps, off)]
        pooled = sum(x["tokens"] for x in per_round[mode]) / sum(
            x["wall_s"] for x in per_round[mode])
        row = {
            "mode": mode, "rounds": rounds, "steps_per_round": steps,
            "tokens_per_s_mean": statistics.fmean(tps),
            "tokens_per_s_sd": statistics.stdev(tps) if rounds > 1 else 0.0,
            "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "tokens_per_s_pooled": pooled,
            "step_ms_median": statistics.median(x["step_ms"] for x in per_round[mode]),
            "loss_pct_mean": statistics.fmean(loss),
            "loss_pct_sd": statistics.stdev(loss) if rounds > 1 else 0.0,
            "loss_pct_median": statistics.median(loss),
            "loss_pct_sem": (statistics.stdev(loss) / len(loss) ** 0.5) if rounds > 1 else 0.0,
            "loss_pct_min": min(loss), "loss_pct_max": max(loss),
            "loss_pct_pooled": 100.0 * (1.0 - pooled / (
                sum(x["tokens"] for x in per_round["off"])
                / sum(x["wall_s"] for x in per_round["off"]))),
            "per_round": per_round[mode],
        }
        if step_s[mode] and mode != "off":
            paired = [100.0 * (t / o - 1.0) for t, o in zip(step_s[mode], step_s["off"])]
            row["step_paired_loss_pct_mean"] = statistics.fmean(paired)
            row["step_paired_loss_pct_sem"] = (statistics.stdev(paired) / len(paired) ** 0.5
                                               if len(paired) > 1 else 0.0)
            row["step_paired_loss_pct_median"] = statistics.median(paired)
            row["total_time_loss_pct"] = 100.0 * (sum(step_s[mode]) / sum(step_s["off"]) - 1)
            decode = [x for x, j in zip(paired, joined) if not j]
            if len(decode) > 1:
                row["decode_steps"] = len(decode)
                row["decode_paired_loss_pct_mean"] = statistics.fmean(decode)
                row["decode_paired_loss_pct_sem"] = statistics.stdev(decode) / len(decode) ** 0.5
                row["decode_paired_loss_pct_median"] = statistics.median(decode)
        sink = sinks[mode]
        if hooks_of[mode] is not None:
            hooks_of[mode].close()
        if sink is not None:
            row["spans"] = sink.close()
        rows.append(row)
    c = engines["off"].counters
    return {"device": device, "batch": batch, "k": k, "steps_per_round": steps,
            "batch_steps": batch_steps, "cuda_graphs": cuda_graphs,
            "timer": timer or ("cuda" if device == "cuda" else "cpu"), "max_new_tokens": max_new,
            "interleave": interleave, "steps_with_different_work": diverged,
            "target": ({"untrained": True, **large} if large else
                       {"untrained": False, "model": "demo default (trained, cached)"}),
            "rounds": rounds, "warmup_steps": warmup, "tokens_identical_across_modes":
            tokens_equal, "acceptance_rate": c.acceptance_rate,
            "emitted_per_request_step": c.mean_emitted_per_verify, "rows": rows,
            "hook_time_per_step": attribution, "attribution_steps": attribution_steps}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Reference engine on {result['device']}, batch {result['batch']}, K {result['k']}, "
        f"target {_target_text(result.get('target'))}, "
        f"hooks batch_steps {result.get('batch_steps', 1)}, "
        f"timer {result.get('timer', 'cuda' if result['device'] == 'cuda' else 'cpu')}, "
        f"{'CUDA graphs' if result.get('cuda_graphs') else 'eager'} decode, "
        f"modes interleaved by {result.get('interleave', 'run')}, "
        f"max_new_tokens {tuple(result.get('max_new_tokens', (32, 64)))}; "
        f"{result['rounds']} interleaved rounds × {result['steps_per_round']} steps per mode; "
        f"acceptance {result['acceptance_rate']:.2f}, "
        f"{result['emitted_per_request_step']:.2f} tokens per request-step; emitted tokens "
        f"identical across modes: {result['tokens_identical_across_modes']}.",
        "",
        "| mode | tokens/s mean ± sd | min–max | step ms (median) | loss vs off, % "
        "(mean ± sd of paired rounds) | ± s.e.m. | median paired loss, % | "
        "paired loss min–max, % | pooled loss, % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        loss = ("—" if r["mode"] == "off" else
                f"{r['loss_pct_mean']:+.2f} ± {r['loss_pct_sd']:.2f}")
        span = ("—" if r["mode"] == "off" else
                f"{r['loss_pct_min']:+.2f} … {r['loss_pct_max']:+.2f}")
        pooled = "—" if r["mode"] == "off" else f"{r['loss_pct_pooled']:+.2f}"
        sem = "—" if r["mode"] == "off" else f"{r['loss_pct_sem']:.2f}"
        med = "—" if r["mode"] == "off" else f"{r['loss_pct_median']:+.2f}"
        lines.append(
            f"| {r['mode']} | {r['tokens_per_s_mean']:.0f} ± {r['tokens_per_s_sd']:.0f} | "
            f"{r['tokens_per_s_min']:.0f}–{r['tokens_per_s_max']:.0f} | "
            f"{r['step_ms_median']:.2f} | {loss} | {sem} | {med} | {span} | {pooled} |")
    lines += ["", "Positive loss = slower than off."]
    if result.get("interleave") == "step":
        lines += ["", "Step by step: every mode's step i (the same work in every engine) timed "
                  "back to back between device syncs, in an order rotated every step. "
                  "Loss = step time over `off`'s step time, minus 1. Steps whose work "
                  f"differed between modes: {result.get('steps_with_different_work', 0)}.",
                  "",
                  "| mode | paired step loss, % (mean ± s.e.m.) | median, % | "
                  "total-time loss, % | steps without joins | their loss, % (mean ± s.e.m.) "
                  "| their median, % |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            if "step_paired_loss_pct_mean" in r:
                lines.append(f"| {r['mode']} | {r['step_paired_loss_pct_mean']:+.2f} ± "
                             f"{r['step_paired_loss_pct_sem']:.2f} | "
                             f"{r['step_paired_loss_pct_median']:+.2f} | "
                             f"{r['total_time_loss_pct']:+.2f} | "
                             + (f"{r['decode_steps']} | {r['decode_paired_loss_pct_mean']:+.2f} ± "
                                f"{r['decode_paired_loss_pct_sem']:.2f} | "
                                f"{r['decode_paired_loss_pct_median']:+.2f} |"
                                if "decode_steps" in r else "— | — | — |"))
    if result.get("hook_time_per_step"):
        lines += ["", f"Time inside the hook calls, measured in the engine "
                  f"({result['attribution_steps']} more steps per mode, each call wrapped in "
                  "a perf_counter_ns pair; includes the wrapper's call, ~0.1 µs per call):", "",
                  "| mode | hook calls/step | µs in hooks per step | step ms | share of step |",
                  "|---|---:|---:|---:|---:|"]
        for mode, a in result["hook_time_per_step"].items():
            lines.append(f"| {mode} | {a['calls_per_step']:.0f} | {a['hook_us_per_step']:.1f} | "
                         f"{a['step_ms']:.2f} | {a['hook_share_pct']:.2f}% |")
    return "\n".join(lines)


def _target_text(target: dict[str, Any] | None) -> str:
    if not target or not target.get("untrained"):
        return "the demo's trained model"
    return (f"random-init {target.get('dtype', 'float32')} d_model {target['d_model']} × "
            f"{target['layers']} layers ({target['heads']} heads), draft = target + noise "
            f"sigma {target['sigma']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--attribution-steps", type=int, default=300,
                        help="extra steps per mode timing the hook calls inside the engine")
    parser.add_argument("--d-model", type=int,
                        help="use a random-init target this wide instead of the demo's model")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--sigma", type=float, default=0.05, help="draft weight noise")
    parser.add_argument("--batch-steps", type=int, default=1,
                        help="hooks' batch_steps (steps handed to the sinks N at a time)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the decode stages as captured CUDA graphs, as serving "
                        "engines do (greedy, model drafter, full batch)")
    parser.add_argument("--max-new", type=int, nargs=2, default=(32, 64), metavar=("LO", "HI"),
                        help="tokens generated per request, uniform in [LO, HI]")
    parser.add_argument("--max-seq", type=int, default=192,
                        help="random-init target's context (>= 64 + HI + k)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="random-init target's dtype")
    parser.add_argument("--interleave", default="run", choices=("run", "step"),
                        help="run: each mode runs --steps steps in turn; step: the modes "
                        "alternate every step, each step timed between device syncs")
    parser.add_argument("--timer", choices=("cpu", "cuda"),
                        help="the hooks' stage timer (default: cuda on cuda, else cpu)")
    parser.add_argument("--json", help="write the results and machine info here")
    args = parser.parse_args(argv)
    large = (dict(d_model=args.d_model, layers=args.layers, heads=args.heads, sigma=args.sigma,
                  max_seq=args.max_seq, dtype=args.dtype) if args.d_model else None)
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    result = run_bench(args.device, args.batch, args.k, args.steps, args.rounds, args.warmup,
                       args.attribution_steps, large, args.batch_steps, args.cuda_graphs,
                       tuple(args.max_new), args.interleave, args.timer)
    report(result, markdown(result), "bench_e2e.py", argv, started, load_before, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
