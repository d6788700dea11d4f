"""Quick built-in training of the target LM, with an on-disk weight cache.

Training the default target takes ~15-25 s on a 2-core CPU; the weights are
cached under ``$XDG_CACHE_HOME/spec_metrics`` (or ``~/.cache/spec_metrics``)
keyed by model config, train config (incl. seed), torch major version and
corpus hash, so later runs start instantly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from spec_metrics.demo.corpus import Corpus, load_corpus
from spec_metrics.demo.models import GPT, GPTConfig

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # bump when GPT code changes in a way that keeps state_dict keys


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 360
    batch_size: int = 8
    block: int = 128  # training window; RoPE lets inference run a bit past it
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0


def train_lm(cfg: GPTConfig, tcfg: TrainConfig, corpus: Optional[Corpus] = None,
             verbose: bool = False) -> GPT:
    """A few hundred AdamW steps of next-char prediction on the corpus."""
    corpus = corpus or load_corpus()
    assert cfg.vocab_size >= corpus.tokenizer.vocab_size
    torch.manual_seed(tcfg.seed)
    gen = torch.Generator().manual_seed(tcfg.seed)
    model = GPT(cfg)
    model.train()
    data = torch.tensor(corpus.stream, dtype=torch.long)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.95))
    block = min(tcfg.block, cfg.max_seq)
    t0 = time.perf_counter()
    for step in range(tcfg.steps):
        lr_scale = min(1.0, (step + 1) / tcfg.warmup)
        lr_scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / tcfg.steps))
        for g in opt.param_groups:
            g["lr"] = tcfg.lr * lr_scale
        starts = torch.randint(len(data) - block - 1, (tcfg.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(block + 1)
        batch = data[idx]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if verbose and (step % 50 == 0 or step == tcfg.steps - 1):
            log.warning("train step %d loss %.3f (%.1fs)", step, loss.item(),
                        time.perf_counter() - t0)
    model.eval()
    model.final_loss = float(loss.detach())  # type: ignore[attr-defined]
    return model


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spec_metrics"


def _cache_key(cfg: GPTConfig, tcfg: TrainConfig, corpus: Corpus) -> str:
    blob = json.dumps({
        "fmt": CACHE_FORMAT_VERSION, "model": asdict(cfg), "train": asdict(tcfg),
        "torch_major": torch.__version__.split(".")[0], "corpus": corpus.digest,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_or_train(cfg: Optional[GPTConfig] = None, tcfg: Optional[TrainConfig] = None,
                  cache_dir: Optional[Path | str] = None, use_cache: bool = True,
                  verbose: bool = False) -> GPT:
    """Trained target model on CPU in eval mode; weights cached on disk.

    Defaults (None) are the demo's GPTConfig() / TrainConfig()."""
    cfg, tcfg = cfg or GPTConfig(), tcfg or TrainConfig()
    corpus = load_corpus()
    path = Path(cache_dir or default_cache_dir()) / f"target-{_cache_key(cfg, tcfg, corpus)}.pt"
    return cached_model(path, cfg, lambda: train_lm(cfg, tcfg, corpus, verbose=verbose),
                        use_cache, "model")


def cached_model(path: Path, cfg: GPTConfig, build: Callable[[], GPT], use_cache: bool,
                 what: str) -> GPT:
    """The model saved at `path`, else `build()` (saved there when `use_cache`); on the
    CPU, for inference only."""
    if use_cache and path.exists():
        try:
            model = GPT(cfg)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval().requires_grad_(False)
        except Exception as exc:  # corrupt/partial file: retrain and overwrite
            log.warning("ignoring unreadable %s cache %s: %s", what, path, exc)
    model = build()
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)  # atomic: concurrent runs never see half a file
        except OSError as exc:
            log.warning("could not write %s cache %s: %s", what, path, exc)
    return model.requires_grad_(False)  # inference only from here on
