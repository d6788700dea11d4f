"""The reference engine with CUDA-graphed decode stages (``EngineConfig.cuda_graphs``).

The CUDA tests run only where torch sees a GPU (the lent H100); the argument checks run
everywhere."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import spec_metrics
from spec_metrics.demo.drafters import ModelDrafter, NgramDrafter
from spec_metrics.demo.engine import Engine
from spec_metrics.demo.models import GPT, plain_greedy_generate
from spec_metrics.demo.records import EngineConfig

MAX_NEW = 40
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _config(**kw) -> EngineConfig:
    base = dict(batch_size=3, k=3, arrival_rate=None, num_requests=0, clock="virtual",
                prompt_len=(1, 64), max_new_tokens=(1, MAX_NEW), cuda_graphs=True)
    return EngineConfig(**{**base, **kw})


def test_graphs_refuse_a_cpu_target(target: GPT) -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(target, ModelDrafter(target), _config())


def test_graphs_refuse_sampling(target: GPT) -> None:
    with pytest.raises(ValueError, match="greedy decoding"):
        Engine(target, ModelDrafter(target), _config(temperature=1.0))


def _copy_to_cuda(target: GPT) -> GPT:
    model = GPT(target.cfg).requires_grad_(False).eval()
    model.load_state_dict(target.state_dict())
    return model.cuda()


def _count_replays(stages, name: str) -> list[int]:
    """Wrap one stage of `stages` so its calls are counted in the returned one-item list."""
    calls, replay = [0], getattr(stages, name)

    def counted(*args):
        calls[0] += 1
        return replay(*args)

    setattr(stages, name, counted)
    return calls


@needs_cuda
def test_graphs_refuse_the_ngram_drafter(target: GPT) -> None:
    with pytest.raises(ValueError, match="model drafter only"):
        Engine(_copy_to_cuda(target), NgramDrafter(), _config())


@needs_cuda
def test_graphed_engine_is_token_identical_to_plain_greedy(target: GPT,
                                                           prompts: list[list[int]]) -> None:
    """Rows join and leave (batch 3 < 7 requests): caches are compacted and prefilled
    between replays, and the last steps, with fewer rows than the batch, run eagerly."""
    model = _copy_to_cuda(target)
    reference = [plain_greedy_generate(model, p, MAX_NEW, eos_id=0) for p in prompts]
    eng = Engine(model, ModelDrafter(model), _config())
    drafts = _count_replays(eng.graphs, "draft")
    reqs = [eng.submit(p, MAX_NEW) for p in prompts]
    counters = eng.run()
    assert [r.output for r in reqs] == reference
    assert 0 < drafts[0] < counters.steps  # graphed while full, eager at the tail
    assert counters.acceptance_rate > 0.5


@needs_cuda
def test_graphed_engine_metrics_equal_its_counters(target: GPT) -> None:
    registry = CollectorRegistry()
    hooks = spec_metrics.SpecDecodeHooks("draft_model", registry=registry, tracing=False,
                                         max_draft_tokens=4, timer="cuda", strict=True)
    model = _copy_to_cuda(target)
    eng = Engine(model, ModelDrafter(model), EngineConfig(
        batch_size=8, k=4, arrival_rate=None, clock="virtual", seed=2, cuda_graphs=True),
        hooks=hooks)
    verifies = _count_replays(eng.graphs, "verify")
    try:
        counters = eng.run(steps=60)
        hooks.flush()
        text = generate_latest(registry).decode()
    finally:
        hooks.close()
    assert verifies[0] == 60  # closed loop: the batch stays full, every step replayed
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample: str, **labels: str) -> float:
        found = [s.value for s in families[family].samples if s.name == sample
                 and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (sample, labels, found)
        return found[0]

    assert value("spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total",
                 method="draft_model") == counters.accepted_tokens
    assert value("spec_decode_emitted_tokens", "spec_decode_emitted_tokens_total",
                 method="draft_model") == counters.emitted_tokens
    for p in range(4):
        assert value("spec_decode_accepted_tokens_per_position",
                     "spec_decode_accepted_tokens_per_position_total", method="draft_model",
                     position=str(p)) == counters.accepted_per_pos[p]
