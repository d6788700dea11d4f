"""The stage hooks an engine calls: one call per stage per decode step, for the whole batch.

    hooks = SpecDecodeHooks(method="eagle", labels={"model": "llama-3-8b"})
    hooks.begin_step(request_ids=ids, traceparents=tps)      # optional
    hooks.draft_start();  ...;  hooks.draft_end()
    hooks.verify_start(); ...;  hooks.verify_end(accepted, draft_tokens=4)
    hooks.draft_extend_start(); ...; hooks.draft_extend_end()
    hooks.end_step()

On the engine thread the hooks only take a timestamp per call, copy the counts and, at
`end_step()`, append the step to a queue. The rest (checking the counts, the trace sink's
decision and spans, aggregation, exemplars) runs on spec_metrics' worker thread, or in a
scrape, which first consumes what is queued so /metrics shows every step ended before it.
Steps holding CUDA tensors wait, without synchronizing, until their copies have landed.
`consumer="inline"` (and strict mode) consume at `end_step()` on the engine thread instead.
"""

from __future__ import annotations

import reprlib
from time import perf_counter_ns
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from opentelemetry import trace
from prometheus_client.registry import REGISTRY, CollectorRegistry

from spec_metrics._core.cuda_timing import CudaEventTimer
from spec_metrics._core.device_ring import DeviceRings
from spec_metrics._core.groups import to_groups
from spec_metrics._core.inputs import DeviceArray, PinnedPool, summarize, to_counts, to_draft_tokens
from spec_metrics._core.pending import PendingSteps, Raw
from spec_metrics._core.scopes import StageScope, StepScope, VerifyScope
from spec_metrics._core.sinks import StepResult, StepSinks
from spec_metrics._core.worker import WAKE_AT, WORKER
from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._support.config import HooksConfig
from spec_metrics._support.drops import DropCounter, InputRejected, StrictModeError
from spec_metrics._support.forking import keep_forever, reset_after_fork
from spec_metrics._support.log import logger
from spec_metrics._tracing.sink import TraceSink
from spec_metrics._tracing.traceparent import any_sampled
from spec_metrics.catalog import STAGES

__all__ = ["SpecDecodeHooks"]

_DRAFT, _VERIFY, _EXTEND = range(3)
_NO_STEP = -2  # SpecDecodeHooks._last when no step is open (-1: open, no stage started yet)
_NOT = object()  # a value the quick path of verify_end does not copy


class SpecDecodeHooks:
    """Stage hooks for one engine loop. Configure once; call per step for the whole batch.

    Not thread-safe per object: one engine loop drives one hooks object. Several hooks
    objects (threads, methods) may share one collector via `collector=`.
    """

    # Slots, not a __dict__: with this many attributes a dict-backed instance makes every
    # method lookup take CPython's slow path (a disabled hook then costs 1.5x a bare call).
    __slots__ = ("config", "collector", "_on", "_strict", "_method", "_max_k", "_group_label",
                 "_rank", "_registered_in", "_drops", "_tracer", "_gpu", "_pinned", "_rings",
                 "_sinks", "_steps", "_inline", "_pending", "_handed", "_queue_limit", "_wake_at",
                 "_quick", "_defer_summary", "_times", "_open", "_last", "_rd", "_rv", "_re",
                 "_counts", "_begin", "_step_method", "_gpu_marks", "_release", "_handoff",
                 "_scopes", "_step_scope", "__weakref__")

    def __init__(
        self,
        method: str = "unknown",
        *,
        labels: Mapping[str, str] | None = None,
        registry: CollectorRegistry | None = REGISTRY,
        collector: SpecDecodeCollector | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        on_step: Callable[[StepResult], None] | None = None,
        **options: Any,
    ) -> None:
        """
        Args:
          method: speculative method, the `method` label ("eagle", "ngram", "draft_model").
          labels: constant labels on every series, e.g. {"model": ..., "engine": ...}.
          registry: where the collector is registered; None to register nowhere.
          collector: share another hooks object's collector instead of making one.
          tracer_provider: OpenTelemetry provider; default: the global one (never set here).
          on_step: called with a `StepResult` after each step reached the sinks (for logs,
            summaries); it runs where steps are consumed (the worker thread, a scrape,
            or the engine thread with consumer="inline"), in order; keep it cheap.
          options: any field of `HooksConfig` (trace_ratio, strict, slow_step_seconds, ...).
        """
        config = HooksConfig.resolve(method=method, labels=labels, **options)
        self.config = config
        self._on = config.enabled and (config.metrics or config.tracing)
        self._strict = config.strict
        self._method = config.method
        self._max_k = config.max_draft_tokens
        self._group_label = config.group_label
        # Position of each stage (indexed like STAGES) in the configured order.
        self._rank = [config.stage_order.index(name) for name in STAGES]
        if collector is None:
            target = registry if (self._on and config.metrics) else None
            try:
                collector = SpecDecodeCollector(
                    config.labels, max_draft_tokens=config.max_draft_tokens,
                    stage_buckets=config.stage_buckets, step_buckets=config.step_buckets,
                    drops=DropCounter(config.warn_interval_seconds),
                    exemplar_hold_seconds=config.exemplar_hold_seconds,
                    max_methods=config.max_methods, group_label=config.group_label,
                    max_groups=config.max_groups, registry=target,
                )
            except ValueError as exc:
                raise ValueError(
                    "spec_metrics: this registry already holds spec_metrics' metrics (another "
                    "SpecDecodeHooks registered them). Share that collector with "
                    "SpecDecodeHooks(..., collector=first.collector), or pass registry=None "
                    f"or a separate CollectorRegistry ({exc})"
                ) from exc
            self._registered_in = target
        else:
            self._registered_in = None
            explicit = set(options) | ({"labels"} if labels else set())
            collector._check_shared(config, explicit)
        self.collector = collector
        self._drops = collector.drops
        self._tracer = (
            TraceSink(config, self._drops, tracer_provider, collector.skipped, collector.withheld)
            if self._on and config.tracing else None
        )
        self._gpu = CudaEventTimer() if self._on and config.timer == "cuda" else None
        self._pinned = PinnedPool()
        self._sinks = StepSinks(collector if config.metrics else None, self._tracer, self._gpu,
                                self._max_k, self._reject, on_step)
        self._steps = 0
        # Strict mode checks and aggregates at the hook, so that its errors are raised there.
        self._inline = config.consumer == "inline" or config.strict
        # With the worker, CUDA counts are copied on the engine's stream into device rows
        # that the consumer reads back in blocks (device_ring.py); inline, one by one.
        self._rings = DeviceRings() if self._on and not self._inline else None
        self._pending = PendingSteps(self._sinks.consume, config.max_pending_steps,
                                     self._reject, config.batch_steps if self._inline else 1,
                                     config.max_queued_steps, self._method,
                                     self._internal_error)
        if self._inline:
            self._sinks.deferred_where = "reduced in a batch"
        elif on_step is None:  # a listener gets each step's result: one by one then
            self._pending.consume_batch = self._sinks.consume_batch
        self._handed = self._pending.handed
        self._queue_limit = config.max_queued_steps
        self._wake_at = min(WAKE_AT, config.max_queued_steps)
        # With the worker, verify_end copies host counts unchecked (the consumer checks
        # them); inline, it checks them at the hook (and summarizes them, unless batched).
        self._quick = not self._inline
        self._defer_summary = not config.strict and (not self._inline or config.batch_steps > 1)
        # The open step, as plain attributes the stage hooks write directly:
        self._times = [0] * 6  # perf_counter_ns: start and end of each stage (STAGES order)
        self._open = -1  # index of the stage started and not yet ended
        self._last = _NO_STEP  # rank (in stage_order) of the stage started last
        self._rd, self._rv, self._re = self._rank
        self._counts: tuple | None = None  # see pending.Raw
        self._begin: tuple | None = None  # (batch_size, request_ids, traceparents, sampled)
        self._step_method: str | None = None
        self._gpu_marks: list[Any] | None = None
        self._release: list[DeviceArray] | None = None  # device copies the engine waits for
        # end_step's common case applies: a worker consumes, and no device copy to release.
        self._handoff = not self._inline
        self._scopes = (StageScope(self, _DRAFT), VerifyScope(self), StageScope(self, _EXTEND))
        self._step_scope = StepScope(self)
        reset_after_fork(self)
        # Decided here, once, by the object's class: disabled hooks are methods that do
        # nothing (as cheap as any method call), CUDA-timed ones record events.
        if not self._on:
            self.__class__ = _DisabledHooks
        else:
            if not self._inline:
                collector._feed(self._pending)
                WORKER.attach(self._pending)
            if self._gpu is not None:
                self.__class__ = _CudaTimedHooks

    @property
    def enabled(self) -> bool:
        return self._on

    # ---- step boundaries ---------------------------------------------------------------

    def begin_step(self, request_ids: Sequence[Any] | None = None,
                   traceparents: Sequence[str | None] | None = None,
                   batch_size: int | None = None, method: str | None = None) -> None:
        """Open a step (optional: the first stage start opens one). `request_ids` and
        `traceparents` are copied (at C speed) and only parsed if the step is traced."""
        try:
            if self._open >= 0:
                self._discard_open("begin_step")
            if self._last != _NO_STEP:
                self._close_step()  # before the reject, which raises in strict mode
                self._reject("begin_step", "out_of_order",
                             "begin_step() called before end_step() closed the previous step; "
                             "the previous step was closed now")
            request_ids = self._per_request("request_ids", request_ids)
            traceparents = self._per_request("traceparents", traceparents)
            if batch_size is not None and (isinstance(batch_size, bool)
                                           or not hasattr(batch_size, "__index__")
                                           or batch_size < 0):
                self._reject("begin_step", "wrong_type", "batch_size must be an int >= 0, got "
                                                          f"{_short(batch_size)}; ignored")
                batch_size = None
            sizes = {len(x) for x in (request_ids, traceparents) if x is not None}
            if batch_size is not None:
                batch_size = int(batch_size)
                sizes.add(batch_size)
            if len(sizes) > 1:
                self._reject("begin_step", "wrong_shape",
                             f"batch_size/request_ids/traceparents disagree on the batch size: "
                             f"{sorted(sizes)}; they were ignored for this step")
                request_ids = traceparents = batch_size = None
                sizes = set()
            if method is not None and not (isinstance(method, str) and method):
                self._reject("begin_step", "wrong_type", f"method must be a non-empty string, "
                                                          f"got {method!r}")
                method = None
            # Copied now: the engine may reuse its lists, and the step is read later.
            if request_ids is not None:
                request_ids = tuple(request_ids)
            sampled = False
            if traceparents is not None:
                traceparents = tuple(traceparents)
                sampled = any_sampled(traceparents)
            size = sizes.pop() if sizes else None
            if size is not None or request_ids is not None or traceparents is not None:
                self._begin = (size, request_ids, traceparents, sampled)
            self._step_method = method
            self._last = -1
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("begin_step")

    def end_step(self) -> None:
        """Close the step and hand it over (to the worker, or to the sinks when inline)."""
        if self._open < 0 and self._last != _NO_STEP and self._handoff:
            # The common case, on the engine thread: one tuple appended to a deque.
            handed = self._handed
            handed.append((self._steps, self._step_method, self._times, self._counts,
                           self._begin, self._gpu_marks))
            self._steps += 1
            self._times = [0, 0, 0, 0, 0, 0]
            self._counts = self._begin = self._step_method = self._gpu_marks = None
            self._last = _NO_STEP
            queued = len(handed)
            if queued == self._wake_at:
                WORKER.wake()
            elif queued > self._queue_limit:
                self._overflow()
            return
        try:
            if self._open >= 0:
                self._discard_open("end_step")
            if self._last == _NO_STEP:
                self._reject("end_step", "end_without_start", "end_step() without a step: "
                             "no stage was started since the last end_step()")
                return
            self._close_step()
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("end_step")

    # ---- stages ------------------------------------------------------------------------
    # One method per hook, each with its stage's indexes written out: the common case is a
    # timestamp and two or three attribute writes; everything else goes to _start/_end.

    def draft_start(self) -> None:
        now = perf_counter_ns()
        if self._open < 0 and self._last < self._rd:
            self._times[0] = now
            self._open = _DRAFT
            self._last = self._rd
        else:
            self._start(_DRAFT, "draft_start", now)

    def draft_end(self) -> None:
        now = perf_counter_ns()
        if self._open == _DRAFT:
            self._times[1] = now
            self._open = -1
        else:
            self._end(_DRAFT, "draft_end", now)

    def verify_start(self) -> None:
        now = perf_counter_ns()
        if self._open < 0 and self._last < self._rv:
            self._times[2] = now
            self._open = _VERIFY
            self._last = self._rv
        else:
            self._start(_VERIFY, "verify_start", now)

    def verify_end(self, accepted: Any = None, draft_tokens: Any = None,
                   groups: Any = None) -> None:
        """End verify. `accepted`: tokens accepted per request (list, numpy array, torch
        tensor on CPU or CUDA); `draft_tokens`: K for all, or per request. Host counts are
        copied here and checked off the engine thread (at the hook in strict mode). A CUDA
        tensor is copied without blocking, on a side stream after the work queued so far,
        and read at a later step; write it in place only after end_step(), from which
        point the current stream waits (on the device) for that copy.

        `groups`: with `group_label` set, the group value (str: adapter, tenant, workload
        class) of each request, as a list, tuple or numpy array of str or object; acceptance
        is then counted per group. Without it the requests count under group="default"."""
        now = perf_counter_ns()
        if self._open == _VERIFY:
            self._times[3] = now
            self._open = -1
        elif not self._end(_VERIFY, "verify_end", now):
            return
        if accepted is None:
            return
        if self._quick and type(accepted) is np.ndarray and type(draft_tokens) is int \
                and groups is None:
            self._counts = (accepted.copy(), draft_tokens, None)  # checked by the consumer
            return
        self._take_counts(accepted, draft_tokens, groups)

    def draft_extend_start(self) -> None:
        now = perf_counter_ns()
        if self._open < 0 and self._last < self._re:
            self._times[4] = now
            self._open = _EXTEND
            self._last = self._re
        else:
            self._start(_EXTEND, "draft_extend_start", now)

    def draft_extend_end(self) -> None:
        now = perf_counter_ns()
        if self._open == _EXTEND:
            self._times[5] = now
            self._open = -1
        else:
            self._end(_EXTEND, "draft_extend_end", now)

    def declare_drafter(self, target: str, drafter: str, num_speculative_tokens: int,
                        method: str | None = None) -> None:
        """Say what this engine speculates with: `spec_decode_drafter_info{method, target,
        drafter, num_speculative_tokens}` = 1. Call it at start-up and again whenever the
        drafter, the target or K changes (a model update, dynamic speculation's K): the
        new declaration replaces the previous one of the method, and the dashboard marks
        the change. Not for every step: K per request goes to verify_end."""
        try:
            values = {"target": target, "drafter": drafter}
            for name, value in values.items():
                if not (isinstance(value, str) and 0 < len(value) <= 256):
                    raise InputRejected("wrong_type", f"{name} must be a non-empty string of "
                                                      f"at most 256 characters, got "
                                                      f"{_short(value)}")
            k = num_speculative_tokens
            if isinstance(k, bool) or not hasattr(k, "__index__") or not 0 <= k <= 64:
                raise InputRejected("wrong_type", "num_speculative_tokens must be an int in "
                                                  f"0..64, got {_short(k)}")
            if method is not None and not (isinstance(method, str) and method):
                raise InputRejected("wrong_type", f"method must be a non-empty string, got "
                                                  f"{method!r}")
            self.collector.declare_drafter(method or self._method, target, drafter, int(k))
        except InputRejected as rejected:
            self._reject("declare_drafter", rejected.reason, rejected.message)
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("declare_drafter")

    # ---- context-manager forms ---------------------------------------------------------

    def step(self, request_ids: Sequence[Any] | None = None,
             traceparents: Sequence[str | None] | None = None,
             batch_size: int | None = None, method: str | None = None) -> StepScope:
        """`with hooks.step(request_ids=...):` = begin_step(...) ... end_step()."""
        scope = self._step_scope
        scope.arguments = (request_ids, traceparents, batch_size, method)
        return scope

    def draft(self) -> StageScope:
        return self._scopes[_DRAFT]

    def verify(self) -> VerifyScope:
        """`with hooks.verify() as v: ...; v.set_accepted(accepted, draft_tokens)`."""
        return self._scopes[_VERIFY]  # type: ignore[return-value]

    def draft_extend(self) -> StageScope:
        return self._scopes[_EXTEND]

    # ---- lifecycle ---------------------------------------------------------------------

    def warm_up_device(self, max_batch_size: int, buffers: int = 8) -> None:
        """Allocate the pinned host buffers that CUDA counts are copied into, now.

        The first pinned allocation can stall until the device is idle; do it at start-up
        rather than in the first verify_end. With the worker thread (the default) this makes
        the device rows that counts of up to `max_batch_size` requests are copied into
        (device_ring.py; wider batches take the per-step path); `buffers` per dtype (int32
        and int64) covers that many steps in flight on the per-step path before more are
        allocated. With timer="cuda" this also creates the CUDA events ahead.
        """
        import torch

        self._pinned.reserve(max_batch_size, (torch.int64, torch.int32), buffers)
        self._pinned.prepare_device(torch.cuda.current_device(), 2 * buffers)
        if self._rings is not None:
            self._rings.reserve(torch.cuda.current_device(), max_batch_size)
        if self._gpu is not None:
            self._gpu.reserve(2 * len(STAGES) * buffers)

    def poll(self) -> None:
        """Hand finished steps whose device results have landed to the sinks, on this
        thread unless the worker is at it; never waits. Call it when the engine goes idle
        so that the last steps of a burst are not held back until the worker's next look
        (at most 50 ms) or the next scrape."""
        try:
            self._pending.drain(blocking=False)
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("poll")

    def flush(self, timeout_millis: int = 30_000) -> None:
        """Wait for device results of finished steps, hand them to the sinks and flush the
        tracer provider if it can be flushed. For shutdown and tests, not for the hot path."""
        self._pending.flush()
        if self._tracer is not None:
            self._tracer.force_flush(timeout_millis)

    def close(self) -> None:
        """Drop a step left open (no end_step), flush, then unregister the collector this
        object registered. The hooks do nothing afterwards."""
        counts, self._counts = self._counts, None
        release, self._release = self._release, None
        self._open, self._last = -1, _NO_STEP
        for value in (*(counts[:2] if counts else ()), *(release or ())):
            if isinstance(value, DeviceArray):
                value.release_source()
                value.discard()
        self.flush()
        if self._registered_in is not None:
            self._registered_in.unregister(self.collector)
            self._registered_in = None
        self._on = False
        self.__class__ = _DisabledHooks

    def _reset_after_fork(self) -> None:
        """In a forked child: drop the open step, the steps waiting for device results and
        the pinned buffers and events (CUDA cannot be used in a forked child; they are set
        aside unfreed, see forking.py), and restart outlier estimates and the trace rate
        limit; the collector resets itself, the worker starts a new thread."""
        keep_forever((self._counts, self._release, self._gpu_marks))
        self._counts = self._release = self._gpu_marks = self._begin = None
        self._step_method = None
        self._handoff = not self._inline
        self._times = [0] * 6
        self._open, self._last = -1, _NO_STEP
        self._steps = 0
        self._pending._reset_after_fork()
        self._handed = self._pending.handed
        if self._on and not self._inline:
            WORKER.attach(self._pending)  # a new thread in this process
        self._pinned._reset_after_fork()
        if self._rings is not None:
            self._rings._reset_after_fork()
        if self._gpu is not None:
            self._gpu._reset_after_fork()
        if self._tracer is not None:
            self._tracer._reset_after_fork()

    # ---- internals ---------------------------------------------------------------------

    def _start(self, stage: int, hook: str, now: int | None = None) -> None:
        if now is None:
            now = perf_counter_ns()
        try:
            if self._open >= 0:
                self._discard_open(hook)
            rank = self._rank[stage]
            if self._last >= 0 and rank <= self._last:
                last = self._rank.index(self._last)
                self._close_step()  # before the reject, which raises in strict mode
                self._reject(hook, "out_of_order",
                             f"{STAGES[stage]} started after {STAGES[last]} in the "
                             "same step; call end_step() after each step (the previous step "
                             "was closed now)")
            self._times[2 * stage] = now
            if self._gpu is not None:
                marks = self._gpu_marks
                if marks is None:
                    marks = self._gpu_marks = [None] * 6
                marks[2 * stage] = self._gpu.mark()
            self._last = rank
            self._open = stage
        except StrictModeError:
            raise
        except Exception:
            self._internal_error(hook)

    def _end(self, stage: int, hook: str, now: int | None = None) -> bool:
        if now is None:
            now = perf_counter_ns()
        try:
            if self._open != stage:
                open_note = (f"{STAGES[self._open]} is open" if self._open >= 0
                             else "no stage is open")
                self._reject(hook, "end_without_start",
                             f"{hook}() without {STAGES[stage]}_start() ({open_note}); dropped")
                return False
            self._times[2 * stage + 1] = now
            if self._gpu is not None and self._gpu_marks is not None:
                self._gpu_marks[2 * stage + 1] = self._gpu.mark()
            self._open = -1
            return True
        except StrictModeError:
            raise
        except Exception:
            # E.g. the CUDA event could not be recorded: this stage is forgotten, the step
            # goes on without it.
            if self._open == stage:
                self._forget_open()
            self._internal_error(hook)
            return False

    def _take_counts(self, accepted: Any, draft_tokens: Any, groups: Any) -> None:
        """Store the step's counts: host values copied as they are (checked by the
        consumer), else checked here (torch tensors, CUDA copies, strict mode)."""
        if self._quick:
            kind = type(accepted)
            copy = (accepted.copy() if kind is np.ndarray
                    else tuple(accepted) if kind is list or kind is tuple else _NOT)
            if copy is not _NOT:
                kind = type(draft_tokens)
                drafts = (draft_tokens if kind is int
                          else draft_tokens.copy() if kind is np.ndarray
                          else tuple(draft_tokens) if kind is list or kind is tuple else _NOT)
                kind = type(groups)
                request_groups = (
                    _NOT if drafts is _NOT or (groups is not None and self._group_label is None)
                    else groups if groups is None
                    else tuple(groups) if kind is list or kind is tuple
                    else groups.copy() if kind is np.ndarray else _NOT)
                if request_groups is not _NOT:
                    self._counts = (copy, drafts, request_groups)
                    return
        self._check_counts(accepted, draft_tokens, groups)

    def _check_counts(self, accepted: Any, draft_tokens: Any, groups: Any) -> None:
        counts = None
        batch_size = self._begin[0] if self._begin is not None else None
        try:
            if draft_tokens is None:
                raise InputRejected("wrong_type", "draft_tokens is required with accepted: "
                                                  "pass K, or the draft tokens of each request")
            if groups is not None and self._group_label is None:
                raise InputRejected(
                    "groups_without_label",
                    f"groups={reprlib.repr(groups)} given, but these hooks have no group label "
                    "to record them under: pass group_label=\"group\" (the label name you "
                    "want) to SpecDecodeHooks, or leave groups out")
            counts = to_counts(accepted, "accepted", batch_size, self._pinned, self._rings)
            drafts = None
            try:
                drafts = to_draft_tokens(draft_tokens, _length(counts), self._pinned,
                                         self._rings)
                request_groups = (to_groups(groups, _length(counts)) if groups is not None
                                  else None)
            except BaseException:
                for value in (counts, drafts):
                    if isinstance(value, DeviceArray):
                        value.release_source()  # the engine may reuse its tensor after all
                        value.discard()  # its pinned buffer goes back to the pool
                raise
            device = [v for v in (counts, drafts) if isinstance(v, DeviceArray)]
            if device:
                self._counts = (counts, drafts, request_groups, None)
                self._release = device
                self._handoff = False
            elif self._defer_summary:
                # A copy: the engine may reuse its buffers before the consumer reads them.
                self._counts = (np.array(counts),
                                np.array(drafts) if isinstance(drafts, np.ndarray) else drafts,
                                request_groups, None)
            else:
                self._counts = (counts, drafts, request_groups,
                                summarize(counts, drafts, self._max_k,  # type: ignore[arg-type]
                                          request_groups))
        except InputRejected as rejected:
            self._reject("verify_end", rejected.reason, rejected.message)
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("verify_end")

    def _close_step(self) -> None:
        """Hand the open step over and start afresh (the general form of end_step)."""
        raw: Raw = (self._steps, self._step_method, self._times, self._counts, self._begin,
                    self._gpu_marks)
        release = self._release
        self._steps += 1
        self._times = [0] * 6
        self._counts = self._begin = self._step_method = self._gpu_marks = None
        self._release = None
        self._handoff = not self._inline
        self._open, self._last = -1, _NO_STEP
        try:
            # Device counts are read on a side stream: from here on the engine's stream
            # waits for that copy, so the engine may overwrite or free them.
            for value in release or ():
                value.release_source()
        finally:
            if self._inline:
                self._pending.add(raw)
            else:
                handed = self._handed
                handed.append(raw)
                queued = len(handed)
                if queued == self._wake_at:
                    WORKER.wake()
                elif queued > self._queue_limit:
                    self._overflow()

    def _overflow(self) -> None:
        try:
            self._pending.overflow()
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("end_step")

    def _forget_open(self) -> int:
        """Forget the open stage as if it had not started (so it may be started again in
        this step); return its index."""
        stage = self._open
        self._open = -1
        self._times[2 * stage] = self._times[2 * stage + 1] = 0
        if self._gpu_marks is not None:
            self._gpu_marks[2 * stage] = self._gpu_marks[2 * stage + 1] = None
        done = [self._rank[i] for i in range(len(STAGES)) if self._times[2 * i + 1]]
        self._last = max(done) if done else -1
        return stage

    def _discard_open(self, hook: str) -> None:
        stage = self._forget_open()
        self._reject(hook, "stage_not_ended",
                     f"{STAGES[stage]} was started and never ended before {hook}(); "
                     f"that {STAGES[stage]} stage was dropped")

    def _per_request(self, name: str, value: Any) -> Any:
        """`value` if it is a sequence with one entry per request, else rejected and None (a
        string is one value, not a sequence of requests)."""
        if value is None:
            return None
        if not isinstance(value, (str, bytes)):
            try:
                len(value)
                return value
            except TypeError:
                pass
        self._reject("begin_step", "wrong_type", f"{name} must be a sequence with one entry per "
                                                  f"request, got {_short(value)}; ignored")
        return None

    def _reject(self, hook: str, reason: str, message: str) -> None:
        self._drops.reject(hook, reason, message, self._strict)

    def _internal_error(self, hook: str) -> None:
        self._drops.count("internal_error")  # under the counter's lock: threads share it
        logger.exception("spec_metrics.%s: internal error, step data dropped (please report)", hook)


class _CudaTimedHooks(SpecDecodeHooks):
    """timer="cuda": every stage boundary also records a CUDA event (the general path)."""

    __slots__ = ()

    def draft_start(self) -> None:
        self._start(_DRAFT, "draft_start")

    def draft_end(self) -> None:
        self._end(_DRAFT, "draft_end")

    def verify_start(self) -> None:
        self._start(_VERIFY, "verify_start")

    def verify_end(self, accepted: Any = None, draft_tokens: Any = None,
                   groups: Any = None) -> None:
        if self._end(_VERIFY, "verify_end") and accepted is not None:
            self._take_counts(accepted, draft_tokens, groups)

    def draft_extend_start(self) -> None:
        self._start(_EXTEND, "draft_extend_start")

    def draft_extend_end(self) -> None:
        self._end(_EXTEND, "draft_extend_end")


class _DisabledHooks(SpecDecodeHooks):
    """enabled=False (or closed): every hook is a method that does nothing."""

    __slots__ = ()

    def begin_step(self, request_ids: Any = None, traceparents: Any = None,
                   batch_size: Any = None, method: Any = None) -> None:
        pass

    def end_step(self) -> None:
        pass

    def draft_start(self) -> None:
        pass

    def draft_end(self) -> None:
        pass

    def verify_start(self) -> None:
        pass

    def verify_end(self, accepted: Any = None, draft_tokens: Any = None,
                   groups: Any = None) -> None:
        pass

    def draft_extend_start(self) -> None:
        pass

    def draft_extend_end(self) -> None:
        pass

    def declare_drafter(self, target: str, drafter: str, num_speculative_tokens: int,
                        method: str | None = None) -> None:
        pass

    def warm_up_device(self, max_batch_size: int, buffers: int = 8) -> None:
        pass

    def poll(self) -> None:
        pass


def _short(value: Any, limit: int = 80) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _length(value: Any) -> int:
    return int(value.shape[0]) if not isinstance(value, DeviceArray) else value.length
