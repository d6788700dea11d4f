"""The transformers integration against real generate() calls on tiny models built in code.

What transformers itself did (candidate lengths, num_matches) is recorded independently by
class-level wrappers installed with monkeypatch, and compared with what the hooks recorded.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation import candidate_generator as hf_candidates  # noqa: E402

import spec_metrics  # noqa: E402
from spec_metrics.integrations.transformers import (  # noqa: E402
    GenerationInstrumentation,
    instrument,
    method_of,
)
from tests.conftest import sample_value, scrape  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K = 4
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    """A random target and a draft = target + noise (30% of each tensor's std): the draft
    agrees with the target often, not always."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    target = LlamaForCausalLM(config).eval()
    draft = LlamaForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=noise) * 0.3 * parameter.std())
    draft.generation_config.num_assistant_tokens = K
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    return target, draft


@pytest.fixture
def prompt() -> Any:
    return torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """[candidate length, num_matches] per assisted step, as transformers produced them."""
    steps: list[list[int]] = []
    for cls in (hf_candidates.AssistedCandidateGenerator,
                hf_candidates.PromptLookupCandidateGenerator):
        get_candidates, update = cls.get_candidates, cls.update_candidate_strategy

        def recording_get(self: Any, input_ids: Any, _original: Any = get_candidates,
                          **kwargs: Any) -> Any:
            candidates, logits = _original(self, input_ids, **kwargs)
            steps.append([candidates.shape[1] - input_ids.shape[1]])
            return candidates, logits

        def recording_update(self: Any, input_ids: Any, scores: Any, num_matches: Any,
                             _original: Any = update) -> Any:
            steps[-1].append(int(num_matches))
            return _original(self, input_ids, scores, num_matches)

        monkeypatch.setattr(cls, "get_candidates", recording_get)
        monkeypatch.setattr(cls, "update_candidate_strategy", recording_update)
    return steps


def _hooks(registry: Any, provider: Any, **options: Any) -> spec_metrics.SpecDecodeHooks:
    options.setdefault("max_draft_tokens", K)
    return spec_metrics.SpecDecodeHooks("unused", registry=registry, tracer_provider=provider,
                                        trace_ratio=1.0, outlier_quantile=None,
                                        max_traced_steps_per_second=100_000, **options)


def _generate(model: Any, prompt: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def _check_run(registry: Any, exporter: Any, steps: list[list[int]], method: str,
               new_tokens: int) -> None:
    drafted = [d for d, _ in steps]
    matches = [m for _, m in steps]
    families = scrape(registry)

    def value(family: str, sample: str, **labels: str) -> float:
        return sample_value(families, family, sample, method=method, **labels)

    stage = "spec_decode_stage_duration_seconds"
    assert value(stage, stage + "_count", stage="draft") == len(steps)
    assert value(stage, stage + "_count", stage="verify") == len(steps)
    assert value(stage, stage + "_count", stage="draft_extend") == 0  # HF has no such stage
    step = "spec_decode_step_duration_seconds"
    assert value(step, step + "_count") == len(steps)
    assert value("spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total") \
        == sum(matches)
    assert value("spec_decode_draft_tokens", "spec_decode_draft_tokens_total") == sum(drafted)
    assert value("spec_decode_drafts", "spec_decode_drafts_total") \
        == sum(1 for d in drafted if d > 0)
    # Each step emits num_matches + 1 tokens: the emitted counter is the generated length.
    assert value("spec_decode_emitted_tokens", "spec_decode_emitted_tokens_total") == new_tokens
    for position in range(K):
        assert value("spec_decode_accepted_tokens_per_position",
                     "spec_decode_accepted_tokens_per_position_total", position=str(position)) \
            == sum(1 for m in matches if m > position)

    spans = exporter.get_finished_spans()
    step_spans = sorted((s for s in spans if s.name == "spec_decode.step"),
                        key=lambda s: s.attributes["spec_decode.step"])
    assert len(step_spans) == len(steps)
    assert [s.attributes["spec_decode.accepted_tokens"] for s in step_spans] == matches
    assert [s.attributes["spec_decode.draft_tokens"] for s in step_spans] == drafted
    assert {s.attributes["spec_decode.method"] for s in step_spans} == {method}
    for name in ("spec_decode.draft", "spec_decode.verify"):
        children = [s for s in spans if s.name == name]
        assert sorted(c.parent.span_id for c in children) \
            == sorted(s.context.span_id for s in step_spans)
    assert not [s for s in spans if s.name == "spec_decode.draft_extend"]


def test_assisted_generation(models: Any, prompt: Any, seen: list[list[int]], registry: Any,
                             provider: Any, exporter: Any) -> None:
    target, draft = models
    plain = _generate(target, prompt)
    hooks = _hooks(registry, provider)
    with instrument(target, hooks) as instrumentation:
        out = _generate(target, prompt, assistant_model=draft)
    hooks.flush()
    assert instrumentation.generators == 1
    assert torch.equal(out, plain)  # speculative greedy decoding changes nothing
    assert seen and all(len(s) == 2 for s in seen)
    accepted, drafted = sum(m for _, m in seen), sum(d for d, _ in seen)
    assert 0 < accepted < drafted  # the draft disagrees with the target, sometimes
    _check_run(registry, exporter, seen, "draft_model", out.shape[1] - prompt.shape[1])


def test_prompt_lookup(models: Any, seen: list[list[int]], registry: Any, provider: Any,
                       exporter: Any) -> None:
    target, _ = models
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]])
    hooks = _hooks(registry, provider)
    with instrument(target, hooks):
        out = _generate(target, prompt, prompt_lookup_num_tokens=K)
    hooks.flush()
    assert torch.equal(out, _generate(target, prompt))
    drafted = [d for d, _ in seen]
    assert 0 in drafted and max(drafted) == K  # lookup misses propose nothing
    assert 0 < sum(m for _, m in seen) < sum(drafted)
    _check_run(registry, exporter, seen, "ngram", out.shape[1] - prompt.shape[1])


def test_fixed_method_label(models: Any, prompt: Any, registry: Any, provider: Any) -> None:
    target, draft = models
    hooks = _hooks(registry, provider)
    with instrument(target, hooks, method="eagle_like"):
        _generate(target, prompt, assistant_model=draft)
    families = scrape(registry)
    methods = {s.labels["method"] for s in families["spec_decode_drafts"].samples}
    assert methods == {"eagle_like"}


def test_removed_afterwards(models: Any, prompt: Any, seen: list[list[int]], registry: Any,
                            provider: Any, exporter: Any) -> None:
    target, draft = models
    hooks = _hooks(registry, provider)
    instrumentation = instrument(target, hooks)
    assert "_get_candidate_generator" in vars(target)
    _generate(target, prompt, assistant_model=draft)
    steps = len(seen)
    instrumentation.remove()
    instrumentation.remove()  # idempotent
    assert not instrumentation.installed
    assert "_get_candidate_generator" not in vars(target)
    # Generation still works, transformers still drafts, and nothing reaches the hooks.
    out = _generate(target, prompt, assistant_model=draft)
    assert len(seen) > steps
    assert torch.equal(out, _generate(target, prompt))
    families = scrape(registry)
    assert sample_value(families, "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count", method="draft_model") == steps
    assert instrumentation.generators == 1
    # It can be installed again.
    with instrumentation:
        assert "_get_candidate_generator" in vars(target)
    assert "_get_candidate_generator" not in vars(target)


def test_refuses_double_install_and_non_models(models: Any, registry: Any,
                                               provider: Any) -> None:
    target, _ = models
    hooks = _hooks(registry, provider)
    with instrument(target, hooks):
        with pytest.raises(RuntimeError, match="already instrumented"):
            instrument(target, hooks)
    with pytest.raises(RuntimeError, match="has no _get_candidate_generator"):
        GenerationInstrumentation(object(), hooks).install()
    assert "_get_candidate_generator" not in vars(target)


def test_warns_when_k_exceeds_max_draft_tokens(models: Any, seen: list[list[int]],
                                               registry: Any, provider: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    target, _ = models
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]])
    hooks = _hooks(registry, provider, max_draft_tokens=2)
    with caplog.at_level(logging.WARNING, logger="spec_metrics"):
        with instrument(target, hooks):
            _generate(target, prompt, prompt_lookup_num_tokens=K)
    assert any("max_draft_tokens=2" in r.getMessage() and "max_draft_tokens=4" in r.getMessage()
               for r in caplog.records)
    over = sum(1 for d, _ in seen if d > 2)
    assert over > 0
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="draft_tokens_exceed_max") == over


def test_target_failure_drops_the_open_verify(models: Any, prompt: Any, seen: list[list[int]],
                                              registry: Any, provider: Any) -> None:
    target, draft = models
    hooks = _hooks(registry, provider)
    calls = []

    def fail_third_forward(module: Any, args: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("target forward failed")

    handle = target.register_forward_pre_hook(fail_third_forward)
    try:
        with instrument(target, hooks):
            with pytest.raises(RuntimeError, match="target forward failed"):
                _generate(target, prompt, assistant_model=draft)
    finally:
        handle.remove()
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="stage_not_ended") == 1
    # Two complete steps; the third step kept its draft stage, its verify was dropped.
    assert sample_value(families, "spec_decode_stage_duration_seconds",
                        "spec_decode_stage_duration_seconds_count", method="draft_model",
                        stage="verify") == 2
    assert sample_value(families, "spec_decode_stage_duration_seconds",
                        "spec_decode_stage_duration_seconds_count", method="draft_model",
                        stage="draft") == 3
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="draft_model") \
        == sum(m for _, m in seen[:2])


def test_method_labels_by_generator_class() -> None:
    lookup = hf_candidates.PromptLookupCandidateGenerator(num_output_tokens=3)
    assert method_of(lookup, "x") == "ngram"
    early_exit = hf_candidates.EarlyExitCandidateGenerator.__new__(
        hf_candidates.EarlyExitCandidateGenerator)
    assert method_of(early_exit, "x") == "early_exit"
    assert method_of(object(), "fallback") == "fallback"


def test_import_stays_light() -> None:
    code = ("import sys, spec_metrics, spec_metrics.integrations.transformers; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_example_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "examples/hf_assisted_generation.py", "--mode", "prompt_lookup",
         "--prompts", "2", "--max-new-tokens", "24"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "outputs identical to the target's greedy output: 2/2" in result.stdout
    assert "emitted=48 (generated 48)" in result.stdout
