"""Bad configuration raises at construction with a message that says what to do."""

from __future__ import annotations

import pytest

import spec_metrics
from spec_metrics._support.config import HooksConfig


@pytest.mark.parametrize(
    "options, message",
    [
        ({"stage_buckets": (0.1, 0.05)}, "strictly increasing"),
        ({"step_buckets": (0.1, 0.1)}, "strictly increasing"),
        ({"stage_buckets": ()}, "must not be empty"),
        ({"stage_buckets": (0.0, 1.0)}, "finite positive"),
        ({"stage_buckets": (1.0, float("inf"))}, "finite positive"),
        ({"labels": {"method": "x"}}, "set by spec_metrics itself"),
        ({"labels": {"le": "x"}}, "set by spec_metrics itself"),
        ({"labels": {"__name": "x"}}, "reserved"),
        ({"labels": {"bad-name": "x"}}, "not a valid Prometheus label name"),
        ({"labels": {"model": 3}}, "values must be strings"),
        ({"trace_ratio": 1.5}, "trace_ratio"),
        ({"outlier_quantile": 1.0}, "outlier_quantile"),
        ({"slow_step_seconds": -1}, "slow_step_seconds"),
        ({"slow_stage_seconds": {"prefill": 1.0}}, "unknown stage 'prefill'"),
        ({"max_draft_tokens": 0}, "max_draft_tokens"),
        ({"method": ""}, "method"),
    ],
)
def test_bad_configuration_raises(options, message, registry):
    with pytest.raises(ValueError, match=message):
        spec_metrics.SpecDecodeHooks(registry=registry, **options)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(TypeError, match="trace_ratio"):
        spec_metrics.SpecDecodeHooks(trace_rato=0.1)


def test_environment_then_explicit_options():
    env = {"SPEC_METRICS_TRACE_RATIO": "0.25", "SPEC_METRICS_STRICT": "yes",
           "SPEC_METRICS_SLOW_STEP_SECONDS": "0.5", "SPEC_METRICS_ENABLED": "off"}
    config = HooksConfig.resolve(env)
    assert (config.trace_ratio, config.strict, config.slow_step_seconds, config.enabled) == (
        0.25, True, 0.5, False)
    assert HooksConfig.resolve(env, trace_ratio=0.5).trace_ratio == 0.5
    with pytest.raises(ValueError, match="SPEC_METRICS_STRICT='maybe'"):
        HooksConfig.resolve({"SPEC_METRICS_STRICT": "maybe"})
    with pytest.raises(ValueError, match="not a number"):
        HooksConfig.resolve({"SPEC_METRICS_TRACE_RATIO": "lots"})


def test_custom_buckets_reach_the_exposition(registry):
    hooks = spec_metrics.SpecDecodeHooks(registry=registry, stage_buckets=(0.01, 0.1),
                                         tracing=False)
    hooks.draft_start()
    hooks.draft_end()
    hooks.end_step()
    from prometheus_client.exposition import generate_latest

    lines = [line for line in generate_latest(registry).decode().splitlines()
             if line.startswith("spec_decode_stage_duration_seconds_bucket") and "draft\"" in line]
    assert [line.split('le="')[1].split('"')[0] for line in lines] == ["0.01", "0.1", "+Inf"]


def test_registering_twice_in_one_registry_is_refused(registry):
    spec_metrics.SpecDecodeHooks(registry=registry)
    with pytest.raises(ValueError, match="already holds spec_metrics. metrics"):
        spec_metrics.SpecDecodeHooks(registry=registry)
