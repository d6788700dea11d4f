"""The plugin inside vLLM's OpenAI-compatible server (`python -m
vllm.entrypoints.openai.api_server`, on loopback): one environment variable, and the worker's
/metrics has stage latency and acceptance metrics equal to the server's own vllm:* counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="the real-vLLM tests run in .venv-vllm: scripts/setup.sh "
                    "builds it and the README's test command runs them there")

from engine_runs import VLLM_ENV, install_stat_logger_entry_point, prompts  # noqa: E402
from otlp import free_port, stop_process  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MAX_TOKENS = 32


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(values: dict[tuple, float], name: str, **match: str) -> float:
    return sum(v for (n, labels), v in values.items()
               if n == name and all(dict(labels).get(k) == w for k, w in match.items()))


@pytest.fixture(scope="module", params=["ngram", "draft_model", "eagle"])
def server(request, models, tmp_path_factory, receiver):
    method = request.param
    tmp = tmp_path_factory.mktemp(f"server-{method}")
    api_port, metrics_port = free_port(), free_port()
    spec_config = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":
        spec_config.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        spec_config["model"] = str(models / method)
    spec = json.dumps(spec_config)
    # The plugin, and the stat logger through vLLM's stat-logger entry point (which the
    # server's AsyncLLM loads).
    site = install_stat_logger_entry_point(tmp / "site")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **VLLM_ENV, "SPEC_METRICS_VLLM": "1",
           "SPEC_METRICS_PORT": str(metrics_port), "PYTHONPATH": path,
           "SPEC_METRICS_TRACE_RATIO": "1", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url}
    log = open(tmp / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(models / "target"), "--served-model-name", "tiny-llama",
         "--host", "127.0.0.1", "--port", str(api_port), "--speculative-config", spec,
         "--enforce-eager", "--max-model-len", "256", "--dtype", "float32", "--seed", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            get(base + "/health", timeout=2)
            break
        except (urllib.error.URLError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                log.close()
                raise AssertionError("vLLM server did not start:\n"
                                     + (tmp / "server.log").read_text()[-5000:]) from None
            time.sleep(1)
    try:
        yield base, metrics_port, method
    finally:
        stop_process(process)
        log.close()


def complete(base: str, prompt: str) -> dict:
    body = json.dumps({"model": "tiny-llama", "prompt": prompt, "max_tokens": MAX_TOKENS,
                       "temperature": 0, "ignore_eos": True}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_server_worker_metrics_equal_the_servers_counters(server, receiver):
    base, metrics_port, method = server
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: complete(base, p), prompts()))
    assert [a["usage"]["completion_tokens"] for a in answers] == [MAX_TOKENS] * 4
    theirs = samples(get(base + "/metrics"))
    ours = samples(get(f"http://127.0.0.1:{metrics_port}/metrics"))
    labels = {"method": method, "engine": "vllm", "model": "tiny-llama"}
    drafts = total(theirs, "vllm:spec_decode_num_drafts_total")
    assert drafts > 0
    assert total(ours, "spec_decode_drafts_total", **labels) == drafts
    assert total(ours, "spec_decode_draft_tokens_total", **labels) == \
        total(theirs, "vllm:spec_decode_num_draft_tokens_total")
    assert total(ours, "spec_decode_accepted_tokens_total", **labels) == \
        total(theirs, "vllm:spec_decode_num_accepted_tokens_total")
    for position in range(3):
        assert total(ours, "spec_decode_accepted_tokens_per_position_total",
                     position=str(position), **labels) == \
            total(theirs, "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                  position=str(position))
    # Stage latency from inside the worker: one verify per iteration that verified drafts
    # (at most one per draft), one draft per step; durations within their steps.
    verify = total(ours, "spec_decode_stage_duration_seconds_count", stage="verify", **labels)
    draft = total(ours, "spec_decode_stage_duration_seconds_count", stage="draft", **labels)
    steps = total(ours, "spec_decode_step_duration_seconds_count", **labels)
    assert 0 < verify <= drafts and draft == steps > verify
    stage_sum = sum(total(ours, "spec_decode_stage_duration_seconds_sum", stage=s, **labels)
                    for s in ("verify", "draft"))
    assert 0 < stage_sum <= total(ours, "spec_decode_step_duration_seconds_sum", **labels)
    assert total(ours, "spec_metrics_dropped_total") == 0
    # Every exemplar on the worker's /metrics names a span the receiver got.
    exemplars = worker_exemplars(metrics_port)
    assert exemplars
    assert receiver.wait_for_spans(exemplars), sorted(exemplars - receiver.span_keys())


def worker_exemplars(port: int, seconds: float = 30.0) -> set[tuple[str, str]]:
    """(trace_id, span_id) of the exemplars on the worker's /metrics, once every traced
    step's spans were exported or lost (exemplars wait for their spans' export)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse

    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + seconds
    last = None
    while True:
        request = urllib.request.Request(url, headers={
            "Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        done = sum(s.value for f in parse(text) for s in f.samples
                   if s.name in ("spec_metrics_spans_exported_total",
                                 "spec_metrics_spans_dropped_total"))
        if (done and done == last) or time.monotonic() > deadline:
            break
        last = done
        time.sleep(1.0)
    return {(s.exemplar.labels["trace_id"], s.exemplar.labels["span_id"])
            for f in parse(text) for s in f.samples if s.exemplar is not None}


def test_server_stat_logger_entry_point_counts_equal_the_servers(server):
    """The stat logger, loaded by the server from the vllm.stat_logger_plugins entry
    point, on the server's own /metrics: equal to vLLM's counters (the first test made
    the traffic)."""
    base, _, method = server
    theirs = samples(get(base + "/metrics"))
    labels = {"method": method, "engine": "vllm", "model": "tiny-llama"}
    drafts = total(theirs, "vllm:spec_decode_num_drafts_total")
    assert drafts > 0
    assert total(theirs, "spec_decode_drafts_total", **labels) == drafts
    assert total(theirs, "spec_decode_accepted_tokens_total", **labels) == \
        total(theirs, "vllm:spec_decode_num_accepted_tokens_total")
    assert total(theirs, "spec_decode_draft_tokens_total", **labels) == \
        total(theirs, "vllm:spec_decode_num_draft_tokens_total")
    for position in range(3):
        assert total(theirs, "spec_decode_accepted_tokens_per_position_total",
                     position=str(position), **labels) == \
            total(theirs, "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                  position=str(position))
    assert total(theirs, "spec_metrics_dropped_total") == 0
