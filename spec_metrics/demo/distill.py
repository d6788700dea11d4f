"""A small draft model distilled from the target, cached on disk like the target.

A draft model only pays off when it is much cheaper than the target: a noisy copy of the
target (the old demo drafter) costs as much per token as the target itself, so K draft
tokens cost K target steps and speculation loses. The default drafter is a one-layer,
64-wide GPT trained to match the target's next-token distribution (soft labels, KL) on the
text it will meet at run time: the target's own greedy continuations of corpus prompts,
and corpus windows. It reaches ~95% top-1 agreement on the target's own greedy text at about
a third of the target's per-token cost on a CPU, in ~6 s of training on 2 cores.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from spec_metrics.demo.corpus import load_corpus
from spec_metrics.demo.models import GPT, GPTConfig
from spec_metrics.demo.training import cached_model, default_cache_dir

__all__ = ["DRAFT_CONFIG", "DistillConfig", "distill", "load_or_distill", "target_text"]

log = logging.getLogger(__name__)

# The default drafter: one layer, a quarter of the target's width (see module docstring).
DRAFT_CONFIG = GPTConfig(d_model=64, n_layer=1, n_head=2)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    own_texts: int = 256  # target greedy continuations of corpus prompts
    corpus_texts: int = 256  # plain corpus windows
    prompt_len: int = 32
    text_len: int = 128
    seed: int = 0


@torch.no_grad()
def target_text(target: GPT, n: int, prompt_len: int, gen_len: int, seed: int) -> torch.Tensor:
    """[n, prompt_len + gen_len]: corpus prompts and the target's greedy continuation."""
    rng = random.Random(seed)
    corpus = load_corpus()
    x = torch.tensor([corpus.sample_prompt(rng, prompt_len, prompt_len) for _ in range(n)],
                     device=target.device)
    cache = target.new_cache(n, prompt_len + gen_len)
    start = torch.zeros(n, dtype=torch.long, device=target.device)
    target(x[:, :-1], cache, start, 0, prompt_len - 1)
    toks, cur = [x], x[:, -1:]
    for i in range(gen_len):
        cur = target(cur, cache, start + prompt_len - 1 + i, 0, prompt_len + i).argmax(-1)
        toks.append(cur)
    return torch.cat(toks, dim=1)


def _corpus_windows(n: int, length: int, seed: int) -> torch.Tensor:
    stream = load_corpus().stream
    rng = random.Random(seed)
    starts = [rng.randrange(len(stream) - length) for _ in range(n)]
    return torch.tensor([stream[s:s + length] for s in starts])


def distill(target: GPT, cfg: GPTConfig = DRAFT_CONFIG, dcfg: Optional[DistillConfig] = None,
            verbose: bool = False) -> GPT:
    """Train a `cfg`-sized GPT on the target's soft labels; returns it on the CPU, eval."""
    dcfg = dcfg or DistillConfig()
    if cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError("the draft model must share the target's vocabulary")
    target_cpu = target if target.device.type == "cpu" else _cpu_copy(target)
    # The +1 seed keeps the training texts apart from calibrate_sigma's (seed 0).
    with torch.no_grad():
        data = torch.cat([
            target_text(target_cpu, dcfg.own_texts, dcfg.prompt_len,
                        dcfg.text_len - dcfg.prompt_len, dcfg.seed + 1),
            _corpus_windows(dcfg.corpus_texts, dcfg.text_len, dcfg.seed + 1)])
        soft = torch.cat([target_cpu(data[i:i + 64]).softmax(-1)
                          for i in range(0, len(data), 64)])
    torch.manual_seed(dcfg.seed)
    student = GPT(cfg)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    gen = torch.Generator().manual_seed(dcfg.seed)
    t0 = time.perf_counter()
    for step in range(dcfg.steps):
        scale = min(1.0, (step + 1) / dcfg.warmup)
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / dcfg.steps))
        for group in opt.param_groups:
            group["lr"] = dcfg.lr * scale
        idx = torch.randint(len(data), (dcfg.batch_size,), generator=gen)
        log_q = F.log_softmax(student(data[idx]), dim=-1)
        loss = -(soft[idx] * log_q).sum(-1).mean()  # cross-entropy to the target's probs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if verbose and (step % 100 == 0 or step == dcfg.steps - 1):
            log.warning("distill step %d loss %.3f (%.1fs)", step, loss.item(),
                        time.perf_counter() - t0)
    return student.eval().requires_grad_(False)


def _cpu_copy(model: GPT) -> GPT:
    copy = GPT(model.cfg)
    copy.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    return copy.eval()


def _target_digest(target: GPT) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(target.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def load_or_distill(target: GPT, cfg: GPTConfig = DRAFT_CONFIG,
                    dcfg: Optional[DistillConfig] = None,
                    cache_dir: Optional[Path | str] = None, use_cache: bool = True,
                    verbose: bool = False) -> GPT:
    """The distilled draft model of `target`, on the target's device; weights cached on disk
    next to the target's, keyed by the target's weights and both configs."""
    dcfg = dcfg or DistillConfig()
    blob = repr((_target_digest(target), asdict(cfg), asdict(dcfg),
                 torch.__version__.split(".")[0]))
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / f"drafter-{key}.pt"
    return cached_model(path, cfg, lambda: distill(target, cfg, dcfg, verbose=verbose),
                        use_cache, "drafter").to(target.device)
