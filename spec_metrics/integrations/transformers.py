"""Stage hooks for Hugging Face transformers' assisted generation and prompt lookup decoding.

    hooks = spec_metrics.SpecDecodeHooks("draft_model", max_draft_tokens=8)
    with instrument(model, hooks):
        model.generate(input_ids, assistant_model=draft)              # or
        model.generate(input_ids, prompt_lookup_num_tokens=8)

transformers has no public hook around a speculative step, so this wraps, on one model
object only, the private factory `_get_candidate_generator` that `generate()` calls once per
assisted call. The candidate generator it returns gets two instance-level wrappers around
its public methods: `get_candidates` (the draft stage) and `update_candidate_strategy`, which
receives the accepted count (`num_matches`) right after the target forward and the
acceptance (the end of the verify stage). Nothing is patched on a class; `remove()` (or
leaving the `with` block) deletes the one instance attribute. transformers is never
imported here: generators are recognised by class name.

One step per assisted iteration, batch size 1 (transformers refuses batch > 1 there):
draft = `get_candidates`; verify = from its return to `update_candidate_strategy` (target
forward, acceptance, KV-cache crop); draft_tokens = the candidate length actually proposed
(0 when prompt lookup finds no match); accepted = `num_matches`. The first step's verify
also prefills the prompt in the target (assisted decoding has no separate prefill).
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Callable

from spec_metrics._core.hooks import SpecDecodeHooks
from spec_metrics._support.drops import StrictModeError

__all__ = ["GenerationInstrumentation", "instrument", "method_of", "TESTED_VERSIONS"]

logger = logging.getLogger("spec_metrics")

TESTED_VERSIONS = ("5.17",)  # transformers releases this wrapping was checked against
_FACTORY = "_get_candidate_generator"

# Candidate generator class (or base class) name -> `method` label. Checked along the MRO,
# most specific first, so EarlyExit (a subclass of Assisted) gets its own label.
_METHODS = {
    "PromptLookupCandidateGenerator": "ngram",
    "EarlyExitCandidateGenerator": "early_exit",
    "MTPCandidateGenerator": "mtp",
    "DFlashTokenCandidateGenerator": "dflash",
    "AssistedCandidateGenerator": "draft_model",
}


def method_of(generator: Any, default: str) -> str:
    """The `method` label for a transformers candidate generator (by class name)."""
    for cls in type(generator).__mro__:
        label = _METHODS.get(cls.__name__)
        if label is not None:
            return label
    return default


class GenerationInstrumentation:
    """Feeds `hooks` from every assisted/prompt-lookup `generate()` call of one model.

    `method="auto"` labels each step by its candidate generator (`draft_model`, `ngram`,
    `early_exit`, `mtp`, `dflash`); any other string labels every step with it. One
    `generate()` at a time per instrumented model: the hooks object is single-threaded.
    """

    def __init__(self, model: Any, hooks: SpecDecodeHooks, *, method: str = "auto") -> None:
        self.model = model
        self.hooks = hooks
        self.method = method
        self.generators = 0  # candidate generators wrapped so far (one per assisted call)
        self._installed = False
        self._open: _StepState | None = None  # the step whose verify is running
        self._warned_k = False

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> GenerationInstrumentation:
        model = self.model
        if _FACTORY in getattr(model, "__dict__", {}):
            raise RuntimeError("spec_metrics: this model is already instrumented (or something "
                               f"else replaced its {_FACTORY}); remove() the other one first")
        original = getattr(model, _FACTORY, None)
        if not callable(original):
            raise RuntimeError(
                f"spec_metrics: {type(model).__name__} has no {_FACTORY}(); this integration "
                f"needs transformers {' or '.join(TESTED_VERSIONS)} (installed: {_version()}). "
                "Pass the model whose generate() you call (not a wrapper such as a PEFT model)"
            )
        if not _version().startswith(tuple(v + "." for v in TESTED_VERSIONS)):
            logger.warning("spec_metrics: transformers %s was not tested with this integration "
                           "(tested: %s); it relies on %s", _version(),
                           ", ".join(TESTED_VERSIONS), _FACTORY)

        def get_candidate_generator(*args: Any, **kwargs: Any) -> Any:
            generator = original(*args, **kwargs)
            if self._installed:
                self._guard("wrap", self._wrap, generator)
            return generator

        # An instance attribute shadows the class method for this object only.
        setattr(model, _FACTORY, get_candidate_generator)
        self._installed = True
        return self

    def remove(self) -> None:
        """Undo install(): generation on this model is no longer observed. Idempotent."""
        if not self._installed:
            return
        self._installed = False
        if _FACTORY in getattr(self.model, "__dict__", {}):
            delattr(self.model, _FACTORY)
        self._close_unfinished()
        self.hooks.poll()

    def __enter__(self) -> GenerationInstrumentation:
        return self if self._installed else self.install()

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    # ---- per generator -----------------------------------------------------------------

    def _wrap(self, generator: Any) -> None:
        hooks = self.hooks
        method = (method_of(generator, hooks.config.method) if self.method == "auto"
                  else self.method)
        self._check_k(generator)
        get_candidates = generator.get_candidates
        update = generator.update_candidate_strategy

        def wrapped_get_candidates(input_ids: Any, **kwargs: Any) -> Any:
            state = self._guard("get_candidates", self._begin_draft, input_ids, method)
            try:
                candidates = get_candidates(input_ids, **kwargs)
            except BaseException:
                if state is not None:
                    hooks.draft_end()
                    hooks.end_step()
                raise
            if state is not None:
                self._guard("get_candidates", self._begin_verify, state, input_ids, candidates)
            return candidates

        def wrapped_update(input_ids: Any, scores: Any, num_matches: Any) -> Any:
            state = self._open
            if state is None:
                return update(input_ids, scores, num_matches)
            self._open = None
            self._guard("update_candidate_strategy", self._end_verify, state, num_matches)
            try:
                return update(input_ids, scores, num_matches)
            finally:
                hooks.end_step()

        # Instance attributes: this generator lives for one generate() call only.
        generator.get_candidates = wrapped_get_candidates
        generator.update_candidate_strategy = wrapped_update
        self.generators += 1

    def _begin_draft(self, input_ids: Any, method: str) -> _StepState:
        self._close_unfinished()
        self.hooks.begin_step(batch_size=int(input_ids.shape[0]), method=method)
        self.hooks.draft_start()
        return _StepState()

    def _begin_verify(self, state: _StepState, input_ids: Any, candidates: Any) -> None:
        self.hooks.draft_end()
        ids = candidates[0] if isinstance(candidates, tuple) else candidates
        # How transformers itself computes candidate_length in _assisted_decoding.
        state.draft_tokens = int(ids.shape[1]) - int(input_ids.shape[1])
        self.hooks.verify_start()
        self._open = state

    def _end_verify(self, state: _StepState, num_matches: Any) -> None:
        self.hooks.verify_end(_as_counts(num_matches), state.draft_tokens)

    def _close_unfinished(self) -> None:
        """A verify that never reached update_candidate_strategy (the target forward raised):
        end_step() drops the open stage and counts it (reason `stage_not_ended`)."""
        if self._open is not None:
            self._open = None
            self.hooks.end_step()

    def _check_k(self, generator: Any) -> None:
        bound = _max_draft_tokens(generator)
        max_k = self.hooks.config.max_draft_tokens
        if bound is not None and bound > max_k and not self._warned_k:
            self._warned_k = True
            logger.warning(
                "spec_metrics: %s may propose %d draft tokens per step but the hooks were built "
                "with max_draft_tokens=%d: steps with more drafts are dropped "
                "(draft_tokens_exceed_max). Pass SpecDecodeHooks(..., max_draft_tokens=%d)",
                type(generator).__name__, bound, max_k, bound)

    def _guard(self, where: str, function: Callable[..., Any], *args: Any) -> Any:
        """Our own bookkeeping must never break generate(); strict mode still raises."""
        try:
            return function(*args)
        except StrictModeError:
            raise
        except Exception:
            logger.exception("spec_metrics: transformers integration failed in %s; "
                             "generation goes on unobserved for this step", where)
            return None


class _StepState:
    __slots__ = ("draft_tokens",)

    def __init__(self) -> None:
        self.draft_tokens = 0


def instrument(model: Any, hooks: SpecDecodeHooks, *,
               method: str = "auto") -> GenerationInstrumentation:
    """Install the instrumentation on `model` and return it; use it as a context manager, or
    call `.remove()` when done."""
    return GenerationInstrumentation(model, hooks, method=method).install()


def _as_counts(num_matches: Any) -> Any:
    """num_matches is a 0-d tensor (on the target's device) or an int: make it a 1-element
    batch. reshape() on a CUDA tensor queues no copy and does not synchronize."""
    if hasattr(num_matches, "reshape") and getattr(num_matches, "ndim", None) == 0:
        return num_matches.reshape(1)
    return [int(num_matches)]


def _max_draft_tokens(generator: Any) -> int | None:
    """The most draft tokens this generator is configured to propose per step, if fixed."""
    names = {cls.__name__ for cls in type(generator).__mro__}
    if "PromptLookupCandidateGenerator" in names:
        return int(generator.num_output_tokens)
    if "AssistedCandidateGenerator" in names:
        config = getattr(generator, "assistant_generation_config", None)
        schedule = getattr(config, "num_assistant_tokens_schedule", "constant")
        tokens = getattr(generator, "num_assistant_tokens", None)
        if tokens is not None and schedule == "constant":
            return int(tokens)
    return None


def _version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "not installed"
