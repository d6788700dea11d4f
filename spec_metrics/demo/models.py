"""Tiny GPT-style causal LM with a batched KV cache, and the noisy drafter copy.

Everything here is small on purpose: the demo must train in seconds on a
laptop CPU and then step at tens of speculative steps per second.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 97
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    max_seq: int = 192
    mlp_mult: int = 4

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


class KVCache:
    """Preallocated K/V storage, shape [n_layer, rows, n_head, seq_cap, d_head].

    The cache is pure storage: which positions are valid is decided by the
    caller through the per-row ``start`` it passes to ``GPT.forward``.  That
    makes speculative rollback free (just don't advance the length) and keeps
    rows with different lengths in one batch.
    """

    def __init__(self, cfg: GPTConfig, rows: int, seq_cap: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, rows, cfg.n_head, seq_cap, cfg.d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def seq_cap(self) -> int:
        return self.k.shape[3]

    def compact(self, keep: torch.Tensor) -> None:
        """Move rows ``keep`` (sorted) to the front; used when requests leave."""
        n = keep.numel()
        self.k[:, :n] = self.k[:, keep]
        self.v[:, :n] = self.v[:, keep]


def rope_tables(max_seq: int, d_head: int,
                base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head))
    angles = torch.arange(max_seq, dtype=torch.float64)[:, None] * inv_freq[None]
    return angles.cos().float(), angles.sin().float()  # [S, d_head/2] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature halves of x [B,T,H,Dh] by angles cos/sin [B,T,Dh/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None], sin[:, :, None]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_mult * cfg.d_model)
        self.fc_out = nn.Linear(cfg.mlp_mult * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: Optional[tuple[torch.Tensor, torch.Tensor]],
                write_idx: Optional[tuple[torch.Tensor, torch.Tensor]],
                mask: Optional[torch.Tensor], kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, Dh = self.cfg.n_head, self.cfg.d_head
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, H, Dh).unbind(2)  # each [B,T,H,Dh]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # cache holds rotated keys
        if kv is None:
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            kc, vc = kv  # [B,H,S,Dh] views into the cache
            bi, pos = write_idx  # [B,1], [B,T]; advanced dims come first -> [B,T,H,Dh]
            kc[bi, :, pos] = k
            vc[bi, :, pos] = v
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token embeddings + rotary positions, pre-LN blocks, tied LM head.

    Rotary (relative) positions instead of a learned absolute table: with
    learned positions the model stayed at bigram level (loss ~2.5 nats)
    within the ~20 s CPU training budget; with RoPE it reaches ~1.9.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        cos, sin = rope_tables(cfg.max_seq, cfg.d_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for b in self.blocks:  # GPT-2 style residual scaling keeps early training stable
            for lin in (b.proj, b.fc_out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    def new_cache(self, rows: int, seq_cap: Optional[int] = None) -> KVCache:
        seq_cap = self.cfg.max_seq if seq_cap is None else min(seq_cap, self.cfg.max_seq)
        return KVCache(self.cfg, rows, seq_cap, self.device, self.dtype)

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                start: Optional[torch.Tensor] = None, row0: int = 0,
                kv_len: Optional[int] = None) -> torch.Tensor:
        """Logits [B, T, V] for ``tokens`` [B, T].

        Without a cache: plain causal forward (training / reference decoding).
        With a cache: row b of ``tokens`` is written to cache row ``row0 + b``
        at positions ``start[b] + t`` and attends to cache positions
        ``<= start[b] + t``.  ``kv_len`` is a host-side upper bound on
        ``start + T`` so attention only scans the used prefix of the cache
        (the caller knows it without a device sync).
        """
        B, T = tokens.shape
        x = self.tok_emb(tokens)
        if cache is None:
            pos = torch.arange(T, device=tokens.device)
            rope = (self.rope_cos[pos][None].to(x.dtype), self.rope_sin[pos][None].to(x.dtype))
            for blk in self.blocks:
                x = blk(x, rope, None, None, None, 0)
            return self.ln_f(x) @ self.tok_emb.weight.t()
        assert start is not None and kv_len is not None
        kv_len = min(kv_len, cache.seq_cap)
        pos = start[:, None] + torch.arange(T, device=tokens.device)  # [B,T]
        rope = (self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype))
        bi = torch.arange(B, device=tokens.device)[:, None]
        keys = torch.arange(kv_len, device=tokens.device)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B,1,T,S]
        for i, blk in enumerate(self.blocks):
            kv = (cache.k[i, row0:row0 + B], cache.v[i, row0:row0 + B])
            x = blk(x, rope, kv, (bi, pos), mask, kv_len)
        return self.ln_f(x) @ self.tok_emb.weight.t()


# ------------------------------------------------------------------ drafter

@torch.no_grad()
def renoise_(draft: GPT, target: GPT, sigma: float, seed: int = 0) -> GPT:
    """Set draft weights to target + sigma * std(W) * N(0, 1), per tensor.

    Noise is relative to each tensor's own spread so one sigma means the
    same "amount of damage" for embeddings, LayerNorm gains and projections.
    Always re-derived from the target, so repeated calls don't compound.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for (_, pd), (_, pt) in zip(draft.named_parameters(), target.named_parameters()):
        pd.copy_(pt)
        if sigma > 0 and pt.numel() > 1:
            # Noise drawn on the CPU so a seed gives the same drafter on any device.
            noise = torch.randn(pt.shape, generator=gen, dtype=torch.float32).to(pd.device)
            scale = pt.float().std().clamp_min(1e-3)  # LN gains after training can be ~const
            pd.add_((noise * (sigma * scale)).to(pd.dtype))
    return draft


def make_draft_model(target: GPT, sigma: float, seed: int = 0) -> GPT:
    draft = copy.deepcopy(target).requires_grad_(False)
    return renoise_(draft, target, sigma, seed).eval()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host->device copy that does not block the host on CUDA (pinned + async);
    PyTorch's pinned-memory cache keeps the source alive until the copy ran."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def plain_greedy_generate(target: GPT, prompt: Sequence[int], n: int,
                          eos_id: Optional[int] = None) -> list[int]:
    """Reference: greedy decoding by full recomputation, no cache, batch 1.

    Deliberately shares no code path with the cached/speculative decoder so
    the identity test checks the cache, masking and acceptance logic.
    """
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        x = torch.tensor([ids], device=target.device)
        nxt = int(target(x)[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out
