"""`spec-metrics demo --otlp-metrics`: a real demo process pushes its metrics to a real
OTLP/HTTP receiver on loopback, on the interval and once more at the end, with exemplars
that point at spans in its traces file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.otlp import MetricsReceiver, free_port, stop_process


def test_demo_pushes_metrics_over_otlp(tmp_path, target):
    receiver = MetricsReceiver()
    traces = tmp_path / "traces.jsonl"
    command = [sys.executable, "-m", "spec_metrics", "demo", "--port", str(free_port()),
               "--device", "cpu", "--duration", "5", "--sample-ratio", "0.3", "--quiet",
               "--traces-file", str(traces), "--otlp-metrics", receiver.endpoint,
               "--otlp-metrics-interval", "1"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environ)
    try:
        _, stderr = process.communicate(timeout=180)
    finally:
        stop_process(process)
        receiver.close()
    assert process.returncode == 0, stderr
    assert len(receiver.requests) >= 2, stderr  # on the interval, and the last one at exit
    last = receiver.requests[-1]
    resource = {kv.key: kv.value.string_value
                for kv in last.resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "spec-metrics-demo"
    metrics = {m.name: m for m in last.resource_metrics[0].scope_metrics[0].metrics}
    assert sum(p.as_double for p in metrics["spec_decode_drafts"].sum.data_points) > 0
    assert {kv.key for p in metrics["spec_decode_drafts"].sum.data_points
            for kv in p.attributes} == {"method", "group", "model", "engine"}
    spans = set()
    for line in traces.read_text().splitlines():
        for resource_spans in json.loads(line)["resourceSpans"]:
            for scope in resource_spans["scopeSpans"]:
                spans |= {(s["traceId"], s["spanId"]) for s in scope["spans"]}
    exemplars = {(e.trace_id.hex(), e.span_id.hex()) for m in metrics.values()
                 for p in getattr(m, m.WhichOneof("data")).data_points for e in p.exemplars}
    assert exemplars and exemplars <= spans
