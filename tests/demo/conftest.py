"""Fixtures for the torch reference decoder tests (spec_metrics.demo)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

try:
    import torch
except ImportError:
    torch = None

if TYPE_CHECKING:
    from spec_metrics.demo.corpus import Corpus
    from spec_metrics.demo.models import GPT

NEEDS_TORCH = "the demo tests need torch (pip install torch, or the demo extra)"

if torch is None:
    # Every module here needs torch: each is skipped, saying why. (A module-level
    # importorskip in this conftest would abort `pytest tests/demo` with a traceback,
    # as it is then loaded before collection starts.)
    class _NeedsTorch(pytest.Module):
        def collect(self):
            pytest.skip(NEEDS_TORCH, allow_module_level=True)

    def pytest_pycollect_makemodule(module_path, parent):
        return _NeedsTorch.from_parent(parent, path=module_path)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes a few seconds (demo model tests)")


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    from spec_metrics.demo.corpus import load_corpus

    return load_corpus()


@pytest.fixture(scope="session")
def target() -> GPT:
    # The default demo target; trained once (~15-25 s on 2 CPU cores) and then
    # loaded from the user cache dir, exactly as the demo does.
    from spec_metrics.demo.training import load_or_train

    torch.manual_seed(0)
    return load_or_train()


@pytest.fixture(scope="session")
def prompts(corpus: Corpus) -> list[list[int]]:
    """Prompts of very different lengths, including 1 and 2 tokens."""
    rng = random.Random(7)
    out = [corpus.sample_prompt(rng, n, n) for n in (1, 2, 9, 23, 40, 64)]
    out.append(corpus.tokenizer.encode("Return the "))
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(target: GPT):
    # Decoding steps are tiny; with 2 intra-op threads on a shared 2-core box
    # they were measured 5-10x slower.  Restored after each module so other
    # test directories are unaffected.  Depends on `target` so a cold-cache
    # training run still gets all threads.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
