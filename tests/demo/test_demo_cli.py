"""`spec-metrics demo` end to end, as a user runs it: a real process, /metrics scraped over
HTTP while it runs, spans in an OTLP JSON-lines file, exit code 0, a summary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.openmetrics.parser import text_string_to_metric_families

ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int, Path]:
    port = _free_port()
    traces = tmp_path / "traces.jsonl"
    command = [sys.executable, "-m", "spec_metrics", "demo", "--port", str(port), "--device",
               "cpu", "--traces-file", str(traces), "--quiet", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, port, traces


def _scrape(port: int) -> dict | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {f.name: f for f in text_string_to_metric_families(text)}


def _total(families: dict, family: str) -> float:
    return sum(s.value for s in families[family].samples if s.name == family + "_total")


def _spans(traces: Path) -> dict[tuple[str, str], dict]:
    spans = {}
    for line in traces.read_text().splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    spans[(span["traceId"], span["spanId"])] = span
    return spans


def test_demo_end_to_end_collapse_spikes_exemplars(tmp_path, target):
    # target fixture: the model is trained and cached before the clock starts.
    process, port, traces = _start(tmp_path, "--duration", "16", "--collapse-at", "8",
                                   "--spike-every", "1.5", "--spike-ms", "300")
    scrapes: list[tuple[float, dict]] = []
    try:
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            families = _scrape(port)
            if families is not None and "spec_decode_draft_tokens" in families \
                    and _total(families, "spec_decode_draft_tokens") > 0:
                scrapes.append((time.monotonic(), families))
            time.sleep(0.4)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert len(scrapes) >= 10, stderr

    # Acceptance: high early, low after the collapse. The loop started no later than the
    # first scrape with drafts, so the collapse came at most 8 s after it.
    first_at = scrapes[0][0]
    early = [f for t, f in scrapes if t <= first_at + 3]
    late = [f for t, f in scrapes if t >= first_at + 9]
    assert early and len(late) >= 2

    def rate(a: dict, b: dict | None = None) -> float:
        accepted = _total(a, "spec_decode_accepted_tokens")
        drafted = _total(a, "spec_decode_draft_tokens")
        if b is not None:
            accepted -= _total(b, "spec_decode_accepted_tokens")
            drafted -= _total(b, "spec_decode_draft_tokens")
        return accepted / drafted

    assert rate(early[-1]) > 0.5
    assert rate(late[-1], late[0]) < 0.2

    # Spikes: 300 ms verify stages are outliers, traced, and their exemplars sit on the
    # high buckets and point at spans that are in the traces file.
    spans = _spans(traces)
    high = []
    for _, families in scrapes:
        for sample in families["spec_decode_stage_duration_seconds"].samples:
            if sample.exemplar is not None:
                key = (sample.exemplar.labels["trace_id"], sample.exemplar.labels["span_id"])
                assert key in spans, key
                if sample.labels["stage"] == "verify" and sample.exemplar.value >= 0.25:
                    assert sample.labels["le"] == "0.5"
                    assert spans[key]["name"] == "spec_decode.verify"
                    high.append(key)
    assert len(set(high)) >= 2
    # The spikes are traced as slow (above --slow-ms) or as outliers (above the running
    # p99.9), whichever fires; how many ordinary steps count as outliers depends on the
    # machine's load (tests/test_traceparent_outliers.py checks the quantile exactly).
    outliers = [s for s in spans.values() if s["name"] == "spec_decode.step" and any(
        a["key"] == "spec_decode.sample_reason" and a["value"]["stringValue"] in ("outlier",
                                                                                "slow")
        for a in s["attributes"])]
    assert len(outliers) >= 2

    # The summary names the slowest steps by trace id; the spikes are among them.
    assert "acceptance by position" in stdout and "verify latency" in stdout
    slow_ids = [line.split("trace_id ")[1] for line in stdout.splitlines() if "trace_id" in line]
    assert slow_ids and all(any(t == trace for t, _ in spans) for trace in slow_ids)


def test_demo_ctrl_c_prints_summary_and_flushes_spans(tmp_path, target):
    process, port, traces = _start(tmp_path, "--duration", "300", "--sample-ratio", "1")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            families = _scrape(port)
            if families and _total(families, "spec_decode_draft_tokens") > 0:
                break
            time.sleep(0.3)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "spec-metrics demo summary" in stdout
    def figure(label: str) -> int:
        return int(stdout.split("\n" + label)[1].split()[0])

    steps, traced, not_traced = figure("steps "), figure("steps traced "), figure(
        "steps not traced ")
    step_spans = [s for s in _spans(traces).values() if s["name"] == "spec_decode.step"]
    # Ratio 1: every step was selected for tracing. Each one is either in the traces file
    # or counted as not traced (the per-second cap); no span was lost on the way.
    assert steps > 0 and len(step_spans) == traced
    assert len(step_spans) + not_traced == steps
    assert "spans exported        " in stdout and "(lost 0: none)" in stdout


def test_demo_dynamic_k_runs_plain_decode_steps_when_the_batch_is_full(tmp_path, target):
    # Arrivals far above what the engine serves keep the batch full: K falls to 0.
    process, port, traces = _start(tmp_path, "--duration", "3", "--dynamic-k",
                                   "--arrival-rate", "2000", "--batch-size", "4")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    line = [x for x in stdout.splitlines() if x.startswith("draft tokens/request")][0]
    per_request = float(line.split()[2])
    plain = int(line.split("steps without drafts: ")[1].rstrip(")"))
    steps = int(stdout.split("\nsteps ")[1].split()[0])
    assert 0 < plain <= steps and per_request < 4


def test_demo_rejects_bad_flags():
    result = subprocess.run([sys.executable, "-m", "spec_metrics", "demo", "--duration", "0",
                             "--sample-ratio", "2"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "--duration must be > 0" in result.stderr and "--sample-ratio" in result.stderr


def test_demo_recover_needs_an_earlier_collapse():
    for flags in (["--recover-at", "5"], ["--collapse-at", "5", "--recover-at", "5"]):
        result = subprocess.run([sys.executable, "-m", "spec_metrics", "demo", *flags],
                                capture_output=True, text=True)
        assert result.returncode != 0
        assert "--recover-at needs a --collapse-at before it" in result.stderr


def test_demo_help_lists_every_flag():
    result = subprocess.run([sys.executable, "-m", "spec_metrics", "demo", "--help"],
                            capture_output=True, text=True, check=True)
    for option in ["--duration", "--host", "--port", "--method", "--batch-size",
                   "--draft-tokens", "--device", "--temperature", "--seed", "--sample-ratio",
                   "--traces-file", "--otlp-endpoint", "--collapse-at", "--recover-at",
                   "--spike-every", "--dynamic-k"]:
        assert option in result.stdout


def test_demo_sends_spans_to_an_otlp_endpoint(target):
    # A real OTLP/HTTP receiver on loopback (oteltap), the way a Collector would take them.
    import asyncio

    from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

    port = _free_port()

    async def scenario() -> tuple[int, str, list]:
        settings = OtelTapHttpProtobufReceiverSettings(http_port=port)
        async with OtelTapHttpProtobufReceiver(settings) as receiver:
            waiting = asyncio.ensure_future(receiver.await_trace(
                lambda span: span.name == "spec_decode.verify", timeout=60))
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "spec_metrics", "demo", "--port", str(_free_port()),
                "--device", "cpu", "--quiet", "--duration", "3", "--sample-ratio", "1",
                "--otlp-endpoint", f"http://127.0.0.1:{port}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, stderr = await process.communicate()
            span = await waiting
            return process.returncode, stderr.decode(), [span]

    returncode, stderr, spans = asyncio.run(scenario())
    assert returncode == 0, stderr
    verify = spans[0]
    attributes = {a.key: a.value for a in verify.attributes}
    assert attributes["spec_decode.method"].string_value == "draft_model"
    assert attributes["spec_decode.draft_tokens"].int_value > 0
    assert len(verify.trace_id) == 16 and len(verify.parent_span_id) == 8
