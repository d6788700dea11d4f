"""The stage hooks an engine calls: one call per stage per decode step, for the whole batch.

    hooks = SpecDecodeHooks(method="eagle", labels={"model": "llama-3-8b"})
    hooks.begin_step(request_ids=ids, traceparents=tps)      # optional
    hooks.draft_start();  ...;  hooks.draft_end()
    hooks.verify_start(); ...;  hooks.verify_end(accepted, draft_tokens=4)
    hooks.draft_extend_start(); ...; hooks.draft_extend_end()
    hooks.end_step()

Hooks only take a timestamp and store counts in the step's record. At `end_step()` the
record goes to the sinks once: the trace sink (which decides whether the step is traced)
and the metrics collector. Records holding CUDA tensors wait, without synchronizing, until
their copies have landed, and are handed to the sinks at a later `end_step()` or `flush()`.
"""

from __future__ import annotations

import reprlib
from time import perf_counter_ns
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from opentelemetry import trace
from prometheus_client.registry import REGISTRY, CollectorRegistry

from spec_metrics._core.cuda_timing import CudaEventTimer
from spec_metrics._core.groups import to_groups
from spec_metrics._core.inputs import DeviceArray, PinnedPool, summarize, to_counts, to_draft_tokens
from spec_metrics._core.pending import PendingSteps
from spec_metrics._core.record import StepRecord
from spec_metrics._core.scopes import StageScope, StepScope, VerifyScope
from spec_metrics._core.sinks import StepResult, StepSinks
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


class SpecDecodeHooks:
    """Stage hooks for one engine loop. Configure once; call per step for the whole batch.

    Not thread-safe per object: one engine loop drives one hooks object. Several hooks
    objects (threads, methods) may share one collector via `collector=`.
    """

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
            summaries); it runs on the engine thread, so keep it cheap.
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
        self._record: StepRecord | None = None
        self._open = -1  # index of the stage started and not yet ended
        self._steps = 0
        self._pending = PendingSteps(self._sinks.consume, config.max_pending_steps,
                                     self._reject, config.batch_steps)
        # Batched: verify_end keeps a copy of the counts and the sinks reduce them in the
        # batch; strict mode reduces at the hook so its errors name the call that caused them.
        self._defer_summary = config.batch_steps > 1 and not config.strict
        self._scopes = (StageScope(self, _DRAFT), VerifyScope(self), StageScope(self, _EXTEND))
        self._step_scope = StepScope(self)
        reset_after_fork(self)
        if not self._on:
            # Disabled is decided here, once: each hook becomes a plain no-op function on the
            # instance, cheaper to call than a method that checks a flag.
            for name in _HOOK_NAMES:
                setattr(self, name, _NOOPS[name])

    @property
    def enabled(self) -> bool:
        return self._on

    # ---- step boundaries ---------------------------------------------------------------

    def begin_step(self, request_ids: Sequence[Any] | None = None,
                   traceparents: Sequence[str | None] | None = None,
                   batch_size: int | None = None, method: str | None = None) -> None:
        """Open a step (optional: the first stage start opens one). `request_ids` and
        `traceparents` are copied (at C speed) and only parsed if the step is traced."""
        if not self._on:
            return
        try:
            if self._open >= 0:
                self._discard_open("begin_step")
            if self._record is not None:
                self._close_record()  # before the reject, which raises in strict mode
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
            # Copied now: the engine may reuse its lists, and a step whose device results
            # are pending is read one or more steps later.
            if request_ids is not None:
                request_ids = tuple(request_ids)
            sampled = False
            if traceparents is not None:
                traceparents = tuple(traceparents)
                sampled = any_sampled(traceparents)
            record = self._new_record(method or self._method, sizes.pop() if sizes else None,
                                      request_ids, traceparents)
            record.request_sampled = sampled
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("begin_step")

    def end_step(self) -> None:
        """Close the step and hand it to the sinks (or queue it while device data lands)."""
        if not self._on:
            return
        try:
            if self._open >= 0:
                self._discard_open("end_step")
            if self._record is None:
                self._reject("end_step", "end_without_start", "end_step() without a step: "
                             "no stage was started since the last end_step()")
                return
            self._close_record()
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("end_step")

    # ---- stages ------------------------------------------------------------------------

    def draft_start(self) -> None:
        if self._on:
            self._start(_DRAFT, "draft_start")

    def draft_end(self) -> None:
        if self._on:
            self._end(_DRAFT, "draft_end")

    def verify_start(self) -> None:
        if self._on:
            self._start(_VERIFY, "verify_start")

    def verify_end(self, accepted: Any = None, draft_tokens: Any = None,
                   groups: Any = None) -> None:
        """End verify. `accepted`: tokens accepted per request (list, numpy array, torch
        tensor on CPU or CUDA); `draft_tokens`: K for all, or per request. A CUDA tensor is
        copied without blocking, on a side stream after the work queued so far, and read at
        a later step; write it in place only after end_step(), from which point the
        current stream waits (on the device) for that copy.

        `groups`: with `group_label` set, the group value (str: adapter, tenant, workload
        class) of each request, as a list, tuple or numpy array of str or object; acceptance
        is then counted per group. Without it the requests count under group="default"."""
        if not self._on:
            return
        if not self._end(_VERIFY, "verify_end") or accepted is None:
            return
        record = self._record
        if record is None:  # _end() succeeded, so a step is open; for the type checker
            return
        counts = None
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
            counts = to_counts(accepted, "accepted", record.batch_size, self._pinned)
            drafts = None
            try:
                drafts = to_draft_tokens(draft_tokens, _length(counts), self._pinned)
                request_groups = (to_groups(groups, _length(counts)) if groups is not None
                                  else None)
            except BaseException:
                for value in (counts, drafts):
                    if isinstance(value, DeviceArray):
                        value.release_source()  # the engine may reuse its tensor after all
                        value.discard()  # its pinned buffer goes back to the pool
                raise
            if isinstance(counts, DeviceArray) or isinstance(drafts, DeviceArray):
                record.accepted, record.draft_tokens = counts, drafts
                record.groups = request_groups  # host values, kept until the counts land
            else:
                if self._defer_summary:
                    # A copy: the engine may reuse its buffers before the batch is reduced.
                    record.accepted = np.array(counts)
                    record.draft_tokens = (np.array(drafts) if isinstance(drafts, np.ndarray)
                                           else drafts)
                    record.groups = request_groups  # made here: nothing the engine reuses
                else:
                    record.summary = summarize(counts, drafts, self._max_k, request_groups)
        except InputRejected as rejected:
            self._reject("verify_end", rejected.reason, rejected.message)
        except StrictModeError:
            raise
        except Exception:
            self._internal_error("verify_end")

    def draft_extend_start(self) -> None:
        if self._on:
            self._start(_EXTEND, "draft_extend_start")

    def draft_extend_end(self) -> None:
        if self._on:
            self._end(_EXTEND, "draft_extend_end")

    def declare_drafter(self, target: str, drafter: str, num_speculative_tokens: int,
                        method: str | None = None) -> None:
        """Say what this engine speculates with: `spec_decode_drafter_info{method, target,
        drafter, num_speculative_tokens}` = 1. Call it at start-up and again whenever the
        drafter, the target or K changes (a model update, dynamic speculation's K): the
        new declaration replaces the previous one of the method, and the dashboard marks
        the change. Not for every step: K per request goes to verify_end."""
        if not self._on:
            return
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
        rather than in the first verify_end. `buffers` per dtype (int32 and int64) covers
        that many steps in flight before more are allocated. With timer="cuda" this also
        creates the CUDA events ahead.
        """
        if not self._on:
            return
        import torch

        self._pinned.reserve(max_batch_size, (torch.int64, torch.int32), buffers)
        self._pinned.prepare_device(torch.cuda.current_device(), 2 * buffers)
        if self._gpu is not None:
            self._gpu.reserve(2 * len(STAGES) * buffers)

    def poll(self) -> None:
        """Hand finished steps whose device results have landed to the sinks; never waits.
        Steps normally reach the metrics at a later end_step(): call this when the engine
        goes idle so the last steps of a burst are not held back."""
        if not self._on:
            return
        try:
            self._pending.drain()
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
        object registered."""
        record, self._record, self._open = self._record, None, -1
        if record is not None:
            for value in (record.accepted, record.draft_tokens):
                if isinstance(value, DeviceArray):
                    value.release_source()
                    value.discard()
        self.flush()
        if self._registered_in is not None:
            self._registered_in.unregister(self.collector)
            self._registered_in = None
        self._on = False

    def _reset_after_fork(self) -> None:
        """In a forked child: drop the open step, the steps waiting for device results and
        the pinned buffers and events (CUDA cannot be used in a forked child; they are set
        aside unfreed, see forking.py), and restart outlier estimates and the trace rate
        limit; the collector resets itself."""
        keep_forever(self._record)
        self._record = None
        self._open = -1
        self._steps = 0
        self._pending._reset_after_fork()
        self._pinned._reset_after_fork()
        if self._gpu is not None:
            self._gpu._reset_after_fork()
        if self._tracer is not None:
            self._tracer._reset_after_fork()

    # ---- internals ---------------------------------------------------------------------

    def _start(self, stage: int, hook: str) -> None:
        now = perf_counter_ns()
        try:
            if self._open >= 0:
                self._discard_open(hook)
            record = self._record
            if record is None:
                record = self._new_record(self._method)
            elif record.last_stage >= 0 and (self._rank[stage]
                                             <= self._rank[record.last_stage]):
                self._close_record()  # before the reject, which raises in strict mode
                self._reject(hook, "out_of_order",
                             f"{STAGES[stage]} started after {STAGES[record.last_stage]} in the "
                             "same step; call end_step() after each step (the previous step "
                             "was closed now)")
                record = self._new_record(self._method)
            record.starts[stage] = now
            if self._gpu is not None:
                record.gpu_starts[stage] = self._gpu.mark()  # type: ignore[index]
            record.last_stage = stage
            self._open = stage
        except StrictModeError:
            raise
        except Exception:
            self._internal_error(hook)

    def _end(self, stage: int, hook: str) -> bool:
        now = perf_counter_ns()
        try:
            if self._open != stage:
                open_note = (f"{STAGES[self._open]} is open" if self._open >= 0
                             else "no stage is open")
                self._reject(hook, "end_without_start",
                             f"{hook}() without {STAGES[stage]}_start() ({open_note}); dropped")
                return False
            record = self._record
            record.ends[stage] = now  # type: ignore[union-attr]
            if self._gpu is not None:
                record.gpu_ends[stage] = self._gpu.mark()  # type: ignore[union-attr,index]
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

    def _new_record(self, method: str, batch_size: int | None = None,
                    request_ids: Sequence[Any] | None = None,
                    traceparents: Sequence[str | None] | None = None) -> StepRecord:
        record = self._record = StepRecord(self._steps, method, batch_size, request_ids,
                                           traceparents)
        self._steps += 1
        if self._gpu is not None:
            record.gpu_starts = [None] * len(STAGES)
            record.gpu_ends = [None] * len(STAGES)
        return record

    def _forget_open(self) -> int:
        """Forget the open stage as if it had not started (so it may be started again in
        this step); return its index."""
        record = self._record
        stage = self._open
        self._open = -1
        if record is not None:
            record.starts[stage] = 0
            record.ends[stage] = 0
            if record.gpu_starts is not None:
                record.gpu_starts[stage] = None
            if record.gpu_ends is not None:
                record.gpu_ends[stage] = None
            done = [i for i, end in enumerate(record.ends) if end]
            record.last_stage = max(done, key=self._rank.__getitem__) if done else -1
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

    def _close_record(self) -> None:
        record = self._record
        self._record = None
        if record is not None:
            try:
                # Device counts are read on a side stream: from here on the engine's
                # stream waits for that copy, so the engine may overwrite or free them.
                for value in (record.accepted, record.draft_tokens):
                    if isinstance(value, DeviceArray):
                        value.release_source()
            finally:
                self._pending.add(record)

    def _reject(self, hook: str, reason: str, message: str) -> None:
        self._drops.reject(hook, reason, message, self._strict)

    def _internal_error(self, hook: str) -> None:
        self._drops.count("internal_error")  # under the counter's lock: threads share it
        logger.exception("spec_metrics.%s: internal error, step data dropped (please report)", hook)


def _noop() -> None:
    return None


def _noop_begin_step(request_ids: Any = None, traceparents: Any = None,
                     batch_size: Any = None, method: Any = None) -> None:
    return None


def _noop_verify_end(accepted: Any = None, draft_tokens: Any = None,
                     groups: Any = None) -> None:
    return None


_HOOK_NAMES = ("begin_step", "end_step", "draft_start", "draft_end", "verify_start",
               "verify_end", "draft_extend_start", "draft_extend_end", "poll")
_NOOPS = {name: _noop for name in _HOOK_NAMES}
_NOOPS["begin_step"] = _noop_begin_step
_NOOPS["verify_end"] = _noop_verify_end


def _short(value: Any, limit: int = 80) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _length(value: Any) -> int:
    return int(value.shape[0]) if not isinstance(value, DeviceArray) else value.length
