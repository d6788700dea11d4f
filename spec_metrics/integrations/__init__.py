"""Adapters for existing engines, imported only when asked for.

`spec_metrics.integrations.sglang` maps sglang's speculative stage vocabulary and its
batch-timestamp pattern onto the hooks; `spec_metrics.integrations.vllm` is a vLLM v1 stat
logger; `spec_metrics.integrations.transformers` instruments HF transformers' assisted
generation and prompt lookup. None imports its engine (or torch) at import time, and
`import spec_metrics` does not import this package's modules: each loads on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["sglang", "transformers", "vllm"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
