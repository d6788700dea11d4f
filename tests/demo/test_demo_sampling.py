"""Rejection sampling must reproduce the target distribution, and the test must
have the power to catch a wrong acceptance rule."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from spec_metrics.demo.corpus import Corpus
from spec_metrics.demo.drafters import ModelDrafter, NgramDrafter
from spec_metrics.demo.factory import generate
from spec_metrics.demo.models import GPT
from spec_metrics.demo.sampling import accept_all, greedy_accept, rejection_accept

Z_1E4 = 3.719  # one-sided normal quantile for alpha = 1e-4


def chi2_rejects(samples: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson chi-square goodness-of-fit at alpha = 1e-4; True = "not from p".

    Bins with expected count < 5 are pooled; the critical value uses the
    Wilson-Hilferty approximation (no scipy needed)."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=p.numel()).double()
    expected = p.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:  # pooled tail too small: fold it into the last big bin
        obs[-2] += obs[-1]
        exp[-2] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    crit = df * (1 - 2 / (9 * df) + Z_1E4 * math.sqrt(2 / (9 * df))) ** 3
    return stat > crit


def _wrong_resample_from_p(p: torch.Tensor, q: Optional[torch.Tensor], draft: torch.Tensor,
                           lengths: Optional[torch.Tensor], generator: torch.Generator):
    """Subtly wrong: correct accept test, but resamples from p, not max(0, p - q)."""
    acc, _ = rejection_accept(p, q, draft, lengths, generator)
    p_a = p[torch.arange(p.shape[0]), acc]
    return acc, torch.multinomial(p_a, 1, generator=generator).squeeze(1)


def _synthetic(B: int = 100_000, K: int = 2, V: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(2 * torch.randn(K + 1, V, generator=g), -1)  # one dist per position
    q1 = torch.softmax(2 * torch.randn(K, V, generator=g), -1)
    q = q1.expand(B, K, V)
    draft = torch.stack([torch.multinomial(q1[i], B, True, generator=g) for i in range(K)], 1)
    return p1, q1, p1.expand(B, K + 1, V), q, draft, g


def _emitted(acc: torch.Tensor, nxt: torch.Tensor, draft: torch.Tensor, j: int) -> torch.Tensor:
    """Token emitted at slot j (valid for rows with acc >= j)."""
    return torch.where(acc > j, draft[:, j], nxt) if j < draft.shape[1] else nxt


def test_synthetic_rejection_matches_target_at_every_slot() -> None:
    p1, q1, p, q, draft, g = _synthetic()
    acc, nxt = rejection_accept(p, q, draft, None, g)
    assert not chi2_rejects(_emitted(acc, nxt, draft, 0), p1[0])
    rows = acc >= 1
    assert not chi2_rejects(_emitted(acc, nxt, draft, 1)[rows], p1[1])
    assert not chi2_rejects(nxt[acc == 2], p1[2])  # bonus token after full acceptance
    # acceptance probability of slot 0 is sum_x min(p, q) = 1 - TV(p, q)
    expect = torch.minimum(p1[0], q1[0]).sum()
    assert abs((acc >= 1).double().mean() - expect) < 0.01


def test_synthetic_variable_lengths_and_one_hot_drafts() -> None:
    p1, _, p, _, _, g = _synthetic(seed=1)
    B = p.shape[0]
    draft = torch.randint(0, 6, (B, 2), generator=g)  # deterministic (n-gram-like) drafts
    lengths = torch.randint(0, 3, (B,), generator=g)
    acc, nxt = rejection_accept(p, None, draft, lengths, g)
    assert bool((acc <= lengths).all())
    assert not chi2_rejects(_emitted(acc, nxt, draft, 0), p1[0])


@pytest.mark.parametrize("wrong", [accept_all, _wrong_resample_from_p])
def test_synthetic_wrong_rules_are_detected(wrong) -> None:
    p1, _, p, q, draft, g = _synthetic()
    acc, nxt = wrong(p, q, draft, None, g)
    assert chi2_rejects(_emitted(acc, nxt, draft, 0), p1[0])


def test_greedy_accept_prefix_and_lengths() -> None:
    V = 5
    top = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])  # target argmax per slot
    logits = torch.nn.functional.one_hot(top, V).float()
    draft = torch.tensor([[1, 2, 0], [1, 2, 3], [1, 2, 3]])
    acc, nxt = greedy_accept(logits, draft, torch.tensor([3, 3, 1]))
    assert acc.tolist() == [2, 3, 1]
    assert nxt.tolist() == [3, 4, 2]  # correction, bonus, token after the short draft


N_COPIES = 4096


@pytest.fixture(scope="module")
def e2e_prompt(corpus: Corpus) -> list[int]:
    return corpus.tokenizer.encode("Return the ")


def _target_probs(target: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(target(torch.tensor([ids]))[0, -1].float(), -1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_end_to_end_first_tokens_follow_target(target: GPT, e2e_prompt: list[int],
                                               kind: str) -> None:
    """4096 copies of one prompt in ONE batch at temperature 1: the first
    emitted token ~ p(.|prompt); the second, given the most common first
    token t, ~ p(.|prompt + t)."""
    drafter = ModelDrafter(target) if kind == "model" else NgramDrafter(min_n=1)
    outs, counters = generate(target, drafter, [e2e_prompt] * N_COPIES, 2, k=3,
                              temperature=1.0, seed=1, stop_at_eos=False)
    assert counters.accepted_tokens > 0 and counters.accepted_tokens < counters.draft_tokens
    first = torch.tensor([o[0] for o in outs])
    assert not chi2_rejects(first, _target_probs(target, e2e_prompt))
    mode = int(first.mode().values)
    second = torch.tensor([o[1] for o in outs if o[0] == mode])
    assert second.numel() > 300
    assert not chi2_rejects(second, _target_probs(target, e2e_prompt + [mode]))


@pytest.mark.slow
def test_end_to_end_wrong_rule_is_detected(target: GPT, e2e_prompt: list[int]) -> None:
    outs, _ = generate(target, ModelDrafter(target), [e2e_prompt] * N_COPIES, 1, k=3,
                       temperature=1.0, seed=1, stop_at_eos=False, acceptor=accept_all)
    first = torch.tensor([o[0] for o in outs])
    assert chi2_rejects(first, _target_probs(target, e2e_prompt))
