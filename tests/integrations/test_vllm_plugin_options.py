"""The vLLM plugin's choice of consumer: inline on a CPU worker, the worker thread on a GPU,
and whatever SPEC_METRICS_CONSUMER says when it is set (vLLM itself is not needed)."""

from __future__ import annotations

from spec_metrics.integrations.vllm_plugin import consumer_option


def test_cpu_workers_consume_inline_and_gpu_workers_use_the_worker_thread() -> None:
    assert consumer_option("cpu", {}) == {"consumer": "inline"}
    assert consumer_option("cuda", {}) == {}  # the default: the worker thread


def test_the_environment_decides_when_set() -> None:
    assert consumer_option("cpu", {"SPEC_METRICS_CONSUMER": "worker"}) == {}
    assert consumer_option("cuda", {"SPEC_METRICS_CONSUMER": "inline"}) == {}
