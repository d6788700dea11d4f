"""sglang-style engines: sglang's speculative stage vocabulary mapped onto the hooks.

sglang times speculative stages per request: a worker takes one `time.perf_counter()` for the
batch (`set_time_batch(batch.reqs, "set_spec_draft_start_time", trace_only=True)`) and copies
it into every request's time stats, which become trace slices `spec_draft`, `spec_verify`
(trace level 2) and `spec_draft_extend` (level 3). `SglangSpecAdapter` takes the same calls
and records one step for the whole batch through `SpecDecodeHooks` instead:

    spec = SglangSpecAdapter(hooks, draft_tokens=num_steps, forward=set_time_batch)
    spec.set_time_batch(batch.reqs, "set_spec_draft_start_time", trace_only=True)  # as before
    ...
    spec.verify_end_batch(batch.reqs, verify_output.num_accepted_drafts_per_req_cpu)

`forward=` keeps sglang's own per-request slices: every call is passed on to it unchanged.
"""

from __future__ import annotations

import logging
from operator import attrgetter
from typing import Any, Callable, Sequence

import numpy as np

from spec_metrics._core.hooks import SpecDecodeHooks
from spec_metrics._support.drops import StrictModeError

__all__ = ["SglangSpecAdapter", "STAGE_LEVELS", "STAGE_NAMES", "SET_FUNCS",
           "SUPPORTED_SGLANG_VERSIONS", "SGLANG_SETTERS", "SGLANG_STAGES"]

logger = logging.getLogger("spec_metrics")

# sglang's RequestStage names and trace levels of the speculative slices.
STAGE_LEVELS: dict[str, int] = {"spec_draft": 2, "spec_verify": 2, "spec_draft_extend": 3}
# sglang stage name -> spec_metrics stage name.
STAGE_NAMES: dict[str, str] = {
    "spec_draft": "draft", "spec_verify": "verify", "spec_draft_extend": "draft_extend",
}

_DRAFT_START, _DRAFT_END, _VERIFY_START, _VERIFY_END, _EXTEND_START, _EXTEND_END = range(6)
# The time-stats setters a sglang worker names in set_time_batch(); any other name is only
# forwarded.
SET_FUNCS: dict[str, int] = {
    "set_spec_draft_start_time": _DRAFT_START,
    "set_spec_draft_end_time": _DRAFT_END,
    "set_spec_verify_start_time": _VERIFY_START,
    "set_spec_verify_end_time": _VERIFY_END,
    "set_spec_draft_extend_start_time": _EXTEND_START,
    "set_spec_draft_extend_end_time": _EXTEND_END,
}

# What the adapter mirrors, per sglang release, as that release's wheel has it
# (tests/integrations/test_sglang_source.py reads the wheels with `ast`): the
# `SchedulerReqTimeStats` setters of `sglang/srt/observability/req_time_stats.py` (the
# others of SET_FUNCS are absent there), and its `RequestStage` spec stages with their
# trace levels. Every release has `set_time_batch(reqs, set_func, trace_only, attrs)`.
_ALL_SETTERS = tuple(SET_FUNCS)
SGLANG_SETTERS: dict[str, tuple[str, ...]] = {
    "0.5.11": _ALL_SETTERS,
    "0.5.12": _ALL_SETTERS,
    # No verify-end setter and no draft-extend stage: end verify with verify_end_batch().
    "0.5.23": ("set_spec_draft_start_time", "set_spec_draft_end_time",
               "set_spec_verify_start_time"),
}
SGLANG_STAGES: dict[str, dict[str, int]] = {
    "0.5.11": STAGE_LEVELS,
    "0.5.12": STAGE_LEVELS,
    "0.5.23": {"spec_draft": 2, "spec_verify": 2},
}
SUPPORTED_SGLANG_VERSIONS = tuple(SGLANG_SETTERS)

SetTimeBatch = Callable[..., Any]


class SglangSpecAdapter:
    """One decode step per batch from sglang-style stage boundaries.

    A step opens at `set_spec_draft_start_time` (or the first stage seen) and closes at the
    end of its last recorded stage: draft_extend, or verify when draft_extend is not recorded
    (`draft_extend=False` for an n-gram worker, or `trace_level` 2). A step still open when
    the next draft starts is closed first.
    """

    def __init__(
        self,
        hooks: SpecDecodeHooks,
        *,
        trace_level: int = 3,
        draft_tokens: Any = None,
        draft_extend: bool = True,
        request_id_attr: str | None = None,
        forward: SetTimeBatch | None = None,
    ) -> None:
        """
        Args:
          hooks: the SpecDecodeHooks that record the steps.
          trace_level: sglang's levels: below 2 nothing is recorded (every call returns after
            one flag check, or goes straight to `forward`); 2 records spec_draft and
            spec_verify; 3 also spec_draft_extend. Our metrics are cheap at any level, so the
            default records everything; pass sglang's `--trace-level` to mirror it.
          draft_tokens: K (draft tokens per request) used when a verify end gives none.
          draft_extend: whether the worker has a draft-extend stage (EAGLE yes, n-gram no).
          request_id_attr: attribute of a request holding its id (sglang: "rid"); the ids go
            on traced steps' spans. None: not collected (saves a pass over the batch).
          forward: sglang's own `set_time_batch`, called after ours with the same arguments.
        """
        if not isinstance(trace_level, int) or isinstance(trace_level, bool) or trace_level < 0:
            raise ValueError(f"spec_metrics: trace_level must be an integer >= 0, "
                             f"got {trace_level!r}")
        self.hooks = hooks
        self.trace_level = trace_level
        self._forward = forward
        self._default_k = draft_tokens
        self._ids = attrgetter(request_id_attr) if request_id_attr else None
        self._on = hooks.enabled and trace_level >= STAGE_LEVELS["spec_draft"]
        self._extend = self._on and draft_extend and trace_level >= STAGE_LEVELS[
            "spec_draft_extend"]
        self._step_open = False
        if not self._on:
            # Decided once: the calls become plain functions that do nothing of ours.
            self.set_time_batch = forward if forward is not None else _noop_set_time_batch  # type: ignore[method-assign]
            self.verify_end_batch = _noop_verify_end_batch  # type: ignore[method-assign]
            self.set_spec_verify_end_time_batch = _noop_set_spec_verify_end_time_batch  # type: ignore[method-assign]
            self.end_step = _noop  # type: ignore[method-assign]

    @property
    def enabled(self) -> bool:
        return self._on

    @property
    def records_draft_extend(self) -> bool:
        return self._extend

    def set_time_batch(self, reqs: Sequence[Any] | None, set_func: str,
                       trace_only: bool = False, attrs: dict[str, Any] | None = None) -> None:
        """Drop-in for sglang's `set_time_batch`: one timestamp for the whole batch.

        `trace_only` and `attrs` are only passed on to `forward`: spec_metrics records its
        stages whether or not sglang's tracing is on.
        """
        code = SET_FUNCS.get(set_func)
        if code is not None and reqs:
            try:
                self._stage(code, reqs)
            except StrictModeError:
                raise
            except Exception:
                self.hooks.collector.drops.counts["internal_error"] += 1
                logger.exception("spec_metrics: sglang adapter failed in %s; step data "
                                 "dropped (please report)", set_func)
        if self._forward is not None:
            if attrs is None:
                self._forward(reqs, set_func, trace_only=trace_only)
            else:
                self._forward(reqs, set_func, trace_only=trace_only, attrs=attrs)

    def verify_end_batch(self, reqs: Sequence[Any], num_correct_drafts: Any,
                         draft_tokens: Any = None) -> None:
        """End verify for the batch with each request's accepted draft tokens, the bonus
        token not included (sglang: `verify_output.num_accepted_drafts_per_req_cpu`).

        `num_correct_drafts`: list, numpy array or torch tensor (a CUDA tensor is copied
        without blocking). `draft_tokens`: K or one count per request; default: the
        adapter's.
        """
        self.hooks.verify_end(num_correct_drafts,
                              self._default_k if draft_tokens is None else draft_tokens)
        if not self._extend:
            self._close()

    def set_spec_verify_end_time_batch(self, reqs: Sequence[Any], accept_lens: Any,
                                       draft_tokens: Any = None) -> None:
        """Drop-in for sglang's helper of that name: `accept_lens` counts the bonus token
        (one more than the accepted draft tokens), so one is subtracted."""
        try:
            if isinstance(accept_lens, (list, tuple)):
                accept_lens = np.asarray(accept_lens)
            accepted = accept_lens - 1
        except Exception:
            self.hooks.collector.drops.reject(
                "sglang.set_spec_verify_end_time_batch", "wrong_type",
                f"accept_lens must be a list, numpy array or tensor of counts, got "
                f"{type(accept_lens).__name__}; the verify stage is timed without counts",
                self.hooks.config.strict)
            accepted = None
        self.verify_end_batch(reqs, accepted, draft_tokens)

    def end_step(self) -> None:
        """Close the open step now (e.g. when the engine goes idle)."""
        self._close()

    # ---- internals ---------------------------------------------------------------------

    def _stage(self, code: int, reqs: Sequence[Any]) -> None:
        hooks = self.hooks
        if code == _DRAFT_START:
            if self._step_open:
                hooks.end_step()
            ids = list(map(self._ids, reqs)) if self._ids is not None else None
            hooks.begin_step(request_ids=ids, batch_size=len(reqs))
            self._step_open = True
            hooks.draft_start()
        elif code == _DRAFT_END:
            hooks.draft_end()
        elif code == _VERIFY_START:
            if not self._step_open:
                hooks.begin_step(batch_size=len(reqs))
                self._step_open = True
            hooks.verify_start()
        elif code == _VERIFY_END:
            # sglang's per-request setter carries the counts; through set_time_batch there
            # are none: the stage is timed, the counts come from the batch call if made.
            hooks.verify_end()
            if not self._extend:
                self._close()
        elif self._extend:
            if code == _EXTEND_START:
                hooks.draft_extend_start()
            else:
                hooks.draft_extend_end()
                self._close()

    def _close(self) -> None:
        if self._step_open:
            self._step_open = False
            self.hooks.end_step()


def _noop() -> None:
    return None


def _noop_set_time_batch(reqs: Any, set_func: str, trace_only: bool = False,
                         attrs: Any = None) -> None:
    return None


def _noop_verify_end_batch(reqs: Any, num_correct_drafts: Any, draft_tokens: Any = None) -> None:
    return None


def _noop_set_spec_verify_end_time_batch(reqs: Any, accept_lens: Any,
                                         draft_tokens: Any = None) -> None:
    return None
