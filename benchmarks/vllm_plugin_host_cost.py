"""Host time the vLLM plugin adds to one vLLM iteration, measured without the model.

    .venv-vllm/bin/python benchmarks/vllm_plugin_host_cost.py [--batch 8] [--k 3]
        [--iterations 20000]

A stand-in model runner with vLLM's method names and arguments, whose methods do nothing
but what the plugin reads (a rejection-sampler output tensor on the CPU with placeholders
for rejected tokens, `SpecDecodeMetadata.num_draft_tokens`, the scheduled drafts), is driven
through iterations of `execute_model` + `sample_tokens` (which calls `_sample` and
`propose_draft_token_ids`), once bare and once instrumented by the plugin's
`RunnerInstruments` (metrics; tracing off), interleaved. The difference per iteration is
the plugin's host cost; compare it with vLLM's step time (bench_vllm_plugin.py) for the
share of tokens/s it can cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch

PLACEHOLDER = -1


class StandInRunner:
    def __init__(self, batch: int, k: int) -> None:
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_rank=0),
                                           model_config=None)
        self.speculative_config = SimpleNamespace(method="ngram", num_speculative_tokens=k)
        self.model_config = SimpleNamespace(get_vocab_size=lambda: 512)
        self.device = torch.device("cpu")
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (batch, k + 1), generator=generator, dtype=torch.int32)
        accepted = torch.randint(0, k + 1, (batch,), generator=generator)
        for row in range(batch):
            ids[row, int(accepted[row]) + 1:] = PLACEHOLDER
        self.output = SimpleNamespace(sampled_token_ids=ids)
        self.metadata = SimpleNamespace(num_draft_tokens=[k] * batch)
        self.scheduler_output = SimpleNamespace(
            scheduled_spec_decode_tokens={f"r{i}": [1] * k for i in range(batch)})

    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> None:
        return None

    def _sample(self, logits: Any, spec_decode_metadata: Any) -> Any:
        return self.output

    def propose_draft_token_ids(self, scheduler_output: Any, sampled_token_ids: Any) -> Any:
        return None

    def sample_tokens(self, grammar_output: Any) -> Any:
        output = self._sample(None, self.metadata)
        self.propose_draft_token_ids(self.scheduler_output, output.sampled_token_ids)
        return output


def per_iteration_ns(runner: StandInRunner, iterations: int) -> float:
    execute, sample = runner.execute_model, runner.sample_tokens
    scheduled = runner.scheduler_output
    began = time.perf_counter_ns()
    for _ in range(iterations):
        execute(scheduled)
        sample(None)
    return (time.perf_counter_ns() - began) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from spec_metrics.integrations.vllm_plugin import RunnerInstruments

    bare = StandInRunner(args.batch, args.k)
    instrumented = StandInRunner(args.batch, args.k)
    # The plugin reads vLLM's placeholder id; the stand-in uses the same value.
    import vllm.v1.sample.rejection_sampler as sampler

    assert sampler.PLACEHOLDER_TOKEN_ID == PLACEHOLDER, sampler.PLACEHOLDER_TOKEN_ID
    instruments = RunnerInstruments(instrumented, environ={"SPEC_METRICS_PORT": "0"})
    instruments.wrap()
    costs = []
    for _ in range(args.rounds):
        base = per_iteration_ns(bare, args.iterations)
        with_plugin = per_iteration_ns(instrumented, args.iterations)
        costs.append(with_plugin - base)
    steps = instruments.hooks._steps
    assert steps == args.rounds * args.iterations, steps
    print(json.dumps({"batch": args.batch, "k": args.k,
                      "plugin_ns_per_iteration_median": statistics.median(costs),
                      "min": min(costs), "max": max(costs)}, indent=2))
    instruments.close()


if __name__ == "__main__":
    main()
