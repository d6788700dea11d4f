"""Drafters: a noisy copy of the target model, and n-gram prompt lookup.

Both follow one small protocol used by the engine:

* ``allocate(rows, seq_cap)`` once, ``prefill(row0, tokens, n_ctx)`` when
  requests join, ``compact(keep)`` when they leave;
* ``propose(view, k) -> Proposal`` drafts up to k tokens for every row;
* ``extend(view, accepted, proposal)`` brings drafter state up to date with
  what the target accepted (the "draft_extend" stage);
* ``collapse()`` / ``restore()`` degrade / restore draft quality at runtime.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from spec_metrics.demo.corpus import load_corpus
from spec_metrics.demo.distill import target_text
from spec_metrics.demo.models import GPT, KVCache, make_draft_model, renoise_, to_device
from spec_metrics.demo.sampling import probs

# Proxy acceptance that calibrate_sigma aims for (see there).  Measured with
# the default workload (k=4): greedy acceptance 0.85 (Python 3.11 corpus) and
# 0.95 (3.12), temperature 1: 0.82 and 0.75; the trained targets differ.
DEFAULT_CALIBRATION = 0.7


def _corpus_windows(n: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    stream = load_corpus().stream
    rng = random.Random(seed)
    starts = [rng.randrange(len(stream) - length) for _ in range(n)]
    return torch.tensor([stream[s:s + length] for s in starts], device=device)


# Memo per target module (weights are treated as frozen once trained).
_CALIBRATED: "weakref.WeakKeyDictionary[GPT, weakref.WeakKeyDictionary[GPT, dict]]" = (
    weakref.WeakKeyDictionary())


def calibrate_sigma(target: GPT, acceptance: float = DEFAULT_CALIBRATION, k: int = 4,
                    seed: int = 0, iters: int = 10, base: Optional[GPT] = None) -> float:
    """Largest noise scale whose drafter still reaches a proxy greedy acceptance.

    Proxy: with per-token top-1 agreement a between draft and target, greedy
    acceptance for k drafts is about mean(a, a^2, .., a^k).  Agreement is
    measured on corpus text and on the target's own greedy continuations, and
    the worse of the two counts: own greedy text alone is misleading because
    a tiny char model loops ("the and the and"), which even a badly damaged
    drafter predicts.  A fixed sigma does not transfer between Python
    versions (the docstring corpus, hence the trained target, differ), so the
    default drafter is calibrated; bisection with the noise direction fixed
    by ``seed`` takes a fraction of a second.

    ``base``: the model the drafter is a noisy copy of (default: the target itself); the
    noise is relative to its weights. A base that cannot reach ``acceptance`` even without
    noise gets sigma ~0.
    """
    base = target if base is None else base
    key = (acceptance, k, seed, iters)
    # Per target, per base object (weakly: an id() could be reused by the next base).
    memo = _CALIBRATED.setdefault(target, weakref.WeakKeyDictionary()).setdefault(base, {})
    if key not in memo:
        memo[key] = _bisect_sigma(target, base, acceptance, k, seed, iters)
    return memo[key]


@torch.no_grad()
def _bisect_sigma(target: GPT, base: GPT, acceptance: float, k: int, seed: int,
                  iters: int) -> float:
    ctx = 32  # score only positions with some context
    texts = [target_text(target, 16, ctx, 48, seed),
             _corpus_windows(16, ctx + 48, seed, target.device)]
    wants = [target(t).argmax(-1)[:, ctx - 1:] for t in texts]
    draft = make_draft_model(base, 0.0, seed)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        renoise_(draft, base, mid, seed)
        proxy = 1.0
        for t, want in zip(texts, wants):
            a = float((draft(t).argmax(-1)[:, ctx - 1:] == want).float().mean())
            proxy = min(proxy, sum(a ** (i + 1) for i in range(k)) / k)
        lo, hi = (mid, hi) if proxy > acceptance else (lo, mid)
    return (lo + hi) / 2


@dataclass
class BatchView:
    """What a drafter may look at for the running batch (row order)."""

    pending: torch.Tensor  # [B] last token of each context; not yet in any cache
    lens: torch.Tensor  # [B] cached positions (= len(context) - 1), on device
    kv_bound: int  # host-side max(lens), bounds attention length without a sync
    contexts: list[list[int]]  # host copies of prompt + output, incl. pending
    temperature: float
    generator: torch.Generator


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, k] int64; slots past ``lengths`` are padding
    q: Optional[torch.Tensor]  # [B, k, V] draft probs; None = deterministic (one-hot)
    lengths: Optional[torch.Tensor] = None  # [B] real slots per row; None = all k
    lengths_host: Optional[list[int]] = None  # same, host copy (for counters)


class ModelDrafter:
    """Draft model = ``base`` with relative Gaussian weight noise of scale sigma.

    ``base`` is the target itself (a noisy copy: as costly per token as the target) unless
    given, e.g. the small distilled model of ``distill.load_or_distill`` that the demo uses.
    It keeps its own KV cache, indexed with the engine's per-row lengths.
    Proposing k tokens runs k single-token forwards over the whole batch.
    """

    deterministic = False

    def __init__(self, target: GPT, sigma: Optional[float] = None, seed: int = 0,
                 collapse_sigma: float = 4.0, calibrate_to: float = DEFAULT_CALIBRATION,
                 k: int = 4, base: Optional[GPT] = None) -> None:
        """``sigma=None``: pick sigma with ``calibrate_sigma(..., calibrate_to, k)``."""
        self.target = target
        self.base = target if base is None else base
        self.seed = seed
        self.collapse_sigma = collapse_sigma
        if sigma is None:
            sigma = calibrate_sigma(target, calibrate_to, k=k, seed=seed, base=self.base)
        self.sigma = sigma
        self.model = make_draft_model(self.base, sigma, seed)
        self.weakness = 0.0  # share of draft tokens replaced at random (weaken())
        self.cache: Optional[KVCache] = None

    def allocate(self, rows: int, seq_cap: int) -> None:
        self.cache = self.model.new_cache(rows, seq_cap)

    def prefill(self, row0: int, tokens: torch.Tensor, n_ctx: int) -> None:
        if n_ctx > 0:
            start = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            self.model(tokens, self.cache, start, row0, n_ctx)

    def compact(self, keep: torch.Tensor) -> None:
        assert self.cache is not None
        self.cache.compact(keep)

    @torch.no_grad()
    def propose(self, view: BatchView, k: int) -> Proposal:
        tok = view.pending
        if k == 0:  # a plain decode step: the draft cache still takes the pending token
            self.model(tok[:, None], self.cache, view.lens, 0, view.kv_bound + 1)
            return Proposal(tok.new_zeros((tok.shape[0], 0)), None)
        greedy = view.temperature <= 0
        out, qs = [], []
        for i in range(k):
            # Position lens+i holds the token fed now (pending, then drafts).
            logits = self.model(tok[:, None], self.cache, view.lens + i, 0,
                                view.kv_bound + i + 1)[:, 0]
            if greedy:
                tok = logits.argmax(dim=-1)
                if self.weakness > 0:  # a weaker drafter: some tokens replaced at random
                    shape, gen = tok.shape, view.generator
                    random = torch.randint(0, logits.shape[-1], shape, device=tok.device,
                                           generator=gen)
                    swap = torch.rand(shape, device=tok.device, generator=gen) < self.weakness
                    tok = torch.where(swap, random, tok)
            else:
                q = probs(logits, view.temperature)
                if self.weakness > 0:  # the same, as a distribution: rejection sampling
                    q = (1 - self.weakness) * q + self.weakness / q.shape[-1]  # stays exact
                tok = torch.multinomial(q, 1, generator=view.generator).squeeze(1)
                qs.append(q)
            out.append(tok)
        return Proposal(torch.stack(out, dim=1), torch.stack(qs, dim=1) if qs else None)

    @torch.no_grad()
    def extend(self, view: BatchView, accepted: torch.Tensor, prop: Proposal) -> None:
        """Cache the last draft token for rows that accepted all k drafts.

        The draft cache already holds pending + drafts[:k-1]; after a step the
        committed prefix is pending + drafts[:accepted].  Only when accepted
        == k is a token (drafts[k-1]) missing.  We feed it for every row
        (one batched forward, no host sync to find the rows); for the other
        rows it lands at or past their new length, so it is never read before
        being overwritten.
        """
        k = prop.tokens.shape[1]
        if k == 0:  # nothing was drafted: propose() cached the pending token
            return
        self.model(prop.tokens[:, k - 1:], self.cache, view.lens + k, 0,
                   view.kv_bound + k + 1)

    def collapse(self, sigma: Optional[float] = None) -> None:
        renoise_(self.model, self.base, self.collapse_sigma if sigma is None else sigma,
                 self.seed + 1)

    def weaken(self, share: float) -> None:
        """A weaker drafter: from now on each draft token is replaced by a random one with
        probability ``share`` (greedy), or drawn from that mixture (sampling; rejection
        sampling stays exact). Acceptance falls by a similar factor for every workload."""
        if not 0 <= share < 1:
            raise ValueError(f"weaken share must be in [0, 1), got {share}")
        self.weakness = float(share)

    def restore(self) -> None:
        renoise_(self.model, self.base, self.sigma, self.seed)
        self.weakness = 0.0


def ngram_lookup(context: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram (n = max_n .. min_n) of ``context``; [] if none matches."""
    L = len(context)
    if max(context, default=0) < 256:
        # bytes.rfind is a C-speed substring search; all our token ids fit a byte.
        buf = bytes(context)
        for n in range(min(max_n, L - 1), min_n - 1, -1):
            # Occurrence must end before the last token, so it is not the suffix itself.
            j = buf.rfind(buf[L - n:], 0, L - 1)
            if j >= 0:
                return context[j + n: j + n + k]
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        pat = context[L - n:]
        for j in range(L - n - 1, -1, -1):
            if context[j:j + n] == pat:
                return context[j + n: j + n + k]
    return []


class NgramDrafter:
    """Prompt-lookup decoding over each request's own context (host side).

    Deterministic proposals (q = one-hot) of 0..k tokens per row.  After
    ``collapse()`` it proposes k uniformly random tokens instead, which the
    target almost never accepts.
    """

    deterministic = True

    def __init__(self, max_n: int = 6, min_n: int = 2, vocab_size: int = 97,
                 seed: int = 0) -> None:
        assert 1 <= min_n <= max_n
        self.max_n, self.min_n = max_n, min_n
        self.vocab_size = vocab_size
        self.collapsed = False
        self.weakness = 0.0
        self._rng = random.Random(seed)

    def allocate(self, rows: int, seq_cap: int) -> None:
        pass

    def prefill(self, row0: int, tokens: torch.Tensor, n_ctx: int) -> None:
        pass

    def compact(self, keep: torch.Tensor) -> None:
        pass

    def propose(self, view: BatchView, k: int) -> Proposal:
        if self.collapsed:
            drafts = [[self._rng.randrange(self.vocab_size) for _ in range(k)]
                      for _ in view.contexts]
        else:
            drafts = [ngram_lookup(c, k, self.max_n, self.min_n) for c in view.contexts]
            if self.weakness > 0:  # a weaker drafter: some proposals replaced at random
                rng, share, vocab = self._rng, self.weakness, self.vocab_size
                drafts = [[rng.randrange(vocab) if rng.random() < share else t for t in d]
                          for d in drafts]
        lengths = [len(d) for d in drafts]
        host = torch.tensor([[len(d)] + d + [0] * (k - len(d)) for d in drafts], dtype=torch.long)
        dev = to_device(host, view.pending.device)  # one async copy for both
        return Proposal(dev[:, 1:], None, dev[:, 0].contiguous(), lengths)

    def extend(self, view: BatchView, accepted: torch.Tensor, prop: Proposal) -> None:
        pass  # the lookup reads the host context, which the engine updates

    def collapse(self, sigma: Optional[float] = None) -> None:
        self.collapsed = True

    def weaken(self, share: float) -> None:
        """From now on replace each looked-up token by a random one with probability
        ``share`` (a weaker drafter)."""
        if not 0 <= share < 1:
            raise ValueError(f"weaken share must be in [0, 1), got {share}")
        self.weakness = float(share)

    def restore(self) -> None:
        self.collapsed, self.weakness = False, 0.0


class NoDrafter:
    """No drafter: every step of its engine is a plain decode step
    (K = 0), the baseline that speculation is measured against (``demo --baseline``)."""

    deterministic = True
    never_drafts = True  # the engine runs every step with K = 0

    def allocate(self, rows: int, seq_cap: int) -> None:
        pass

    def prefill(self, row0: int, tokens: torch.Tensor, n_ctx: int) -> None:
        pass

    def compact(self, keep: torch.Tensor) -> None:
        pass

    def propose(self, view: BatchView, k: int) -> Proposal:
        return Proposal(view.pending.new_zeros((view.pending.shape[0], 0)), None)

    def extend(self, view: BatchView, accepted: torch.Tensor, prop: Proposal) -> None:
        pass

    def collapse(self, sigma: Optional[float] = None) -> None:
        pass

    def weaken(self, share: float) -> None:
        pass

    def restore(self) -> None:
        pass
