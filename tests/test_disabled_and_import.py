"""The disabled path does nothing, and `import spec_metrics` stays light."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.exposition import generate_latest

import spec_metrics

from .conftest import run_step


def test_disabled_records_nothing_and_registers_nothing(registry, provider, exporter):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         enabled=False, trace_ratio=1.0)
    assert not hooks.enabled
    for _ in range(3):
        run_step(hooks, None, "not even an array", -5)  # bad input is not even looked at
        hooks.draft_end()
        with hooks.step():
            with hooks.verify() as verify:
                verify.set_accepted([1], 1)
    assert generate_latest(registry) == b""
    assert exporter.get_finished_spans() == ()


def test_metrics_and_tracing_both_off_is_disabled(registry):
    hooks = spec_metrics.SpecDecodeHooks(registry=registry, metrics=False, tracing=False)
    assert not hooks.enabled


def test_tracing_only(registry, provider, exporter):
    hooks = spec_metrics.SpecDecodeHooks(registry=registry, tracer_provider=provider,
                                         metrics=False, trace_ratio=1.0)
    run_step(hooks, None, [1], 1)
    assert generate_latest(registry) == b""
    assert len(exporter.get_finished_spans()) == 4


def test_metrics_only(registry, provider, exporter):
    hooks = spec_metrics.SpecDecodeHooks(registry=registry, tracer_provider=provider,
                                         tracing=False, trace_ratio=1.0)
    run_step(hooks, None, [1], 1)
    assert b"spec_decode_accepted_tokens_total" in generate_latest(registry)
    assert exporter.get_finished_spans() == ()


def test_import_does_not_load_torch():
    code = "import sys, spec_metrics; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_close_unregisters(registry):
    hooks = spec_metrics.SpecDecodeHooks(registry=registry, tracing=False)
    hooks.close()
    assert generate_latest(registry) == b""
    hooks.draft_start()  # closed hooks are inert
