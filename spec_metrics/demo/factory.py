"""Convenience entry points: the demo engine, and static-batch generation."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from spec_metrics.demo.distill import load_or_distill
from spec_metrics.demo.drafters import ModelDrafter, NgramDrafter, NoDrafter
from spec_metrics.demo.engine import Engine
from spec_metrics.demo.models import GPT, GPTConfig
from spec_metrics.demo.records import EngineConfig, SpecCounters
from spec_metrics.demo.sampling import Acceptor
from spec_metrics.demo.training import TrainConfig, load_or_train

__all__ = ["build_engine", "generate"]


def generate(target: GPT, drafter: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             k: int = 4, temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True,
             acceptor: Optional[Acceptor] = None, hooks: Any = None
             ) -> tuple[list[list[int]], SpecCounters]:
    """Static batch: all prompts start together; returns outputs in prompt order."""
    cfg = EngineConfig(batch_size=len(prompts), k=k, temperature=temperature,
                       arrival_rate=None, num_requests=0, clock="virtual", seed=seed,
                       prompt_len=(1, max(len(p) for p in prompts)),
                       max_new_tokens=(1, max_new_tokens), stop_at_eos=stop_at_eos,
                       keep_finished=len(prompts))
    eng = Engine(target, drafter, cfg, hooks=hooks, acceptor=acceptor)
    reqs = [eng.submit(p, max_new_tokens) for p in prompts]
    counters = eng.run()
    return [r.output for r in reqs], counters


def build_engine(drafter: str = "model", sigma: Optional[float] = None,
                 device: str | torch.device = "cpu", hooks: Any = None,
                 config: Optional[EngineConfig] = None, model_cfg: Optional[GPTConfig] = None,
                 train_cfg: Optional[TrainConfig] = None, ngram: tuple[int, int] = (6, 2),
                 seed: int = 0, num_threads: Optional[int] = None,
                 verbose: bool = False, draft_base: str = "distilled") -> Engine:
    """Demo engine: cached/trained default target + "model", "ngram" or "none" drafter
    ("none": plain greedy decoding, every step K = 0; the baseline speculation is
    measured against).

    ``draft_base``: what the "model" drafter is made from: "distilled" (default), a small
    model distilled from the target (see distill.py), so speculation pays; "target", a
    noisy copy of the target, as costly per token as the target itself.
    ``sigma=None`` calibrates the draft noise (see ``calibrate_sigma``).

    ``num_threads``: torch intra-op threads for decoding, set after training.
    The demo should pass 1: per-step ops are tiny, a second thread barely
    helps, and on a shared CPU (e.g. next to a metrics scraper) 2 threads
    were measured 5-10x slower than 1.  None leaves torch's setting alone.
    """
    model_cfg = model_cfg or GPTConfig()
    target = load_or_train(model_cfg, train_cfg, verbose=verbose).to(device)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if drafter == "model":
        k = (config or EngineConfig()).k
        if draft_base not in ("distilled", "target"):
            raise ValueError(f"unknown draft_base {draft_base!r} (expected 'distilled' or "
                             "'target')")
        base = load_or_distill(target, verbose=verbose) if draft_base == "distilled" else None
        d: Any = ModelDrafter(target, sigma=sigma, seed=seed, k=k, base=base)
    elif drafter == "ngram":
        d = NgramDrafter(max_n=ngram[0], min_n=ngram[1], vocab_size=model_cfg.vocab_size,
                         seed=seed)
    elif drafter == "none":
        d = NoDrafter()
    else:
        raise ValueError(f"unknown drafter {drafter!r} (expected 'model', 'ngram' or 'none')")
    return Engine(target, d, config, hooks=hooks)
