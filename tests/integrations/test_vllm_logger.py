"""The vLLM stat logger, driven with stand-ins of vLLM v1's documented stats shapes.

vLLM cannot run here. The dataclasses below are stand-ins with the fields of
`vllm.v1.spec_decode.metrics.SpecDecodingStats` and the attributes of `SchedulerStats` and
`VllmConfig` that the logger reads; `stand_in_stats()` fills them the way vLLM's scheduler
does per draft (`observe_draft`: one draft, its draft tokens, and +1 at every accepted
position). Values are read back through prometheus_client's OpenMetrics parser.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.parser import text_string_to_metric_families

import spec_metrics
from spec_metrics.catalog import METRICS, VLLM_COMPAT_METRICS
from spec_metrics.integrations.vllm import SpecMetricsStatLogger
from tests.otlp import stop_process

from ..conftest import sample_value, scrape


@dataclass
class SpecDecodingStatsStandIn:
    """Stand-in for vllm.v1.spec_decode.metrics.SpecDecodingStats (same fields)."""

    num_spec_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)


@dataclass
class SpecDecodingStatsStandIn032(SpecDecodingStatsStandIn):
    """vLLM 0.32's SpecDecodingStats also has the draft tokens per position."""

    num_draft_tokens_per_pos: list[int] = field(default_factory=list)


@dataclass
class SchedulerStatsStandIn:
    """Stand-in for vllm.v1.metrics.stats.SchedulerStats (the field the logger reads)."""

    spec_decoding_stats: SpecDecodingStatsStandIn | None = None


@dataclass
class SpeculativeConfigStandIn:
    method: str = "eagle"
    num_speculative_tokens: int = 4


@dataclass
class ModelConfigStandIn:
    served_model_name: str = "tiny"


@dataclass
class VllmConfigStandIn:
    """Stand-in for vllm.config.VllmConfig (the attributes the logger reads)."""

    speculative_config: SpeculativeConfigStandIn = field(default_factory=SpeculativeConfigStandIn)
    model_config: ModelConfigStandIn = field(default_factory=ModelConfigStandIn)


def stand_in_stats(k: int, drafts: list[tuple[int, int]]) -> SchedulerStatsStandIn:
    """One scheduler step: (draft tokens, accepted tokens) per draft, aggregated like vLLM."""
    stats = SpecDecodingStatsStandIn(k, num_accepted_tokens_per_pos=[0] * k)
    for draft_tokens, accepted in drafts:
        stats.num_drafts += 1
        stats.num_draft_tokens += draft_tokens
        stats.num_accepted_tokens += accepted
        for position in range(accepted):
            stats.num_accepted_tokens_per_pos[position] += 1
    return SchedulerStatsStandIn(stats)


OUR_ACCEPTANCE_FAMILIES = [spec.family for spec in METRICS if spec.name not in (
    "spec_decode_stage_duration_seconds", "spec_decode_step_duration_seconds",
    "spec_metrics_dropped_total")]
LABELS = {"method": "eagle", "model": "tiny", "engine": "vllm"}


def acceptance_samples(registry: CollectorRegistry, skip: tuple[str, ...] = ()) -> dict:
    families = scrape(registry)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for name in OUR_ACCEPTANCE_FAMILIES if name not in skip
        for s in families[name].samples if not s.name.endswith("_created")
    }


def classic_scrape(registry: CollectorRegistry) -> dict:
    """The classic text format, parsed back. vLLM's colon names are checked there:
    prometheus_client 0.26's OpenMetrics writer turns ':' into '_' in sample names (but not
    in HELP/TYPE), for its own Counters too, so its OpenMetrics text cannot be parsed back."""
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def hooks_reference(k: int, steps: list[list[tuple[int, int]]]) -> CollectorRegistry:
    """The same drafts fed per request through the hooks, for comparison."""
    registry = CollectorRegistry()
    hooks = spec_metrics.SpecDecodeHooks("eagle", labels={"model": "tiny", "engine": "vllm"},
                                         registry=registry, tracing=False, max_draft_tokens=8)
    for drafts in steps:
        hooks.verify_start()
        hooks.verify_end(np.array([a for _, a in drafts]), np.array([d for d, _ in drafts]))
        hooks.end_step()
    return registry


def test_uniform_drafts_exact(registry):
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry)
    steps = [[(4, 0), (4, 1), (4, 4), (4, 2)], [(4, 3), (4, 3), (4, 0)]]
    for drafts in steps:
        logger.record(stand_in_stats(4, drafts), None, engine_idx=0)
    families = scrape(registry)

    def value(family: str, sample: str, **labels: str) -> float:
        return sample_value(families, family, sample, **LABELS, **labels)

    assert value("spec_decode_drafts", "spec_decode_drafts_total") == 7
    assert value("spec_decode_draft_tokens", "spec_decode_draft_tokens_total") == 28
    assert value("spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total") == 13
    assert value("spec_decode_emitted_tokens", "spec_decode_emitted_tokens_total") == 20
    for position, (drafted, accepted) in enumerate(zip([7, 7, 7, 7], [5, 4, 3, 1])):
        assert value("spec_decode_draft_tokens_per_position",
                     "spec_decode_draft_tokens_per_position_total",
                     position=str(position)) == drafted
        assert value("spec_decode_accepted_tokens_per_position",
                     "spec_decode_accepted_tokens_per_position_total",
                     position=str(position)) == accepted
    cumulative = {"0.0": 2, "1.0": 3, "2.0": 4, "3.0": 6, "4.0": 7, "8.0": 7, "+Inf": 7}
    for le, count in cumulative.items():
        assert value("spec_decode_accepted_length", "spec_decode_accepted_length_bucket",
                     le=le) == count
    assert value("spec_decode_accepted_length", "spec_decode_accepted_length_sum") == 13
    # No stage timings come from vLLM: the latency histograms stay empty.
    assert value("spec_decode_step_duration_seconds",
                 "spec_decode_step_duration_seconds_count") == 0
    assert logger.ragged_steps == 0
    # Identical to the same drafts passed per request to the hooks.
    assert acceptance_samples(registry) == acceptance_samples(hooks_reference(4, steps))


def test_ragged_drafts_counters_exact_positions_laid_out_front_first(registry):
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry)
    drafts = [(4, 4), (1, 0), (2, 1), (3, 0)]  # n-gram drafts shorter than K=4
    logger.record(stand_in_stats(4, drafts), None)
    assert logger.ragged_steps == 1
    families = scrape(registry)
    # Everything but the split of draft tokens over positions (and so over draft lengths)
    # equals the per-request truth.
    skip = ("spec_decode_draft_tokens_per_position", "spec_decode_draft_length")
    assert acceptance_samples(registry, skip) == acceptance_samples(
        hooks_reference(4, [drafts]), skip)
    assert sample_value(families, "spec_decode_draft_tokens", "spec_decode_draft_tokens_total",
                        **LABELS) == 10
    assert sample_value(families, "spec_decode_accepted_length",
                        "spec_decode_accepted_length_bucket", le="0.0", **LABELS) == 2
    # Truth is [4, 3, 2, 1]; unknown, so: at least max(1, accepted) per draft, the other 3
    # tokens at the earliest positions. Total exact, never below accepted per position.
    laid_out = [sample_value(families, "spec_decode_draft_tokens_per_position",
                             "spec_decode_draft_tokens_per_position_total",
                             position=str(p), **LABELS) for p in range(4)]
    assert laid_out == [4, 4, 1, 1]
    assert sum(laid_out) == 10
    # The draft lengths that layout means: three drafts of 2 tokens, one of 4 (truth: 4, 1,
    # 2, 3); count and sum exact.
    lengths = [sample_value(families, "spec_decode_draft_length",
                            "spec_decode_draft_length_bucket", le=f"{float(n)}", **LABELS)
               for n in range(5)]
    assert lengths == [0, 0, 3, 3, 4]
    assert sample_value(families, "spec_decode_draft_length", "spec_decode_draft_length_sum",
                        **LABELS) == 10


def test_ragged_drafts_exact_with_draft_tokens_per_position(registry):
    # vLLM 0.32 reports the draft tokens of each position: no estimate, the truth.
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry)
    drafts = [(4, 4), (1, 0), (2, 1), (3, 0)]
    old = stand_in_stats(4, drafts).spec_decoding_stats
    stats = SpecDecodingStatsStandIn032(**vars(old), num_draft_tokens_per_pos=[4, 3, 2, 1])
    logger.record(SchedulerStatsStandIn(stats), None)
    assert logger.ragged_steps == 0  # nothing estimated
    assert acceptance_samples(registry) == acceptance_samples(hooks_reference(4, [drafts]))
    families = scrape(registry)
    assert [sample_value(families, "spec_decode_draft_tokens_per_position",
                         "spec_decode_draft_tokens_per_position_total",
                         position=str(p), **LABELS) for p in range(4)] == [4, 3, 2, 1]
    # Per-position draft tokens that contradict the other aggregates are refused.
    bad = SpecDecodingStatsStandIn032(**vars(old), num_draft_tokens_per_pos=[4, 3, 1, 1])
    logger.record(SchedulerStatsStandIn(bad), None)  # sums to 9, not 10
    assert sample_value(scrape(registry), "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="accepted_exceeds_drafted", **{k: v for k, v in LABELS.items()
                                                               if k != "method"}) == 1


def test_vllm_names_exact(registry):
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry, vllm_names=True)
    # vLLM creates an engine's series at start-up: zeros for positions 0..K-1.
    text = generate_latest(registry).decode()
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="tiny",' \
           'position="3"} 0.0' in text
    logger.record(stand_in_stats(4, [(4, 0), (4, 1), (4, 4), (4, 2)]), None)
    logger.record(stand_in_stats(4, [(4, 3), (4, 3), (4, 0)]), None)
    text = generate_latest(registry).decode()
    for spec in VLLM_COMPAT_METRICS:
        assert f"# TYPE {spec.name} counter" in text
        assert f"# HELP {spec.name} {spec.help}" in text
    labels = 'engine="0",model_name="tiny"'
    assert f"vllm:spec_decode_num_drafts_total{{{labels}}} 7.0" in text
    assert f"vllm:spec_decode_num_draft_tokens_total{{{labels}}} 28.0" in text
    assert f"vllm:spec_decode_num_accepted_tokens_total{{{labels}}} 13.0" in text
    for position, value in enumerate([5, 4, 3, 1]):
        assert (f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},'
                f'position="{position}"}} {value}.0') in text
    # prometheus_client 0.26's OpenMetrics writer (what Prometheus asks for) escapes ':' to
    # '_' in sample names, as for its own Counters: hence the relabelling in the docs.
    openmetrics = openmetrics_latest(registry).decode()
    assert f"vllm_spec_decode_num_drafts_total{{{labels}}} 7.0" in openmetrics
    # The parser reads them back as the same values.
    families = classic_scrape(registry)
    assert sample_value(families, "vllm:spec_decode_num_drafts",
                        "vllm:spec_decode_num_drafts_total", engine="0", model_name="tiny") == 7
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total",
                        **LABELS) == 7


def test_vllm_names_match_prometheus_client_counters_declared_like_vllm(registry):
    """vLLM declares these as prometheus_client Counters (SpecDecodingProm); the same
    declarations with the same increments must expose the same families and samples."""
    from prometheus_client import Counter

    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry, vllm_names=True)
    logger.record(stand_in_stats(4, [(4, 0), (4, 1), (4, 4), (4, 2)]), None)
    reference = CollectorRegistry()
    counters = {spec.name: Counter(spec.family, spec.help, list(spec.labels),
                                   registry=reference) for spec in VLLM_COMPAT_METRICS}
    counters["vllm:spec_decode_num_drafts_total"].labels("tiny", "0").inc(4)
    counters["vllm:spec_decode_num_draft_tokens_total"].labels("tiny", "0").inc(16)
    counters["vllm:spec_decode_num_accepted_tokens_total"].labels("tiny", "0").inc(7)
    for position, value in enumerate([3, 2, 1, 1]):
        counters["vllm:spec_decode_num_accepted_tokens_per_pos_total"].labels(
            "tiny", "0", str(position)).inc(value)

    def vllm_samples(source: CollectorRegistry) -> dict:
        return {(f.name, f.type, f.documentation, s.name, tuple(sorted(s.labels.items()))):
                (s.value if not s.name.endswith("_created") else "created")
                for name, f in classic_scrape(source).items() if name.startswith("vllm:")
                for s in f.samples}

    assert vllm_samples(registry) == vllm_samples(reference)


def test_engines_share_our_series_and_keep_their_vllm_series(registry):
    make = SpecMetricsStatLogger.factory(registry=registry, vllm_names=True)
    engine0, engine1 = make(VllmConfigStandIn(), 0), make(VllmConfigStandIn(), 1)
    assert engine0.collector is engine1.collector
    engine0.record(stand_in_stats(4, [(4, 2)]), None, engine_idx=0)
    engine1.record(stand_in_stats(4, [(4, 1), (4, 0)]), None, engine_idx=1)
    families = classic_scrape(registry)
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total",
                        **LABELS) == 3
    for engine, drafts in (("0", 1), ("1", 2)):
        assert sample_value(families, "vllm:spec_decode_num_drafts",
                            "vllm:spec_decode_num_drafts_total", engine=engine,
                            model_name="tiny") == drafts
    engine0.close()
    assert classic_scrape(registry) == {}


def test_vllm_names_refused_in_the_default_registry():
    with pytest.raises(ValueError, match="needs its own registry"):
        SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=REGISTRY, vllm_names=True)


def test_nothing_to_record(registry):
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry)
    logger.record(None, None)
    logger.record(SchedulerStatsStandIn(None), None)
    logger.record(stand_in_stats(4, []), None)  # a step without drafts
    logger.log()
    logger.log_engine_initialized()
    assert "spec_decode_drafts" not in {  # no series was created
        name for name, family in scrape(registry).items() if family.samples}


@pytest.mark.parametrize("mutate, reason", [
    (lambda s: s.num_accepted_tokens_per_pos.append(0), "wrong_shape"),
    (lambda s: s.num_accepted_tokens_per_pos.__setitem__(slice(None), [1, 2, 0, 0]),
     "accepted_exceeds_drafted"),
    (lambda s: setattr(s, "num_accepted_tokens", 99), "accepted_exceeds_drafted"),
    (lambda s: setattr(s, "num_draft_tokens", 17), "wrong_shape"),
    (lambda s: setattr(s, "num_drafts", -1), "negative"),
    (lambda s: setattr(s, "num_spec_tokens", 9), "draft_tokens_exceed_max"),
])
def test_contradictory_stats_are_dropped_and_counted(registry, mutate, reason):
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry)
    scheduler_stats = stand_in_stats(4, [(4, 2), (4, 3), (4, 0), (4, 1)])
    mutate(scheduler_stats.spec_decoding_stats)
    logger.record(scheduler_stats, None)
    families = scrape(registry)
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason=reason, model="tiny", engine="vllm") == 1
    assert "spec_decode_drafts" not in {n for n, f in families.items() if f.samples}


def test_strict_mode_raises_naming_the_value(registry):
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry, strict=True)
    scheduler_stats = stand_in_stats(4, [(4, 2)])
    scheduler_stats.spec_decoding_stats.num_accepted_tokens_per_pos = [1, 1]
    with pytest.raises(spec_metrics.StrictModeError, match=r"vllm\.record.*shape \(2,\)"):
        logger.record(scheduler_stats, None)


def test_import_stays_light():
    code = ("import sys, spec_metrics, spec_metrics.integrations; "
            "assert 'spec_metrics.integrations.vllm' not in sys.modules; "
            "from spec_metrics.integrations import vllm, sglang; "
            "assert 'torch' not in sys.modules and 'vllm' not in sys.modules; "
            "print(vllm.SpecMetricsStatLogger.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "object"  # vLLM is absent here: no StatLoggerBase base


# The relabelling docs/integrations/vllm.md gives for vLLM-name dashboards (see there why).
VLLM_RELABEL = {"source_labels": ["__name__"], "regex": "vllm_(spec_decode_.*)",
                "target_label": "__name__", "replacement": "vllm:$1"}


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus not found on PATH: this test runs a real Prometheus "
                           "(Debian/Ubuntu: apt-get install -y --no-install-recommends "
                           "prometheus, or scripts/setup.sh)")
def test_real_prometheus_stores_both_name_sets(tmp_path, registry):
    binary = shutil.which("prometheus")
    logger = SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry, vllm_names=True)
    logger.record(stand_in_stats(4, [(4, 0), (4, 1), (4, 4), (4, 2)]), None)
    logger.record(stand_in_stats(4, [(4, 3), (4, 3), (4, 0)]), None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        prom_port = probe.getsockname()[1]
    with spec_metrics.start_http_server(port=0, registry=registry) as server:
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{
                      "job_name": "vllm", "static_configs": [
                          {"targets": [f"127.0.0.1:{server.port}"]}],
                      "metric_relabel_configs": [VLLM_RELABEL]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            def query(expr: str) -> dict:
                url = (f"http://127.0.0.1:{prom_port}/api/v1/query?"
                       + urllib.parse.urlencode({"query": expr}))
                with urllib.request.urlopen(url, timeout=5) as response:
                    return {json.dumps(r["metric"].get("position")): float(r["value"][1])
                            for r in json.load(response)["data"]["result"]}

            deadline = time.monotonic() + 60  # give up then (a loaded machine starts slowly)
            found: dict = {}
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    found = query('vllm:spec_decode_num_drafts_total{engine="0"}')
                except OSError:
                    found = {}
                if found:
                    break
                time.sleep(0.2)
            assert found == {"null": 7.0}
            assert query('vllm:spec_decode_num_draft_tokens_total{model_name="tiny"}') == {
                "null": 28.0}
            assert query("vllm:spec_decode_num_accepted_tokens_per_pos_total") == {
                '"0"': 5.0, '"1"': 4.0, '"2"': 3.0, '"3"': 1.0}
            assert query('spec_decode_drafts_total{model="tiny",engine="vllm"}') == {
                "null": 7.0}
            assert query('{__name__=~"vllm_.*"}') == {}  # nothing left under '_' names
        finally:
            stop_process(process)


def test_a_second_logger_for_the_same_engine_is_refused(registry, caplog):
    # The vllm.stat_logger_plugins entry point and stat_loggers=[...] both build a logger
    # for each engine of one vLLM engine: the second is refused, so nothing counts twice.
    config = VllmConfigStandIn()
    first = SpecMetricsStatLogger(config, 0, registry=registry)
    with caplog.at_level("WARNING", logger="spec_metrics"):
        second = SpecMetricsStatLogger(config, 0, registry=registry)
    assert not first.duplicate and second.duplicate
    assert any("stat_loggers=[...]" in r.getMessage() for r in caplog.records)
    other_engine = SpecMetricsStatLogger(config, 1, registry=registry)  # data parallel: fine
    assert not other_engine.duplicate
    for logger in (first, second, other_engine):
        logger.record(stand_in_stats(4, [(4, 2)]), None)
    families = scrape(registry)
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total",
                        **LABELS) == 2  # engines 0 and 1, once each
    assert sample_value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="duplicate_logger", model="tiny", engine="vllm") == 1
    # Another vLLM engine (another config) in the same process records on its own.
    assert not SpecMetricsStatLogger(VllmConfigStandIn(), 0, registry=registry).duplicate
    first.close()


def test_strict_mode_raises_on_a_second_logger(registry):
    config = VllmConfigStandIn()
    first = SpecMetricsStatLogger(config, 0, registry=registry, strict=True)  # kept alive
    with pytest.raises(spec_metrics.StrictModeError, match="duplicate|already records"):
        SpecMetricsStatLogger(config, 0, registry=registry, strict=True)
    assert not first.duplicate
