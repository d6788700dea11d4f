"""Greedy speculative decoding must be token-identical to plain greedy decoding."""

from __future__ import annotations

import pytest
import torch

from spec_metrics.demo.drafters import ModelDrafter, NgramDrafter
from spec_metrics.demo.engine import Engine
from spec_metrics.demo.factory import generate
from spec_metrics.demo.models import GPT, plain_greedy_generate
from spec_metrics.demo.records import EngineConfig

MAX_NEW = 40


@pytest.fixture(scope="module")
def reference(target: GPT, prompts: list[list[int]]) -> list[list[int]]:
    return [plain_greedy_generate(target, p, MAX_NEW, eos_id=0) for p in prompts]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kind", ["model", "model-collapsed", "ngram", "ngram-collapsed"])
def test_greedy_identity_static_batch(target: GPT, prompts: list[list[int]],
                                      reference: list[list[int]], kind: str, k: int) -> None:
    drafter = ModelDrafter(target) if kind.startswith("model") else NgramDrafter()
    if kind.endswith("collapsed"):
        drafter.collapse()  # garbage drafts: still the same output, just slower
    outs, counters = generate(target, drafter, prompts, MAX_NEW, k=k)
    assert outs == reference
    assert counters.steps < sum(len(r) for r in reference)  # batched, not 1 req/step
    if kind == "model" and k == 4:
        assert counters.acceptance_rate > 0.5  # the test actually exercises acceptance


def test_greedy_identity_continuous_batching(target: GPT, prompts: list[list[int]],
                                             reference: list[list[int]]) -> None:
    """Rows join and leave mid-run (batch 3 < 7 requests): caches are compacted
    and prefilled in between, and outputs must still match exactly."""
    cfg = EngineConfig(batch_size=3, k=3, arrival_rate=None, num_requests=0, clock="virtual",
                       prompt_len=(1, 64), max_new_tokens=(1, MAX_NEW))
    eng = Engine(target, ModelDrafter(target), cfg)
    reqs = [eng.submit(p, MAX_NEW) for p in prompts]
    eng.run()
    assert [r.output for r in reqs] == reference
    assert all(r.finish_reason in ("eos", "length") for r in reqs)


def test_reference_is_consistent_with_cached_forward(target: GPT) -> None:
    """KV-cached ragged forward == full recompute (sanity for the identity tests)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 97, (3, 30), generator=g)
    with torch.no_grad():
        full = target(x)
        cache = target.new_cache(3, 40)
        # rows advance by different amounts: ragged lengths inside one batch
        cut = [7, 12, 1]
        first = torch.zeros(3, dtype=torch.long)
        pad = torch.zeros(3, max(cut), dtype=torch.long)
        for i, c in enumerate(cut):
            pad[i, :c] = x[i, :c]
        target(pad, cache, first, 0, max(cut))
        start = torch.tensor(cut)
        rest = torch.stack([x[i, c:c + 10] for i, c in enumerate(cut)])
        out = target(rest, cache, start, 0, max(cut) + 10)
    for i, c in enumerate(cut):
        torch.testing.assert_close(out[i], full[i, c:c + 10], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_greedy_identity_with_dynamic_k(target: GPT, prompts: list[list[int]],
                                        reference: list[list[int]], kind: str) -> None:
    """K falls as the batch fills (0 with a full batch: plain decode steps, where the draft
    model still caches the pending token) and rises as it drains: same output."""
    cfg = EngineConfig(batch_size=3, k=3, arrival_rate=None, num_requests=0, clock="virtual",
                       prompt_len=(1, 64), max_new_tokens=(1, MAX_NEW), dynamic_k=True)
    drafter = ModelDrafter(target) if kind == "model" else NgramDrafter()
    eng = Engine(target, drafter, cfg)
    reqs = [eng.submit(p, MAX_NEW) for p in prompts]
    seen = []
    original = eng.step_k

    def record() -> int:
        seen.append(original())
        return seen[-1]

    eng.step_k = record  # type: ignore[method-assign]
    eng.run()
    assert [r.output for r in reqs] == reference
    assert {0, 3} <= set(seen) <= {0, 2, 3}  # full: 0; 2 of 3 rows: 2; 1 of 3: K
    c = eng.counters
    if kind == "model":  # drafts whenever K > 0
        assert 0 < c.steps_without_drafts == seen.count(0) < c.steps
        assert c.drafts > 0 and c.accepted_tokens > 0
    else:  # also steps where the lookup found nothing for any request
        assert seen.count(0) <= c.steps_without_drafts < c.steps
