"""Torch reference speculative decoder used by ``spec-metrics demo``.

Importing this package does not import torch; the names below are resolved
lazily from the submodules (which do) on first access.

Typical use::

    from spec_metrics.demo import build_engine, EngineConfig
    eng = build_engine("model", config=EngineConfig(batch_size=8, k=4), hooks=my_hooks)
    eng.run(seconds=10)
    print(eng.counters.acceptance_rate)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "engine", "build_engine": "factory", "generate": "factory",
    "calibrate_sigma": "drafters",
    "EngineConfig": "records", "Request": "records", "SpecCounters": "records",
    "ModelDrafter": "drafters", "NgramDrafter": "drafters",
    "GPT": "models", "GPTConfig": "models", "plain_greedy_generate": "models",
    "TrainConfig": "training", "load_or_train": "training",
    "CharTokenizer": "corpus", "load_corpus": "corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
