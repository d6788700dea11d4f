"""A vLLM v1 stat logger: vLLM's per-step speculative-decoding stats into spec_metrics.

vLLM's scheduler aggregates each step's drafts into `SpecDecodingStats` (num_spec_tokens,
num_drafts, num_draft_tokens, num_accepted_tokens, num_accepted_tokens_per_pos) and hands
them to every stat logger's `record()`. There are no per-request arrays and no stage timings,
so only the acceptance metrics are fed (no stage or step histograms, no spans, no exemplars).

With prefix acceptance, accepted_per_pos[p] is the number of drafts whose accepted length
exceeds p, so the accepted-length histogram and every counter are exact. The split of draft
tokens over positions is exact too when the stats carry `num_draft_tokens_per_pos` (vLLM
0.32 and later) or every draft had K tokens (num_draft_tokens == num_drafts * K). Only with
older vLLM, in a ragged step (n-gram drafts shorter than K, draft tokens rejected by a
grammar), is `spec_decode_draft_tokens_per_position_total` estimated: laid out front-first
(see `_ragged_draft_hist`); `ragged_steps` counts such steps.

vLLM is not imported at module load; when it is importable, `SpecMetricsStatLogger`
subclasses its `StatLoggerBase` (needed for the `vllm.stat_logger_plugins` entry point).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Iterator, Mapping

import numpy as np
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._support.drops import DropCounter, InputRejected, StrictModeError
from spec_metrics._support.summary import AcceptSummary
from spec_metrics.catalog import VLLM_COMPAT_METRICS

__all__ = ["SpecMetricsStatLogger", "VllmCompatCollector", "summary_from_stats"]

logger = logging.getLogger("spec_metrics")

try:  # only so that vLLM's plugin loader accepts the class; never required
    from vllm.v1.metrics.loggers import StatLoggerBase as _Base  # type: ignore[import-not-found]
except Exception:  # vLLM absent (or moved): a plain class with the same methods
    _Base = object


def summary_from_stats(stats: Any, max_k: int) -> tuple[AcceptSummary, bool]:
    """One SpecDecodingStats as spec_metrics' histograms, and whether the step was ragged.

    accepted_hist[L] = drafts that accepted exactly L tokens = a[L-1] - a[L] (a: accepted per
    position, prefix acceptance); draft_hist[K] = num_drafts when every draft had K tokens.
    Raises InputRejected when the aggregates contradict each other.
    """
    k = int(stats.num_spec_tokens)
    drafts = int(stats.num_drafts)
    tokens = int(stats.num_draft_tokens)
    accepted = int(stats.num_accepted_tokens)
    per_pos = np.asarray(stats.num_accepted_tokens_per_pos, dtype=np.int64)
    if k < 1 or k > max_k:
        raise InputRejected("draft_tokens_exceed_max", f"num_spec_tokens={k} is outside "
                            f"1..max_draft_tokens={max_k}; raise max_draft_tokens")
    if per_pos.shape != (k,):
        raise InputRejected("wrong_shape", f"num_accepted_tokens_per_pos has shape "
                            f"{per_pos.shape}, expected ({k},) for num_spec_tokens={k}")
    if min(drafts, tokens, accepted) < 0 or (k and per_pos.min() < 0):
        raise InputRejected("negative", f"negative counts in {_describe(stats)}")
    if tokens > drafts * k or tokens < drafts:
        raise InputRejected("wrong_shape", f"num_draft_tokens={tokens} is outside "
                            f"[num_drafts, num_drafts*K]=[{drafts}, {drafts * k}]")
    if per_pos[0] > drafts or (np.diff(per_pos) > 0).any():
        raise InputRejected("accepted_exceeds_drafted", "num_accepted_tokens_per_pos must be "
                            f"non-increasing and at most num_drafts: {_describe(stats)}")
    # Every draft has at least one token and at least as many as it accepted.
    if int(per_pos.sum()) != accepted or tokens < drafts + accepted - int(per_pos[0]):
        raise InputRejected("accepted_exceeds_drafted", "num_accepted_tokens must equal the "
                            "sum over positions, and the drafts must hold at least "
                            f"max(1, accepted) tokens each: {_describe(stats)}")
    size = max_k + 1
    # at_least[i]: drafts that accepted at least i tokens (i = 0: all of them).
    at_least = np.zeros(size + 1, dtype=np.int64)
    at_least[0] = drafts
    at_least[1:k + 1] = per_pos
    accepted_hist = at_least[:size] - at_least[1:]  # exactly L = (>= L) - (>= L+1)
    draft_per_pos = getattr(stats, "num_draft_tokens_per_pos", None)
    if draft_per_pos is not None:  # vLLM 0.32+: the exact draft tokens per position
        return AcceptSummary(accepted_hist, _exact_draft_hist(
            np.asarray(draft_per_pos, dtype=np.int64), per_pos, drafts, tokens, k, size,
            stats)), False
    ragged = tokens != drafts * k
    if ragged:
        draft_hist = _ragged_draft_hist(per_pos, drafts, tokens, k, size)
    else:
        draft_hist = np.zeros(size, dtype=np.int64)
        draft_hist[k] = drafts
    return AcceptSummary(accepted_hist, draft_hist), ragged


def _exact_draft_hist(draft_per_pos: np.ndarray, per_pos: np.ndarray, drafts: int,
                      tokens: int, k: int, size: int, stats: Any) -> np.ndarray:
    """Draft lengths from the draft tokens per position: a draft of L tokens fills
    positions 0..L-1, so the drafts of exactly L tokens are d[L-1] - d[L]."""
    if draft_per_pos.shape != (k,):
        raise InputRejected("wrong_shape", f"num_draft_tokens_per_pos has shape "
                            f"{draft_per_pos.shape}, expected ({k},) for num_spec_tokens={k}")
    if (draft_per_pos[0] != drafts or int(draft_per_pos.sum()) != tokens
            or (np.diff(draft_per_pos) > 0).any() or (draft_per_pos < per_pos).any()):
        raise InputRejected("accepted_exceeds_drafted", "num_draft_tokens_per_pos must start "
                            "at num_drafts, be non-increasing, sum to num_draft_tokens and "
                            "hold at least the accepted tokens of each position: "
                            f"{_describe(stats)}, num_draft_tokens_per_pos="
                            f"{draft_per_pos.tolist()}")
    draft_hist = np.zeros(size, dtype=np.int64)
    draft_hist[1:k] = draft_per_pos[:-1] - draft_per_pos[1:]
    draft_hist[k] = draft_per_pos[-1]
    return draft_hist


def _ragged_draft_hist(per_pos: np.ndarray, drafts: int, tokens: int, k: int,
                       size: int) -> np.ndarray:
    """Draft lengths for a step whose drafts had fewer than K tokens, unknown which (vLLM
    before 0.32, whose stats lack num_draft_tokens_per_pos): an estimate.

    Every draft has at least one token and at least as many as it accepted: position p holds
    at least per_pos[p] drafts (p >= 1) and position 0 all of them. The remaining tokens
    fill the earliest positions first (a short draft lacks its late positions). Totals are
    exact; the per-position split is this layout, not a measurement.
    """
    floor = per_pos.copy()
    floor[0] = drafts
    spare = np.int64(tokens) - floor.sum()
    room = drafts - floor  # drafts that could still have a token at each position
    fill = np.minimum(room, np.maximum(spare - np.concatenate(([0], np.cumsum(room)[:-1])), 0))
    per_position = floor + fill  # non-increasing: filled front-first
    draft_hist = np.zeros(size, dtype=np.int64)
    draft_hist[1:k] = per_position[:-1] - per_position[1:]
    draft_hist[k] = per_position[-1]
    return draft_hist


def _describe(stats: Any) -> str:
    return (f"num_spec_tokens={stats.num_spec_tokens}, num_drafts={stats.num_drafts}, "
            f"num_draft_tokens={stats.num_draft_tokens}, "
            f"num_accepted_tokens={stats.num_accepted_tokens}, "
            f"num_accepted_tokens_per_pos={list(stats.num_accepted_tokens_per_pos)}")


class VllmCompatCollector(Collector):
    """vLLM's own spec-decode counters, with vLLM's names, types and labels
    (`catalog.VLLM_COMPAT_METRICS`), one series per engine index."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        # engine -> [drafts, tokens, accepted, per-position array, created (epoch seconds)]
        self._engines: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def add_engine(self, engine: str, num_spec_tokens: int) -> None:
        """vLLM creates an engine's series (zeros, positions 0..K-1) at start-up: so do we."""
        with self._lock:
            self._engines.setdefault(engine, _row(num_spec_tokens))

    def observe(self, engine: str, stats: Any) -> None:
        per_pos = np.asarray(stats.num_accepted_tokens_per_pos, dtype=np.int64)
        with self._lock:
            row = self._engines.setdefault(engine, _row(per_pos.shape[0]))
            row[0] += int(stats.num_drafts)
            row[1] += int(stats.num_draft_tokens)
            row[2] += int(stats.num_accepted_tokens)
            if row[3].shape[0] < per_pos.shape[0]:
                row[3] = np.pad(row[3], (0, per_pos.shape[0] - row[3].shape[0]))
            row[3][: per_pos.shape[0]] += per_pos

    def describe(self) -> list[Metric]:
        return [_compat_family(spec) for spec in VLLM_COMPAT_METRICS]

    def collect(self) -> Iterator[Metric]:
        families = [_compat_family(spec) for spec in VLLM_COMPAT_METRICS]
        with self._lock:
            rows = [(engine, row[0], row[1], row[2], row[3].tolist(), row[4])
                    for engine, row in self._engines.items()]
        # `created` gives the _created series prometheus_client's own Counter shows, and
        # like it none once turned off (PROMETHEUS_DISABLE_CREATED_SERIES=True at import,
        # or disable_created_metrics()).
        with_created = _created_series_enabled()
        for engine, drafts, tokens, accepted, per_pos, created in rows:
            if not with_created:
                created = None
            labels = [self.model_name, engine]
            for family, value in zip(families, (drafts, tokens, accepted)):
                family.add_metric(labels, float(value), created=created)
            for position, value in enumerate(per_pos):
                families[3].add_metric([*labels, str(position)], float(value), created=created)
        yield from families


def _created_series_enabled() -> bool:
    """Whether prometheus_client's own metrics write `_created` series now. Its switch has
    setters (`disable_created_metrics`, `enable_created_metrics`) but no getter: read the
    module flag they set, else the environment variable it is initialised from."""
    flag = getattr(prometheus_metrics, "_use_created", None)
    if isinstance(flag, bool):
        return flag
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
        "true", "1", "t")


def _row(num_spec_tokens: int) -> list[Any]:
    return [0, 0, 0, np.zeros(num_spec_tokens, np.int64), time.time()]


def _compat_family(spec: Any) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))


class _Sink:
    """What every engine's logger of one registry shares: one collector of our metrics
    (engines' counts add up, as counters and histograms should) and the vLLM-name one."""

    def __init__(self, labels: Mapping[str, str], max_k: int, model_name: str,
                 registry: CollectorRegistry | None, vllm_names: bool,
                 warn_interval_seconds: float) -> None:
        self.collector = SpecDecodeCollector(
            labels, max_draft_tokens=max_k, drops=DropCounter(warn_interval_seconds),
            registry=registry)
        self.compat = None
        if vllm_names:
            try:
                self.compat = VllmCompatCollector(model_name, registry)
            except ValueError:
                if registry is not None:
                    registry.unregister(self.collector)
                raise
        self.registry = registry

    def close(self) -> None:
        if self.registry is not None:
            self.registry.unregister(self.collector)
            if self.compat is not None:
                self.registry.unregister(self.compat)
            self.registry = None


# One sink per registry for loggers built without an explicit one: vLLM builds one logger
# per engine (data parallel), and they must not register the same names twice.
_SINKS: dict[int, tuple[CollectorRegistry, _Sink]] = {}
_SINKS_LOCK = threading.Lock()


class SpecMetricsStatLogger(_Base):  # type: ignore[misc,valid-type]
    """A vLLM v1 stat logger feeding spec_metrics' acceptance metrics.

    vLLM calls the class as a per-engine factory `(vllm_config, engine_index)`: pass it in
    `stat_loggers=[SpecMetricsStatLogger]`, or `SpecMetricsStatLogger.factory(...)` for
    options, or register it under the `vllm.stat_logger_plugins` entry point.
    """

    def __init__(self, vllm_config: Any, engine_index: int = 0, *,
                 registry: CollectorRegistry | None = REGISTRY,
                 labels: Mapping[str, str] | None = None,
                 method: str | None = None,
                 max_draft_tokens: int | None = None,
                 vllm_names: bool = False,
                 strict: bool = False,
                 warn_interval_seconds: float = 60.0) -> None:
        """
        Args:
          vllm_config: vLLM's VllmConfig (speculative_config and model_config are read).
          engine_index: vLLM's engine index (the `engine` label of vLLM-name series).
          registry: where our collector (and the vLLM-name one) is registered.
          labels: our constant labels; default {"model": served_model_name, "engine": "vllm"}.
          method: the `method` label; default speculative_config.method.
          max_draft_tokens: largest K covered; default max(8, num_speculative_tokens).
          vllm_names: also expose vLLM's own counter names (VLLM_COMPAT_METRICS). vLLM's
            PrometheusStatLogger registers them in the default registry, so this needs a
            registry of its own (served with spec_metrics.start_http_server(registry=...)).
          strict: contradictory stats raise spec_metrics.StrictModeError instead of being
            counted in spec_metrics_dropped_total.
        """
        spec_config = getattr(vllm_config, "speculative_config", None)
        model_config = getattr(vllm_config, "model_config", None)
        model_name = str(getattr(model_config, "served_model_name", None) or "unknown")
        k = int(getattr(spec_config, "num_speculative_tokens", 0) or 0)
        self.engine = str(engine_index)
        self.method = method or str(getattr(spec_config, "method", None) or "unknown")
        self.max_draft_tokens = max_draft_tokens or min(64, max(8, k))
        self.strict = strict
        self.ragged_steps = 0
        if vllm_names and registry is REGISTRY:
            raise ValueError(
                "spec_metrics: vllm_names=True needs its own registry: vLLM's "
                "PrometheusStatLogger registers the same vllm:spec_decode_* names in "
                "prometheus_client's default registry, and vLLM would fail at start-up. Pass "
                "registry=CollectorRegistry() and serve it with "
                "spec_metrics.start_http_server(registry=...)")
        labels = dict(labels) if labels is not None else {"model": model_name, "engine": "vllm"}
        self._sink = _shared_sink(registry, labels, self.max_draft_tokens, model_name,
                                  vllm_names, warn_interval_seconds)
        self.collector = self._sink.collector
        self._drops = self.collector.drops
        self._vllm_config = vllm_config
        # The entry point plugin and stat_loggers=[...] both make a logger for the same
        # engine: the second would count every step again. It is refused: warned, counted,
        # and its record() does nothing.
        self.duplicate = _claim_engine(self, vllm_config, engine_index)
        if self.duplicate:
            self._drops.reject(
                "vllm.SpecMetricsStatLogger", "duplicate_logger",
                f"a SpecMetricsStatLogger already records engine {engine_index} of this vLLM "
                "engine (is the vllm.stat_logger_plugins entry point installed and "
                "stat_loggers=[...] passed too?); this one records nothing, so counts are not "
                "doubled", strict)
            return
        if self._sink.compat is not None and k:
            self._sink.compat.add_engine(self.engine, k)

    @classmethod
    def factory(cls, **options: Any) -> Any:
        """A `(vllm_config, engine_index) -> logger` factory with these options, for
        `stat_loggers=[...]`. Its engines share one collector."""
        def make(vllm_config: Any, engine_index: int = 0) -> "SpecMetricsStatLogger":
            return cls(vllm_config, engine_index, **options)

        return make

    def record(self, scheduler_stats: Any, iteration_stats: Any,
               mm_cache_stats: Any = None, engine_idx: int = 0, **_: Any) -> None:
        """vLLM calls this once per engine-core output: counts a step's drafts, never
        raises (except StrictModeError with strict=True)."""
        stats = getattr(scheduler_stats, "spec_decoding_stats", None)
        if stats is None or self.duplicate:
            return
        try:
            if not stats.num_drafts:
                return
            try:
                summary, ragged = summary_from_stats(stats, self.max_draft_tokens)
            except InputRejected as rejected:
                self._drops.reject("vllm.record", rejected.reason, rejected.message,
                                   self.strict)
                return
            if ragged:
                self.ragged_steps += 1
            self.collector._consume(self.method, (None, None, None), None, summary, None)
            compat = self._sink.compat
            if compat is not None:
                compat.observe(self.engine, stats)
        except StrictModeError:
            raise
        except Exception:
            self._drops.count("internal_error")
            logger.exception("spec_metrics.vllm.record: internal error, step dropped "
                             "(please report)")

    def log(self) -> None:
        """vLLM's periodic log call: nothing to log, Prometheus reads the metrics."""

    def log_engine_initialized(self) -> None:
        logger.info("spec_metrics: vLLM stat logger for engine %s (method=%s, K up to %d)",
                    self.engine, self.method, self.max_draft_tokens)

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        """Newer vLLM calls this on every logger; nothing to record."""

    def close(self) -> None:
        """Unregister the shared collectors (all engines' loggers of this registry)."""
        _release_engine(self)
        with _SINKS_LOCK:
            for key, (_, sink) in list(_SINKS.items()):
                if sink is self._sink:
                    del _SINKS[key]
        self._sink.close()


# (id(vllm_config), engine_index) -> the logger recording that engine, while it lives.
_ENGINES: "dict[tuple[int, int], weakref.ref[SpecMetricsStatLogger]]" = {}


def _claim_engine(logger_: "SpecMetricsStatLogger", vllm_config: Any, engine_index: int
                  ) -> bool:
    """Register `logger_` as the one recording this engine; True if another already is."""
    key = (id(vllm_config), int(engine_index))
    with _SINKS_LOCK:
        held = _ENGINES.get(key)
        other = held() if held is not None else None
        if other is not None and other._vllm_config is vllm_config and not other.duplicate:
            return True
        _ENGINES[key] = weakref.ref(logger_)
        return False


def _release_engine(logger_: "SpecMetricsStatLogger") -> None:
    with _SINKS_LOCK:
        for key, held in list(_ENGINES.items()):
            if held() is logger_:
                del _ENGINES[key]


def _shared_sink(registry: CollectorRegistry | None, labels: dict[str, str], max_k: int,
                 model_name: str, vllm_names: bool, warn_interval_seconds: float) -> _Sink:
    if registry is None:
        return _Sink(labels, max_k, model_name, None, vllm_names, warn_interval_seconds)
    with _SINKS_LOCK:
        held = _SINKS.get(id(registry))
        if held is not None and held[0] is registry:
            sink = held[1]
            collector = sink.collector
            if (collector.const_labels != labels or collector.max_draft_tokens != max_k
                    or (sink.compat is not None) != vllm_names):
                raise ValueError(
                    "spec_metrics: another SpecMetricsStatLogger already registered its "
                    f"collector in this registry with labels={collector.const_labels}, "
                    f"max_draft_tokens={collector.max_draft_tokens}, "
                    f"vllm_names={sink.compat is not None}; give every engine the same "
                    "options, or each its own registry")
            return sink
        sink = _Sink(labels, max_k, model_name, registry, vllm_names, warn_interval_seconds)
        _SINKS[id(registry)] = (registry, sink)
        return sink
