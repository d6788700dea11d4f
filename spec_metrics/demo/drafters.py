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
from dataclasses import dataclass
from typing import Optional

import torch

from .models import GPT, KVCache, make_draft_model, renoise_
from .sampling import probs


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
    """Draft model = target with relative Gaussian weight noise of scale sigma.

    It keeps its own KV cache, indexed with the engine's per-row lengths.
    Proposing k tokens runs k single-token forwards over the whole batch.
    """

    deterministic = False

    def __init__(self, target: GPT, sigma: float = 0.1, seed: int = 0,
                 collapse_sigma: float = 4.0) -> None:
        self.target = target
        self.sigma = sigma
        self.seed = seed
        self.collapse_sigma = collapse_sigma
        self.model = make_draft_model(target, sigma, seed)
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
        greedy = view.temperature <= 0
        out, qs = [], []
        for i in range(k):
            # Position lens+i holds the token fed now (pending, then drafts).
            logits = self.model(tok[:, None], self.cache, view.lens + i, 0,
                                view.kv_bound + i + 1)[:, 0]
            if greedy:
                tok = logits.argmax(dim=-1)
            else:
                q = probs(logits, view.temperature)
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
        self.model(prop.tokens[:, k - 1:], self.cache, view.lens + k, 0,
                   view.kv_bound + k + 1)

    def collapse(self, sigma: Optional[float] = None) -> None:
        renoise_(self.model, self.target, self.collapse_sigma if sigma is None else sigma,
                 self.seed + 1)

    def restore(self) -> None:
        renoise_(self.model, self.target, self.sigma, self.seed)


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
        lengths = [len(d) for d in drafts]
        padded = [d + [0] * (k - len(d)) for d in drafts]
        dev = view.pending.device
        tokens = torch.tensor(padded, dtype=torch.long).to(dev, non_blocking=True)
        lens_t = torch.tensor(lengths, dtype=torch.long).to(dev, non_blocking=True)
        return Proposal(tokens, None, lens_t, lengths)

    def extend(self, view: BatchView, accepted: torch.Tensor, prop: Proposal) -> None:
        pass  # the lookup reads the host context, which the engine updates

    def collapse(self, sigma: Optional[float] = None) -> None:
        self.collapsed = True

    def restore(self) -> None:
        self.collapsed = False
