"""Acceptance rules for speculative decoding, vectorized over the batch.

Shapes: B requests, K draft slots, V vocab.  ``lengths`` [B] says how many of
the K draft slots are real for each request (n-gram drafts can be shorter);
``None`` means all K.  Every function returns ``(accepted [B] int64,
next_token [B] int64)``: the number of leading draft tokens kept and the one
token the target contributes (correction on rejection, bonus otherwise).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Acceptor = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # float32 softmax even for low-precision models: the ratio p/q needs it.
    return torch.softmax(logits.float() / temperature, dim=-1)


def _valid(draft: torch.Tensor, lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    return torch.arange(draft.shape[1], device=draft.device)[None] < lengths[:, None]


def _leading(ok: torch.Tensor) -> torch.Tensor:
    # Number of leading True values per row; cumprod stops at the first miss.
    return ok.long().cumprod(dim=1).sum(dim=1)


def greedy_accept(target_logits: torch.Tensor, draft: torch.Tensor,
                  lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0: keep drafts while they equal the target argmax.

    target_logits [B, K+1, V] are the target's outputs after the pending
    token and after each draft token; the token after the accepted prefix
    is the target's argmax there, so output == plain greedy decoding.
    """
    top = target_logits.argmax(dim=-1)  # [B, K+1]
    ok = draft == top[:, :-1]
    valid = _valid(draft, lengths)
    if valid is not None:
        ok &= valid
    accepted = _leading(ok)
    return accepted, top.gather(1, accepted[:, None]).squeeze(1)


def rejection_accept(p: torch.Tensor, q: Optional[torch.Tensor], draft: torch.Tensor,
                     lengths: Optional[torch.Tensor], generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative (rejection) sampling, Leviathan et al. / Chen et al.

    p [B, K+1, V]: target probabilities; q [B, K, V]: draft probabilities the
    draft tokens were sampled from, or None for deterministic drafts (n-gram),
    i.e. q = one-hot(draft).  Draft token x at slot i is kept with
    probability min(1, p(x)/q(x)); at the first rejection the replacement is
    drawn from norm(max(0, p - q)); if every real slot is kept, the bonus
    token is drawn from p at the next position.  The emitted tokens are then
    distributed exactly as sampling from the target.
    """
    B, K = draft.shape
    V = p.shape[-1]
    if q is None:
        q = torch.nn.functional.one_hot(draft, V).to(p.dtype)
    p_x = p[:, :K].gather(2, draft[..., None]).squeeze(2)
    q_x = q.gather(2, draft[..., None]).squeeze(2)
    u = torch.rand((B, K), device=p.device, generator=generator)
    ok = u * q_x < p_x  # u < p/q without dividing; q_x > 0 for sampled tokens
    valid = _valid(draft, lengths)
    if valid is not None:
        ok &= valid
    accepted = _leading(ok)

    rows = torch.arange(B, device=p.device)
    p_a = p[rows, accepted]  # [B, V]; position K exists in p (bonus slot)
    q_a = torch.cat([q, q.new_zeros(B, 1, V)], dim=1)[rows, accepted]
    resid = (p_a - q_a).clamp_min(0)
    n_real = torch.full_like(accepted, K) if lengths is None else lengths
    # Rejected rows sample the residual; rows that used up their draft sample
    # p.  A residual of all zeros only happens when p == q, where any choice
    # is fine, so fall back to p instead of dividing by zero.
    use_resid = (accepted < n_real) & (resid.sum(dim=-1) > 0)
    dist = torch.where(use_resid[:, None], resid, p_a)
    nxt = torch.multinomial(dist, 1, generator=generator).squeeze(1)
    return accepted, nxt


def accept_all(p: torch.Tensor, q: Optional[torch.Tensor], draft: torch.Tensor,
               lengths: Optional[torch.Tensor], generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deliberately WRONG rule (keeps every draft): used by tests to show
    that the distribution test can tell a broken sampler apart."""
    B, K = draft.shape
    accepted = torch.full((B,), K, device=draft.device, dtype=torch.long)
    if lengths is not None:
        accepted = lengths.clone()
    p_a = p[torch.arange(B, device=p.device), accepted]
    return accepted, torch.multinomial(p_a, 1, generator=generator).squeeze(1)
