"""Context-manager forms of the hooks: `with hooks.step()`, `with hooks.draft()`, ...

One scope object per stage is made with the hooks and reused every step, so entering a
stage allocates nothing. They are not re-entrant, like the stages they time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spec_metrics.catalog import STAGES

if TYPE_CHECKING:
    from spec_metrics._core.hooks import SpecDecodeHooks

__all__ = ["StageScope", "VerifyScope", "StepScope"]

_VERIFY = STAGES.index("verify")


class StageScope:
    __slots__ = ("_hooks", "_stage")

    def __init__(self, hooks: "SpecDecodeHooks", stage: int) -> None:
        self._hooks = hooks
        self._stage = stage

    def __enter__(self) -> "StageScope":
        hooks = self._hooks
        if hooks._on:
            hooks._start(self._stage, f"{STAGES[self._stage]}_start")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        hooks = self._hooks
        if hooks._on:
            if exc_type is not None:
                _drop_quietly(hooks, self._stage)
            else:
                hooks._end(self._stage, f"{STAGES[self._stage]}_end")


class VerifyScope(StageScope):
    __slots__ = ("_accepted", "_draft_tokens", "_groups")

    def __init__(self, hooks: "SpecDecodeHooks") -> None:
        super().__init__(hooks, _VERIFY)
        self._accepted: Any = None
        self._draft_tokens: Any = None
        self._groups: Any = None

    def set_accepted(self, accepted: Any, draft_tokens: Any, groups: Any = None) -> None:
        """What verify_end(accepted, draft_tokens, groups) receives when the block exits."""
        self._accepted, self._draft_tokens, self._groups = accepted, draft_tokens, groups

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        accepted, drafts, groups = self._accepted, self._draft_tokens, self._groups
        self._accepted = self._draft_tokens = self._groups = None
        hooks = self._hooks
        if hooks._on:
            if exc_type is not None:
                _drop_quietly(hooks, _VERIFY)
            else:
                hooks.verify_end(accepted, drafts, groups)


class StepScope:
    __slots__ = ("_hooks", "arguments")

    def __init__(self, hooks: "SpecDecodeHooks") -> None:
        self._hooks = hooks
        self.arguments: tuple = (None, None, None, None)

    def __enter__(self) -> "StepScope":
        self._hooks.begin_step(*self.arguments)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.arguments = (None, None, None, None)
        self._hooks.end_step()


def _drop_quietly(hooks: "SpecDecodeHooks", stage: int) -> None:
    """The engine raised inside a stage: forget that stage (it is not bad input), so that
    the engine may retry it in the same step."""
    if hooks._open == stage:
        hooks._forget_open()
