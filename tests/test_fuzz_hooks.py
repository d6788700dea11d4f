"""Bad-input fuzzing of the hooks (hypothesis): random sequences of hook calls, in and out of
order, with garbage, edge-case and valid inputs, checked against an oracle model.

The model (`Model`) predicts, for every call, what must happen: which stages and steps are
recorded with which exact durations and counts, and which inputs are dropped under which
`reason`. After every call the collector's output must equal the model's exactly; the
histogram invariants (cumulative buckets, +Inf == _count) and counter monotonicity are
checked on their own too. Every few examples the full exposition (OpenMetrics or classic
text) is rendered and parsed back. Tracing and exemplars are on: every exemplar must point at
an exported span, and the exported spans and links are counted against the model.

Reproducible: derandomized, no example database. `SPEC_METRICS_FUZZ_SCALE=10` runs ten times
as many examples.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from collections import Counter
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest as text_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.utils import floatToGoString

import spec_metrics
from spec_metrics._core import hooks as hooks_module
from spec_metrics.catalog import (
    DEFAULT_STAGE_BUCKETS,
    DEFAULT_STEP_BUCKETS,
    DROP_REASONS,
    SKIP_REASONS,
    STAGES,
    WITHHELD_REASONS,
)

from .conftest import Clock

pytestmark = pytest.mark.filterwarnings("error")  # a hook may not even warn through numpy

MAX_K = 4
LABELS = {"model": "m"}
_SCALE = float(os.environ.get("SPEC_METRICS_FUZZ_SCALE", "1"))
FUZZ_EXAMPLES = int(4500 * _SCALE)  # default mode
STRICT_EXAMPLES = int(5500 * _SCALE)  # strict mode: 10,000 examples in all
PARSE_EVERY = 10  # render and parse the full exposition every this many examples
INT64_MAX = (1 << 63) - 1
_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_VALID_TP = {  # traceparents the W3C format accepts
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00",
    "01-2af7651916cd43dd8448eb211c80319c-d7ad6b7169203331-01-future-fields",
}
_BAD_TP = [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",  # not hex
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # version 00 + suffix
    "", 12345, b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
]
# torch dtypes a count may have; others (bool, bfloat16, complex) are wrong_type.
_TORCH_COUNT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "float16", "float32",
                       "float64"}


class EngineError(Exception):
    """Raised by the fuzzed 'engine' inside a context-manager stage."""


# ---- the oracle ----------------------------------------------------------------------------

class Bad(Exception):
    def __init__(self, reason: str, witness: str) -> None:
        super().__init__(reason, witness)
        self.reason, self.witness = reason, witness


def _first(array: np.ndarray, mask: np.ndarray, what: str) -> str:
    i = int(np.flatnonzero(mask)[0])
    return f"{what}[{i}]={array[i].item()!r}"


def _values(array: np.ndarray, what: str) -> np.ndarray:
    """What counts an array holds, or Bad: whole finite numbers of an integer or float dtype."""
    kind = array.dtype.kind
    if kind == "f":
        array = array.astype(np.float64)
    if kind in "uf" and array.size == 0:
        return array.astype(np.int64)
    if kind == "u" and array.dtype.itemsize == 8 and (array > INT64_MAX).any():
        raise Bad("wrong_type", _first(array, array > INT64_MAX, what))
    if kind == "f":
        if not np.isfinite(array).all():
            raise Bad("non_finite", _first(array, ~np.isfinite(array), what))
        if (array % 1 != 0).any():
            raise Bad("wrong_type", _first(array, array % 1 != 0, what))
        if (np.abs(array) > 1e15).any():
            raise Bad("wrong_type", _first(array, np.abs(array) > 1e15, what))
    elif kind not in "iu":
        raise Bad("wrong_type", str(array.dtype))
    return array.astype(np.int64)


def _read(value: Any, what: str, n: int | None) -> np.ndarray:
    """Per-request counts as the README defines them: a 1-D list, numpy array or CPU/CUDA
    tensor of whole numbers, one per request of the batch."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.ndim != 1:
            raise Bad("wrong_shape", str(tuple(value.shape)))
        if n is not None and value.shape[0] != n:
            raise Bad("wrong_shape", f"has {value.shape[0]} entries")
        if value.device.type != "cpu":
            raise Bad("wrong_type", value.device.type)
        if str(value.dtype).removeprefix("torch.") not in _TORCH_COUNT_DTYPES:
            raise Bad("wrong_type", str(value.dtype))
        array = value.numpy()
    elif isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            raise Bad("wrong_type", repr(value)[:30]) from None
    else:
        raise Bad("wrong_type", type(value).__name__)
    if array.ndim != 1:
        raise Bad("wrong_shape", str(array.shape))
    if n is not None and array.shape[0] != n:
        raise Bad("wrong_shape", f"has {array.shape[0]} entries")
    return _values(array, what)


def _groups(value: Any, n: int) -> list[str]:
    """The group value of each request, as the README defines groups: a list, tuple or 1-D
    numpy array (str or object) of non-empty strings of at most 128 characters."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise Bad("wrong_shape", str(value.shape))
        if value.dtype.kind not in "UO":
            raise Bad("wrong_type", str(value.dtype))
        value = value.tolist()
    elif not isinstance(value, (list, tuple)):
        raise Bad("wrong_type", "groups must be")
    if len(value) != n:
        raise Bad("wrong_shape", f"groups has {len(value)} entries")
    for i, group in enumerate(value):
        if not (isinstance(group, str) and 0 < len(group) <= 128):
            raise Bad("wrong_type", f"groups[{i}]=")
    return [str(group) for group in value]


def classify(accepted: Any, drafts: Any, batch: int | None, groups: Any = None,
             grouped: bool = False) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(accepted, draft tokens, groups) per request, or Bad with the first problem found."""
    if drafts is None:
        raise Bad("wrong_type", "draft_tokens is required")
    if groups is not None and not grouped:
        raise Bad("groups_without_label", "groups=")
    a = _read(accepted, "accepted", batch)
    n = a.shape[0]
    torch = sys.modules.get("torch")
    scalar: int | None = None
    if isinstance(drafts, (bool, np.bool_)):
        raise Bad("wrong_type", repr(drafts))
    if isinstance(drafts, (int, np.integer)):
        scalar = int(drafts)
    elif isinstance(drafts, float) or (torch is not None and isinstance(drafts, torch.Tensor)
                                       and drafts.ndim == 0):
        raise Bad("wrong_type", repr(drafts)[:30])
    else:
        d = _read(drafts, "draft_tokens", n)
    g = _groups(groups, n) if groups is not None else None
    if n and (a < 0).any():
        raise Bad("negative", _first(a, a < 0, "accepted"))
    if scalar is None:
        if n:
            if (d < 0).any():
                raise Bad("negative", _first(d, d < 0, "draft_tokens"))
            if d.max() > MAX_K:
                raise Bad("draft_tokens_exceed_max", f"draft_tokens {d.max()} exceeds")
            if (a > d).any():
                i = int(np.flatnonzero(a > d)[0])
                raise Bad("accepted_exceeds_drafted", f"request {i} accepted {a[i]} of {d[i]}")
        return a, d, g
    if scalar < 0:
        raise Bad("negative", f"got {scalar}")
    if scalar > MAX_K:
        raise Bad("draft_tokens_exceed_max", f"draft_tokens {scalar} exceeds")
    if n and (a > scalar).any():
        i = int(np.flatnonzero(a > scalar)[0])
        raise Bad("accepted_exceeds_drafted", f"request {i} accepted {a[i]} of {scalar}")
    return a, np.full(n, scalar, dtype=np.int64), g


class Acceptance:
    """The requests verified of one method (or one method and group)."""

    def __init__(self) -> None:
        self.accepted: list[np.ndarray] = []  # per verify pass, requests with drafts only
        self.drafts: list[np.ndarray] = []  # per verify pass, every request
        self.requests = 0


class Series:
    def __init__(self, grouped: bool) -> None:
        self.stages: list[list[float]] = [[] for _ in STAGES]
        self.step: list[float] = []
        # by group value; without a group label, one entry (None), present from the start
        self.acceptance: dict[str | None, Acceptance] = {} if grouped else {None: Acceptance()}
        self.plain_steps = 0  # verify passes without any draft token
        self.plain_seconds = 0.0  # their time without draft and draft_extend, in step order
        self.plain_tokens = 0  # their requests


class Record:
    def __init__(self, method: str, batch: int | None, traceparents: Any) -> None:
        self.method, self.batch, self.traceparents = method, batch, traceparents
        self.starts = [0] * len(STAGES)
        self.ends = [0] * len(STAGES)
        self.last = -1
        self.counts: tuple[np.ndarray, np.ndarray, list[str] | None] | None = None


class Model:
    """What the hooks must do, written from the README's contract."""

    def __init__(self, now: int, method: str = "eagle", group_label: str | None = None,
                 max_groups: int = 2) -> None:
        self.now = now
        self.method = method
        self.group_label = group_label
        self.max_groups = max_groups
        self.groups: list[str] = []  # group values with a row of their own, first seen first
        self.groups_folded = 0  # requests recorded under group="other" (table full)
        self.open = -1
        self.record: Record | None = None
        self.drops: Counter[str] = Counter()
        self.rejections: list[tuple[str, str, str]] = []  # (hook, reason, witness)
        self.series: dict[str, Series] = {}
        self.steps = self.spans = self.links = 0

    def reject(self, hook: str, reason: str, witness: str) -> None:
        self.drops[reason] += 1
        self.rejections.append((hook, reason, witness))

    def advance(self, ns: int) -> None:
        self.now += ns

    # hooks
    def begin(self, request_ids: Any = None, traceparents: Any = None, batch_size: Any = None,
              method: Any = None) -> None:
        self._close_open("begin_step")
        if self.record is not None:
            self.reject("begin_step", "out_of_order", "before end_step()")
            self._consume()
        request_ids = self._per_request("request_ids", request_ids)
        traceparents = self._per_request("traceparents", traceparents)
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 0):
            self.reject("begin_step", "wrong_type", "batch_size must be")
            batch_size = None
        sizes = {len(x) for x in (request_ids, traceparents) if x is not None}
        if batch_size is not None:
            sizes.add(int(batch_size))
        if len(sizes) > 1:
            self.reject("begin_step", "wrong_shape", str(sorted(sizes)))
            traceparents, sizes = None, set()
        if method is not None and not (isinstance(method, str) and method):
            self.reject("begin_step", "wrong_type", repr(method))
            method = None
        self.record = Record(method or self.method, sizes.pop() if sizes else None,
                             None if traceparents is None else tuple(traceparents))

    def _per_request(self, name: str, value: Any) -> Any:
        if value is None or isinstance(value, (list, tuple, np.ndarray)):
            return value
        self.reject("begin_step", "wrong_type", f"{name} must be")
        return None

    def end_step(self) -> None:
        self._close_open("end_step")
        if self.record is None:
            self.reject("end_step", "end_without_start", "end_step() without a step")
            return
        self._consume()

    def start(self, stage: int) -> None:
        hook = f"{STAGES[stage]}_start"
        self._close_open(hook)
        if self.record is None:
            self.record = Record(self.method, None, None)
        elif stage <= self.record.last:
            self.reject(hook, "out_of_order",
                        f"{STAGES[stage]} started after {STAGES[self.record.last]}")
            self._consume()
            self.record = Record(self.method, None, None)
        self.record.starts[stage] = self.now
        self.record.last = self.open = stage

    def end(self, stage: int) -> bool:
        hook = f"{STAGES[stage]}_end"
        if self.open != stage:
            self.reject(hook, "end_without_start", f"without {STAGES[stage]}_start()")
            return False
        self.record.ends[stage] = self.now  # type: ignore[union-attr]
        self.open = -1
        return True

    def verify_end(self, accepted: Any = None, drafts: Any = None, groups: Any = None) -> None:
        if not self.end(1) or accepted is None:
            return
        try:
            self.record.counts = classify(accepted, drafts, self.record.batch,  # type: ignore
                                          groups, self.group_label is not None)
        except Bad as bad:
            self.reject("verify_end", bad.reason, bad.witness)

    def poll(self) -> None:
        pass

    def drop_quietly(self, stage: int) -> None:
        """The engine raised inside a `with` stage: the stage is forgotten, not counted, and
        may be started again in the same step."""
        if self.open == stage and self.record is not None:
            self.record.starts[stage] = 0
            self.open = -1
            ended = [i for i, end in enumerate(self.record.ends) if end]
            self.record.last = max(ended) if ended else -1

    def _close_open(self, hook: str) -> None:
        if self.open < 0:
            return
        stage, record = self.open, self.record
        self.open = -1
        record.starts[stage] = 0  # type: ignore[union-attr]
        ended = [i for i, end in enumerate(record.ends) if end]  # type: ignore[union-attr]
        record.last = max(ended) if ended else -1  # type: ignore[union-attr]
        self.reject(hook, "stage_not_ended", f"{STAGES[stage]} was started")

    def _consume(self) -> None:
        record, self.record = self.record, None
        series = self.series.setdefault(record.method,  # type: ignore[union-attr]
                                        Series(self.group_label is not None))
        present = [i for i in range(len(STAGES)) if record.starts[i] and record.ends[i]]
        for i in present:
            series.stages[i].append((record.ends[i] - record.starts[i]) / 1e9)
        step = None
        if present:
            first = min(record.starts[i] for i in present)
            step = (max(record.ends[i] for i in present) - first) / 1e9
            series.step.append(step)
            # trace_ratio=1: every step with a stage is traced; its spans are exported.
            self.spans += 1 + len(present)
            for index, value in enumerate(record.traceparents or ()):
                if value is None:
                    continue
                if value in _VALID_TP:
                    self.links += 1
                else:
                    self.reject("begin_step", "bad_traceparent", f"traceparents[{index}]={value!r}")
        if record.counts is not None:
            a, d, g = record.counts
            if self.group_label is None:
                parts: dict[str | None, np.ndarray] = {None: np.ones(a.shape[0], dtype=bool)}
            else:
                names = np.array(g if g is not None else ["default"] * a.shape[0], dtype=object)
                parts = {}
                for value in dict.fromkeys(names.tolist()):  # first seen first
                    if value != "other" and value not in self.groups:
                        if len(self.groups) < self.max_groups:
                            self.groups.append(value)
                        else:
                            self.groups_folded += int((names == value).sum())
                    row = value if value in self.groups else "other"
                    parts[row] = parts.get(row, np.zeros(a.shape[0], dtype=bool)) | (
                        names == value)
            for row, mask in parts.items():
                acceptance = series.acceptance.setdefault(row, Acceptance())
                acceptance.accepted.append(a[mask & (d > 0)])
                acceptance.drafts.append(d[mask])
                acceptance.requests += int(mask.sum())
            if not (d > 0).any():  # a plain decode step: time without draft stages, tokens
                series.plain_steps += 1
                if step is not None:
                    stages = [(record.ends[i] - record.starts[i]) / 1e9 if i in present
                              else 0.0 for i in (0, 2)]
                    series.plain_seconds += max(0.0, step - stages[0] - stages[1])
                    series.plain_tokens += a.shape[0]
        self.steps += 1

    def expected(self) -> dict:
        """Every sample the collector must expose, keyed like `actual()`."""
        out: dict = {}
        const = tuple(LABELS.items())

        def put(name: str, value: float, **labels: Any) -> None:
            if "le" in labels:
                labels["le"] = floatToGoString(labels["le"])
            out[(name, frozenset((*labels.items(), *const)))] = float(value)

        def histogram(name: str, values: list[float], bounds: tuple[float, ...],
                      **labels: str) -> None:
            total = 0.0
            for v in values:  # in recording order: the same float sum as the collector's
                total += v
            for bound in (*bounds, float("inf")):
                put(name + "_bucket", sum(v <= bound for v in values), le=bound, **labels)
            put(name + "_count", len(values), **labels)
            put(name + "_sum", total, **labels)

        for method, s in self.series.items():
            for stage, values in zip(STAGES, s.stages):
                histogram("spec_decode_stage_duration_seconds", values, DEFAULT_STAGE_BUCKETS,
                          method=method, stage=stage)
            histogram("spec_decode_step_duration_seconds", s.step, DEFAULT_STEP_BUCKETS,
                      method=method)
            put("spec_decode_steps_without_drafts_total", s.plain_steps, method=method)
            put("spec_decode_plain_step_duration_seconds_total", s.plain_seconds, method=method)
            put("spec_decode_plain_step_tokens_total", s.plain_tokens, method=method)
            for group, acceptance in s.acceptance.items():
                labels = {"method": method}
                if group is not None:
                    labels[self.group_label] = group  # type: ignore[index]
                a = np.concatenate([np.zeros(0, np.int64), *acceptance.accepted])
                d = np.concatenate([np.zeros(0, np.int64), *acceptance.drafts])
                name = "spec_decode_accepted_length"
                for bound in (*map(float, range(MAX_K + 1)), float("inf")):
                    put(name + "_bucket", int((a <= bound).sum()), le=bound, **labels)
                put(name + "_count", a.shape[0], **labels)
                put(name + "_sum", int(a.sum()), **labels)
                name = "spec_decode_draft_length"
                for bound in (*map(float, range(MAX_K + 1)), float("inf")):
                    put(name + "_bucket", int((d <= bound).sum()), le=bound, **labels)
                put(name + "_count", d.shape[0], **labels)
                put(name + "_sum", int(d.sum()), **labels)
                put("spec_decode_drafts_total", int((d > 0).sum()), **labels)
                put("spec_decode_draft_tokens_total", int(d.sum()), **labels)
                put("spec_decode_accepted_tokens_total", int(a.sum()), **labels)
                put("spec_decode_emitted_tokens_total", int(a.sum()) + acceptance.requests,
                    **labels)
                for p in range(MAX_K):
                    put("spec_decode_draft_tokens_per_position_total", int((d > p).sum()),
                        position=str(p), **labels)
                    put("spec_decode_accepted_tokens_per_position_total", int((a > p).sum()),
                        position=str(p), **labels)
        for reason in DROP_REASONS:
            put("spec_metrics_dropped_total", self.drops[reason], reason=reason)
        put("spec_metrics_label_values_folded_total", 0, label="method")  # one method
        if self.group_label is not None:
            put("spec_metrics_label_values_folded_total", self.groups_folded,
                label=self.group_label)
        # Every step with a stage is traced (no rate limit, AlwaysOn sampler) and its spans
        # are exported: nothing skipped, no exemplar withheld.
        for reason in SKIP_REASONS:
            put("spec_metrics_traced_steps_skipped_total", 0, reason=reason)
        for reason in WITHHELD_REASONS:
            put("spec_metrics_exemplars_withheld_total", 0, reason=reason)
        return out


# ---- playing a program on the model and on the real hooks -----------------------------------

class Real:
    """Plays the same calls on real hooks, with the clock the hooks read."""

    def __init__(self, hooks: spec_metrics.SpecDecodeHooks, clock: Clock) -> None:
        self.hooks, self.clock = hooks, clock

    def advance(self, ns: int) -> None:
        self.clock.now += ns

    def begin(self, **kwargs: Any) -> None:
        self.hooks.begin_step(**kwargs)

    def end_step(self) -> None:
        self.hooks.end_step()

    def start(self, stage: int) -> None:
        (self.hooks.draft_start, self.hooks.verify_start, self.hooks.draft_extend_start)[stage]()

    def end(self, stage: int) -> None:
        (self.hooks.draft_end, self.hooks.verify_end, self.hooks.draft_extend_end)[stage]()

    def verify_end(self, accepted: Any = None, drafts: Any = None, groups: Any = None) -> None:
        self.hooks.verify_end(accepted, drafts, groups)

    def poll(self) -> None:
        self.hooks.poll()


def play(op: tuple, target: Any) -> None:
    """One call (or one `with` block) on the model or the real hooks."""
    kind, dt, *args = op
    target.advance(dt)
    if kind == "begin":
        target.begin(**args[0])
    elif kind == "verify_end":
        target.verify_end(*args)
    elif kind in ("start", "end"):
        getattr(target, kind)(*args)
    elif kind in ("end_step", "poll"):
        getattr(target, kind)()
    elif kind == "with_stage":
        stage, values, raise_ = args
        _with(target, stage, dt, values, raise_)
    elif kind == "with_step":
        kwargs, inner, raise_ = args
        if isinstance(target, Model):
            target.begin(**kwargs)
            for inner_op in inner:
                play(inner_op, target)
            target.end_step()
            return
        try:
            with target.hooks.step(**kwargs):
                for inner_op in inner:
                    play(inner_op, target)
                if raise_:
                    raise EngineError
        except EngineError:
            pass
    else:
        raise AssertionError(kind)


def _with(target: Any, stage: int, dt: int, values: tuple | None, raise_: bool) -> None:
    if isinstance(target, Model):
        target.start(stage)
        target.advance(dt)
        if raise_:
            target.drop_quietly(stage)
        elif stage == 1:
            target.verify_end(*(values or (None, None)))
        else:
            target.end(stage)
        return
    hooks = target.hooks
    scope = (hooks.draft, hooks.verify, hooks.draft_extend)[stage]()
    try:
        with scope as entered:
            target.advance(dt)
            if values is not None:
                entered.set_accepted(*values)
            if raise_:
                raise EngineError
    except EngineError:
        pass


# ---- strategies -------------------------------------------------------------------------

def _tensor(values: list, dtype: str, device: str, shape: tuple | None) -> Any:
    import torch  # lazily: only examples that draw a tensor pay for the import

    if device == "meta":
        return torch.empty(shape if shape is not None else (len(values),),
                           dtype=getattr(torch, dtype), device="meta")
    tensor = torch.tensor(values, dtype=torch.float64).to(getattr(torch, dtype))
    return tensor.reshape(shape) if shape is not None else tensor


def _array(values: list, dtype: str, shape: tuple | None) -> np.ndarray:
    if dtype == "object":
        array = np.empty(len(values), dtype=object)
        array[:] = values
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            array = np.asarray(values, dtype=np.float64).astype(dtype)
    return array.reshape(shape) if shape is not None else array


_GOOD = st.integers(0, MAX_K)
_ODD_INTS = st.sampled_from([-1, -7, MAX_K + 1, 9, 2**31, 2**62, -(2**63), 10**15])
_ODD_FLOATS = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, 1e16, -0.0,
                               2.0, 1e300])
_DTYPES = ("int64", "int64", "int32", "uint8", "uint64", "float64", "float32", "float16",
           "bool", "object", "<U1", "complex64")
_TORCH_DTYPES = ("int64", "int32", "uint8", "float32", "float16", "bool", "bfloat16")
# Tensors are drawn only where torch is installed (without importing it here: see _tensor).
_COUNT_FORMS = ("list", "list", "tuple", "array", "array",
                *(("tensor",) if importlib.util.find_spec("torch") is not None else ()),
                "huge", "other")


@functools.lru_cache(maxsize=None)
def _ints(lo: int, hi: int) -> st.SearchStrategy:
    return st.integers(lo, hi)  # strategies are built once: building them costs more than drawing


@functools.lru_cache(maxsize=None)
def _pick(choices: tuple) -> st.SearchStrategy:
    return st.sampled_from(choices)


@functools.lru_cache(maxsize=None)
def _values_list(good: bool, length: int) -> st.SearchStrategy:
    element = _GOOD if good else st.one_of(_GOOD, _GOOD, _GOOD, _ODD_INTS)
    return st.lists(element, min_size=length, max_size=length)


_BOOLS = st.booleans()
_GROUPING = st.sampled_from([None, None, 1, 2, 3])  # max_groups, or no group label
_OTHER_COUNTS = st.sampled_from([None, 3, 2.5, "1,2", {"a": 1}, np.int64(2), [[1], [1, 2]],
                                 [None, 1], ["a", "b"], [True, False], [2**64], [2**64 - 1]])
_ODD_DRAFTS = st.sampled_from([-1, MAX_K + 1, 10**30, np.int64(3), True, 2.0, None, "4"])
_ODD_BATCH = st.sampled_from([-1, True, "2", 2.0, np.int64(2), 100_000])


@st.composite
def counts(draw: Callable, n: int | None) -> Any:
    """Per-request counts: mostly well formed and of the batch's length, sometimes not."""
    matches = type(n) is int and 0 <= n <= 4 and draw(_ints(0, 4))
    length = n if matches else draw(_ints(0, 4))
    values = draw(_values_list(False, length))
    if values and draw(_ints(0, 5)) == 0:
        values[draw(_ints(0, len(values) - 1))] = draw(_ODD_FLOATS)
    shape = None
    if values and draw(_ints(0, 9)) == 0:
        shape = (1, len(values))
    form = draw(_pick(_COUNT_FORMS))
    if form == "list":
        return values if shape is None else [values]
    if form == "tuple":
        return tuple(values)
    if form == "array":
        return _array(values, draw(_pick(_DTYPES)), shape)
    if form == "tensor":
        device = draw(_pick(("cpu", "cpu", "cpu", "meta")))
        dtype = draw(_pick(_TORCH_DTYPES))
        return _tensor([float(v) for v in values], dtype, device, shape)
    if form == "huge":  # a 100k batch, maybe with one bad entry anywhere
        rng = np.random.default_rng(draw(_ints(0, 2**16)))
        array = rng.integers(0, 3, size=100_000)
        spot = (None, 0, 99_999, int(rng.integers(0, 100_000)))[draw(_ints(0, 3))]
        if spot is not None:
            array = array.astype(np.float64)
            array[spot] = draw(_pick((float("nan"), -1.0, 7.0, 2.5)))
        return array
    return draw(_OTHER_COUNTS)


@st.composite
def draft_tokens(draw: Callable, n: int | None) -> Any:
    choice = draw(_ints(0, 9))
    if choice <= 4:
        return draw(_pick((MAX_K, MAX_K, 2, 0, 1)))
    if choice <= 7:
        return draw(counts(n))  # per request
    return draw(_ODD_DRAFTS)


_GROUP_POOL = ("a", "b", "c", "other", "default", 'q"uote')
_ODD_GROUPS = st.sampled_from([None, 7, b"a", "", "x" * 129, ["a"], 2.5])


@st.composite
def request_groups(draw: Callable, n: int, grouped: bool) -> Any:
    """groups= for a batch of `n`: mostly None without a group label (then sometimes given
    all the same: groups_without_label); with one, mostly valid values (few enough that
    max_groups folds some), sometimes one bad entry, a wrong length or a wrong type."""
    if draw(_ints(0, 9)) >= (6 if grouped else 1):
        return None
    if n > 4:  # the 100k batch: values chosen by numpy, maybe one bad entry
        rng = np.random.default_rng(draw(_ints(0, 2**16)))
        values = np.array(_GROUP_POOL, dtype=object)[rng.integers(0, len(_GROUP_POOL), n)]
        if draw(_ints(0, 3)) == 0:
            values[int(rng.integers(0, n))] = draw(_ODD_GROUPS)
        return values if draw(_BOOLS) else values.tolist()
    length = n if draw(_ints(0, 7)) else draw(_ints(0, 4))
    values = [draw(_pick(_GROUP_POOL)) for _ in range(length)]
    if values and draw(_ints(0, 5)) == 0:
        values[draw(_ints(0, length - 1))] = draw(_ODD_GROUPS)
    form = draw(_ints(0, 9))
    if form <= 4:
        return values
    if form == 5:
        return tuple(values)
    if form == 6:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array
    if form == 7 and all(isinstance(v, str) for v in values):
        return np.array(values, dtype=str)
    return draw(st.sampled_from(["a", 3, np.array([[1]]), np.array(["a"] * n).reshape(n, 1),
                                 np.arange(n), {"a": 1}]))


@st.composite
def verify_values(draw: Callable, n: int | None, good: bool = False,
                  grouped: bool = False) -> tuple:
    """(accepted, draft_tokens, groups): valid by construction when `good`, else anything;
    the draft tokens per request mostly have the accepted counts' length."""
    if good:
        length = n if type(n) is int and 0 <= n <= 4 else draw(_ints(0, 4))
        drafts = draw(_values_list(True, length))
        accepted: list = [draw(_ints(0, d)) for d in drafts]
        if drafts and draw(_ints(0, 2)) == 0:  # one entry just wrong
            i = draw(_ints(0, length - 1))
            fault = draw(_ints(0, 5))
            if fault == 0:
                accepted[i] = drafts[i] + draw(_ints(1, 2))
            elif fault == 1:
                drafts[i] = MAX_K + 1
            elif fault == 2:
                accepted[i] = -1
            elif fault == 3:
                drafts[i] = -draw(_ints(1, 3))
            elif fault == 4:
                accepted[i] = draw(_ODD_FLOATS)
            else:
                accepted.append(0)
        groups = draw(request_groups(len(accepted), grouped))
        form = draw(_ints(0, 2))
        if form == 0:  # K for the whole batch
            return accepted, max(drafts, default=MAX_K), groups
        if form == 1:
            return np.array(accepted), np.array(drafts), groups
        return accepted, drafts, groups
    accepted = draw(counts(n))
    shape = getattr(accepted, "shape", None)
    if isinstance(accepted, (list, tuple)):
        n = len(accepted)
    elif shape is not None and len(shape) == 1:
        n = int(shape[0])
    size = n if type(n) is int and n >= 0 else draw(_ints(0, 4))
    return accepted, draw(draft_tokens(n)), draw(request_groups(size, grouped))


_DT = st.sampled_from([0, 1_000, 40_000, 700_000, 3_000_000, 12_345_678, 80_000_000,
                       600_000_000, 20_000_000_000])


@st.composite
def begin_kwargs(draw: Callable) -> dict:
    n = draw(_pick((None, 0, 1, 2, 3)))
    kwargs: dict = {}
    size = n if n is not None else draw(_ints(0, 3))
    if draw(_BOOLS):
        kwargs["request_ids"] = ([f"r{i}" for i in range(size)], tuple(range(size)), 5, "abc",
                                 iter(["a"]))[draw(_ints(0, 4))]
    if draw(_BOOLS):
        tps = [draw(_pick((None, *sorted(_VALID_TP), *_BAD_TP))) for _ in range(size)]
        kwargs["traceparents"] = (tps, tps, tps, sorted(_VALID_TP)[0], 7)[draw(_ints(0, 4))]
    if n is not None or draw(_ints(0, 5)) == 0:
        kwargs["batch_size"] = n if n is not None else draw(
            _ODD_BATCH)
    if draw(_ints(0, 3)) == 0:
        kwargs["method"] = draw(_pick(("ngram", "draft_model", "", 7)))
    return kwargs


@st.composite
def ops(draw: Callable, model: Model, nested: bool = True, strict: bool = False) -> list[tuple]:
    """The next call(s), drawn knowing the model's state so that lengths often match."""
    dt = draw(_DT)
    batch = model.record.batch if model.record is not None else None
    grouped = model.group_label is not None
    kind = draw(_pick(("step", "step", "broken_step", "broken_step", "fragment", "fragment",
                       "begin", "end_step", "start", "end", "verify_end", "with_stage",
                       "with_step", "poll")))
    if kind == "fragment":  # stage starts and ends in any order
        return [(draw(_pick(("start", "end"))), dt, draw(_ints(0, 2)))
                for _ in range(draw(_ints(2, 5)))]
    if kind in ("step", "broken_step"):  # a whole step, mostly well formed
        kwargs = draw(begin_kwargs()) if draw(_BOOLS) else {}
        n = kwargs.get("batch_size")
        values = draw(verify_values(n, good=draw(_BOOLS), grouped=grouped))
        calls = [("begin", dt, kwargs), ("start", dt, 0), ("end", dt, 0),
                 ("start", dt, 1), ("verify_end", dt, *values), ("start", dt, 2),
                 ("end", dt, 2), ("end_step", dt)]
        if kind == "broken_step":  # a call missing, repeated, or two swapped
            i = draw(_ints(0, len(calls) - 2))
            fault = draw(_ints(0, 2))
            if fault == 0:
                del calls[i]
            elif fault == 1:
                calls.insert(i, calls[i])
            else:
                calls[i], calls[i + 1] = calls[i + 1], calls[i]
        return calls
    if kind == "begin":
        return [("begin", dt, draw(begin_kwargs()))]
    if kind in ("start", "end"):
        return [(kind, dt, draw(_ints(0, 2)))]
    if kind == "verify_end":
        if draw(_ints(0, 5)) == 0:
            return [("verify_end", dt)]
        return [("verify_end", dt, *draw(verify_values(batch, good=draw(_BOOLS),
                                                        grouped=grouped)))]
    if kind == "with_stage":
        stage = draw(_ints(0, 2))
        values = None
        if stage == 1 and draw(_ints(0, 4)):
            values = draw(verify_values(batch, good=draw(_BOOLS), grouped=grouped))
        return [("with_stage", dt, stage, values, draw(_ints(0, 4)) == 0)]
    if kind == "with_step" and nested and not strict:
        inner: list[tuple] = []
        for _ in range(draw(_ints(0, 3))):
            inner.extend(draw(ops(model, nested=False)))
        return [("with_step", dt, draw(begin_kwargs()), inner, draw(_ints(0, 4)) == 0)]
    return [(kind if kind in ("end_step", "poll") else "end_step", dt)]


# ---- reading the real metrics ------------------------------------------------------------

def actual(families: Any) -> tuple[dict, list]:
    """Samples keyed by (name, frozenset of labels), and the exemplars."""
    out: dict = {}
    exemplars = []
    for family in families:
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
            if s.exemplar is not None:
                exemplars.append(s.exemplar)
    return out, exemplars


def check_invariants(samples: dict, previous: dict | None) -> None:
    """Per histogram series: cumulative buckets, +Inf == _count; every value monotone."""
    buckets: dict = {}
    for (name, labels), value in samples.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            rest = labels - {("le", le)}
            buckets.setdefault((name[: -len("_bucket")], rest), []).append((float(le), value))
    for (base, rest), points in buckets.items():
        points.sort()
        values = [v for _, v in points]
        assert values == sorted(values), (base, rest, points)
        assert points[-1][0] == float("inf")
        assert points[-1][1] == samples[(base + "_count", rest)], (base, rest)
    if previous is not None:
        for key, value in previous.items():
            assert samples[key] >= value, (key, value, samples[key])


# ---- the tests ---------------------------------------------------------------------------

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
_EXAMPLES = Counter()


@pytest.fixture(scope="module", autouse=True)
def _quiet_logger():
    # Every example warns once per reason (new hooks each time); the warnings are tested in
    # test_bad_input.py, here they would only slow pytest's log capture down.
    logger = logging.getLogger("spec_metrics")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


GROUP_LABEL = "group"


def _new_hooks(clock: Clock, strict: bool, steps: list | None = None,
               registry: CollectorRegistry | None = None,
               max_groups: int | None = None) -> spec_metrics.SpecDecodeHooks:
    """Hooks as the model expects them; with `max_groups`, with a group label."""
    return spec_metrics.SpecDecodeHooks(
        "eagle", labels=LABELS, registry=registry, tracer_provider=_PROVIDER, strict=strict,
        trace_ratio=1.0, max_traced_steps_per_second=1e12, max_draft_tokens=MAX_K,
        warn_interval_seconds=3600, on_step=None if steps is None else steps.append,
        group_label=GROUP_LABEL if max_groups else None, max_groups=max_groups or 16)


def _new_model(clock: Clock, max_groups: int | None) -> Model:
    return Model(clock.now, group_label=GROUP_LABEL if max_groups else None,
                 max_groups=max_groups or 16)


@settings(max_examples=FUZZ_EXAMPLES, **_SETTINGS)
@given(data=st.data())
def test_fuzzed_calls_never_raise_and_metrics_equal_the_model(data, monkeypatch_clock):
    clock = monkeypatch_clock
    _EXPORTER.clear()
    registry = CollectorRegistry()
    steps: list = []
    groups = data.draw(_GROUPING, label="max_groups (None: no group label)")
    hooks = _new_hooks(clock, strict=False, steps=steps, registry=registry, max_groups=groups)
    model, real = _new_model(clock, groups), Real(hooks, clock)
    previous = None
    calls = data.draw(_ints(1, 3), label="calls")
    scrape_each = data.draw(_BOOLS, label="scrape after each call")
    for call in range(calls):
        for op in data.draw(ops(model), label="op"):
            play(op, model)
            play(op, real)  # any exception fails the test: nothing may escape a hook
        if scrape_each or call == calls - 1:
            samples, exemplars = actual(hooks.collector.collect())
            assert samples == model.expected()
            check_invariants(samples, previous)
            previous = samples
    assert len(steps) == model.steps
    spans = _EXPORTER.get_finished_spans()
    assert len(spans) == model.spans
    assert sum(len(s.links) for s in spans if s.name == "spec_decode.step") == model.links
    exported = {(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
                for s in spans}
    for exemplar in exemplars:
        assert (exemplar.labels["trace_id"], exemplar.labels["span_id"]) in exported
    _EXAMPLES["parse"] += 1
    if _EXAMPLES["parse"] % PARSE_EVERY == 0:  # the real exposition, parsed back
        openmetrics = _EXAMPLES["parse"] % (2 * PARSE_EVERY) == 0
        if openmetrics:
            parsed = parse_om(openmetrics_latest(registry).decode())
        else:
            parsed = parse_text(text_latest(registry).decode())
        assert actual(parsed)[0] == samples


@settings(max_examples=STRICT_EXAMPLES, **_SETTINGS)
@given(data=st.data())
def test_strict_mode_raises_for_each_bad_input_and_only_then(data, monkeypatch_clock):
    clock = monkeypatch_clock
    groups = data.draw(_GROUPING, label="max_groups (None: no group label)")
    hooks = _new_hooks(clock, strict=True, max_groups=groups)
    model, real = _new_model(clock, groups), Real(hooks, clock)
    for _ in range(data.draw(_ints(1, 3), label="calls")):
        for op in data.draw(ops(model, strict=True), label="op"):
            model.rejections.clear()
            play(op, model)
            if not model.rejections:
                play(op, real)
                continue
            hook, reason, witness = model.rejections[0]
            with pytest.raises(ValueError) as info:
                play(op, real)
            assert isinstance(info.value, spec_metrics.StrictModeError)
            message = str(info.value)
            assert message.startswith(f"spec_metrics.{hook}:"), (message, hook, reason)
            assert witness in message, (message, witness, reason)
            # After a raise the hooks' state is whatever the engine left: start afresh.
            hooks = _new_hooks(clock, strict=True, max_groups=groups)
            model, real = _new_model(clock, groups), Real(hooks, clock)
            break


@pytest.fixture(scope="module")
def monkeypatch_clock():
    """One settable clock for the module's examples (hypothesis reruns the test body, so a
    function-scoped monkeypatch would not follow it)."""
    clock = Clock()
    patcher = pytest.MonkeyPatch()
    patcher.setattr(hooks_module, "perf_counter_ns", clock)
    yield clock
    patcher.undo()


# ---- regressions the fuzzer found ----------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"request_ids": 5}, {"traceparents": iter(["x"])}, {"batch_size": "2"},
    {"request_ids": ["a", "b"], "batch_size": "2"}, {"batch_size": -1},
    {"traceparents": sorted(_VALID_TP)[0]},  # one string, not one per request
])
def test_wrong_typed_begin_step_arguments_are_wrong_type(kwargs, monkeypatch_clock):
    hooks = _new_hooks(monkeypatch_clock, strict=False)
    hooks.begin_step(**kwargs)
    hooks.draft_start()
    hooks.draft_end()
    hooks.end_step()
    assert {k: v for k, v in hooks.collector.drops.counts.items() if v} == {"wrong_type": 1}
    strict = _new_hooks(monkeypatch_clock, strict=True)
    with pytest.raises(spec_metrics.StrictModeError, match=r"^spec_metrics\.begin_step: "):
        strict.begin_step(**kwargs)


@pytest.mark.parametrize("accepted, reason, text", [
    ([2**64 - 1], "wrong_type", f"accepted[0]={2**64 - 1}"),  # was 'negative, got -1'
    (np.array([0, 1, 5, 7]), "accepted_exceeds_drafted", "request 2 accepted 5 of 4"),
    (np.array([1.0, np.inf, 2.0], dtype=np.float16), "non_finite", "accepted[1]=inf"),
    (np.array([1.0, 7.0], dtype=np.float16), "accepted_exceeds_drafted",
     "request 1 accepted 7 of 4"),
    (np.r_[np.zeros(99_999), np.nan], "non_finite", "accepted[99999]=nan"),
    (np.r_[np.zeros(99_999, dtype=np.int64), -3], "negative", "accepted[99999]=-3"),
])
def test_rejected_counts_name_the_offending_entry(accepted, reason, text, monkeypatch_clock):
    hooks = _new_hooks(monkeypatch_clock, strict=True)
    hooks.verify_start()
    with pytest.raises(spec_metrics.StrictModeError) as info:
        hooks.verify_end(accepted, MAX_K)
    assert str(info.value).startswith("spec_metrics.verify_end: ") and text in str(info.value)
    lenient = _new_hooks(monkeypatch_clock, strict=False)
    lenient.verify_start()
    lenient.verify_end(accepted, MAX_K)  # float16 once overflowed in a numpy warning here
    assert {k: v for k, v in lenient.collector.drops.counts.items() if v} == {reason: 1}
