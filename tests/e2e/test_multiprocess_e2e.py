"""End to end: several worker processes, one Prometheus, one OTLP receiver.

Four real processes (RANK/LOCAL_RANK/WORLD_SIZE set as torchrun does) each run their own hooks
over a different seeded workload and serve /metrics on base_port + local rank. A real
Prometheus scrapes them through the job `scrape_config()` generates; every counter summed in
PromQL must equal exactly the sum of what the workers say they recorded, per rank too, with
the rank label on every series and exemplars stored from every rank. All workers export spans
over OTLP/HTTP to one oteltap receiver, which re-emits the raw requests to a sink here so that
the resource (rank) of every span can be checked too.

Run one worker by hand: RANK=0 python -m tests.e2e.test_multiprocess_e2e --base-port 9464 ...
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from spec_metrics.multiprocess import scrape_config
from tests.otlp import OtlpReceiver, stop_process

pytestmark = pytest.mark.e2e

WORKERS = 4
K = 4
SPANS_PER_STEP = 4  # spec_decode.step + draft, verify, draft_extend
REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 120.0


def steps_of(rank: int) -> int:
    return 30 + 7 * rank  # a different workload size per rank


# ---- the worker (a subprocess) ----------------------------------------------------------

def worker_main(argv: list[str]) -> None:
    import numpy as np
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider

    import spec_metrics
    from spec_metrics import multiprocess

    parser = argparse.ArgumentParser()
    parser.add_argument("--base-port", type=int, required=True)
    parser.add_argument("--otlp", required=True, help="OTLP/HTTP traces URL")
    parser.add_argument("--out", required=True, help="directory for rank-N.json")
    args = parser.parse_args(argv)

    info = multiprocess.rank_from_env()
    provider = TracerProvider(resource=multiprocess.rank_resource(info))
    provider.add_span_processor(spec_metrics.SpanExportProcessor(
        OTLPSpanExporter(endpoint=args.otlp), schedule_delay_millis=200))
    trace_ids: list[str | None] = []
    hooks = spec_metrics.SpecDecodeHooks(
        "draft_model", labels=multiprocess.rank_labels({"model": "tiny", "engine": "mp"}, info),
        tracer_provider=provider, trace_ratio=1.0, outlier_quantile=None, strict=True,
        max_draft_tokens=K, max_traced_steps_per_second=1000.0,
        on_step=lambda result: trace_ids.append(result.trace_id))
    server = multiprocess.start_rank_http_server(info, base_port=args.base_port)

    rng = np.random.default_rng(1000 + info.rank)
    totals: Counter[str] = Counter()
    for _ in range(steps_of(info.rank)):
        batch = int(rng.integers(1, 9))
        drafts = rng.integers(0, K + 1, size=batch)  # an n-gram drafter may propose nothing
        accepted = np.minimum(rng.geometric(0.4, size=batch) - 1, drafts)
        hooks.begin_step(batch_size=batch)
        hooks.draft_start()
        hooks.draft_end()
        hooks.verify_start()
        hooks.verify_end(accepted, drafts)
        hooks.draft_extend_start()
        hooks.draft_extend_end()
        hooks.end_step()
        # What this worker recorded, counted here independently of the library.
        totals["steps"] += 1
        totals["requests"] += batch
        totals["drafts"] += int((drafts > 0).sum())
        totals["draft_tokens"] += int(drafts.sum())
        totals["accepted"] += int(accepted.sum())
        for p in range(K):
            totals[f"draft_pos_{p}"] += int((drafts > p).sum())
            totals[f"accepted_pos_{p}"] += int((accepted > p).sum())
    hooks.flush()  # also flushes the provider: every span has been exported
    report = {"rank": info.rank, "port": server.port, "totals": dict(totals),
              "trace_ids": trace_ids}
    out = Path(args.out)
    (out / f"rank-{info.rank}.tmp").write_text(json.dumps(report))
    (out / f"rank-{info.rank}.tmp").rename(out / f"rank-{info.rank}.json")
    sys.stdin.read()  # serve /metrics until the test closes our stdin
    server.close()
    provider.shutdown()


# ---- the test side ----------------------------------------------------------------------

def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def consecutive_free_ports(count: int) -> int:
    """A base port whose `count` ports from it are free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count <= 65535 and all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free loopback ports found")


class _Sink(BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class SpanTap(OtlpReceiver):
    """The OTLP receiver, also re-emitting each export request as-is to a sink here, where
    the resources (which oteltap's span stream drops) are kept."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        handler = type("Sink", (_Sink,), {"bodies": self.bodies})
        self._sink = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._sink.serve_forever, daemon=True).start()
        super().__init__(consecutive_free_ports(1),
                         reemit_to=f"http://127.0.0.1:{self._sink.server_port}/v1/traces")

    def resource_spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        return [rs for body in list(self.bodies)
                for rs in ExportTraceServiceRequest.FromString(body).resource_spans]

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._sink.shutdown()
            self._sink.server_close()


def wait_for(condition: Callable[[], Any], what: str, diagnostics: Callable[[], str],
             timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{diagnostics()}")
        time.sleep(0.25)


def _by_rank(result: dict[str, Any], *extra: str) -> dict[tuple[str, ...], float]:
    return {(s["metric"]["rank"], *(s["metric"][e] for e in extra)): float(s["value"][1])
            for s in result["result"]}


def _scalar(result: dict[str, Any]) -> float:
    (sample,) = result["result"]
    return float(sample["value"][1])


def _attributes(resource: Any) -> dict[str, Any]:
    out = {}
    for kv in resource.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out


def test_workers_scraped_summed_and_traced(tmp_path, prometheus):
    # The workers export spans with it; it is not in the dev extra (the demo extra has it).
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http",
                        reason="the workers need opentelemetry-exporter-otlp-proto-http")
    base_port = consecutive_free_ports(WORKERS)
    tap = SpanTap()
    workers: list[subprocess.Popen] = []
    logs = [tmp_path / f"worker-{rank}.log" for rank in range(WORKERS)]
    try:
        for rank in range(WORKERS):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(WORKERS), "PYTHONUNBUFFERED": "1"}
            env.pop("OTEL_RESOURCE_ATTRIBUTES", None)
            env.pop("OTEL_SERVICE_NAME", None)
            with open(logs[rank], "w") as log:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "tests.e2e.test_multiprocess_e2e",
                     "--base-port", str(base_port), "--otlp", tap.url, "--out", str(tmp_path)],
                    cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=log,
                    stderr=subprocess.STDOUT))
        job = scrape_config(WORKERS, base_port)
        prom = prometheus([], scrape_configs=[job], scrape_interval="1s")

        def diagnostics() -> str:
            parts = [f"--- worker {r} (rc={w.poll()}) ---\n{logs[r].read_text()[-3000:]}"
                     for r, w in enumerate(workers)]
            return "\n".join(parts) + f"\n--- prometheus ---\n{prom.log.text(last=20)}"

        def reports() -> list[dict[str, Any]] | None:
            for w in workers:
                if w.poll() is not None:
                    pytest.fail(f"a worker exited early\n{diagnostics()}")
            paths = [tmp_path / f"rank-{r}.json" for r in range(WORKERS)]
            return [json.loads(p.read_text()) for p in paths] if all(
                p.exists() for p in paths) else None

        done = wait_for(reports, "every worker's totals", diagnostics)
        done_at = time.time()
        assert [(d["rank"], d["port"]) for d in done] == [
            (r, base_port + r) for r in range(WORKERS)]
        totals = [Counter(d["totals"]) for d in done]
        assert [t["steps"] for t in totals] == [steps_of(r) for r in range(WORKERS)]
        trace_ids = [d["trace_ids"] for d in done]
        assert [len(ids) for ids in trace_ids] == [steps_of(r) for r in range(WORKERS)]
        assert all(tid for ids in trace_ids for tid in ids)  # every step was traced
        rank_of_trace = {tid: r for r, ids in enumerate(trace_ids) for tid in ids}
        assert len(rank_of_trace) == sum(map(len, trace_ids))  # trace ids are unique

        # Wait until every target was scraped after the workers finished recording.
        def scraped_after_done() -> bool:
            result = prom.query('timestamp(up{job="spec_metrics"} == 1)')["result"]
            return len(result) == WORKERS and min(float(s["value"][1])
                                                  for s in result) > done_at

        wait_for(scraped_after_done, "a scrape of every rank after its work", diagnostics)

        # Every target carries its rank; the process's own rank label was not renamed.
        up = prom.query('up{job="spec_metrics"}')["result"]
        assert sorted((s["metric"]["rank"], s["metric"]["instance"]) for s in up) == sorted(
            (str(r), f"127.0.0.1:{base_port + r}") for r in range(WORKERS))
        assert prom.query('{exported_rank!=""}')["result"] == []
        for s in prom.query('spec_decode_accepted_tokens_total')["result"]:
            assert s["metric"]["instance"] == f"127.0.0.1:{base_port + int(s['metric']['rank'])}"

        counters = {"drafts": "spec_decode_drafts_total",
                    "draft_tokens": "spec_decode_draft_tokens_total",
                    "accepted": "spec_decode_accepted_tokens_total",
                    "steps": "spec_decode_step_duration_seconds_count"}
        for key, metric in counters.items():
            assert _scalar(prom.query(f"sum({metric})")) == sum(t[key] for t in totals), metric
            assert _by_rank(prom.query(f"sum by (rank) ({metric})")) == {
                (str(r),): float(t[key]) for r, t in enumerate(totals)}, metric
        assert _scalar(prom.query("sum(spec_decode_emitted_tokens_total)")) == sum(
            t["accepted"] + t["requests"] for t in totals)
        assert _scalar(prom.query("sum(spec_decode_accepted_length_count)")) == sum(
            t["drafts"] for t in totals)
        assert _scalar(prom.query("sum(spec_decode_accepted_length_sum)")) == sum(
            t["accepted"] for t in totals)
        assert _by_rank(prom.query(
            "sum by (rank, stage) (spec_decode_stage_duration_seconds_count)"), "stage") == {
            (str(r), stage): float(steps_of(r)) for r in range(WORKERS)
            for stage in ("draft", "verify", "draft_extend")}
        for kind, metric in (("draft", "spec_decode_draft_tokens_per_position_total"),
                             ("accepted", "spec_decode_accepted_tokens_per_position_total")):
            by_position = {s["metric"]["position"]: float(s["value"][1])
                           for s in prom.query(f"sum by (position) ({metric})")["result"]}
            assert by_position == {str(p): float(sum(t[f"{kind}_pos_{p}"] for t in totals))
                                   for p in range(K)}, metric
        assert prom.query('sum(spec_metrics_dropped_total) > 0')["result"] == []
        # The constant labels survive alongside rank.
        assert {(s["metric"]["model"], s["metric"]["engine"], s["metric"]["method"])
                for s in prom.query("spec_decode_drafts_total")["result"]} == {
            ("tiny", "mp", "draft_model")}

        # Exemplars from every rank, each pointing at a trace that rank exported.
        start, end = done_at - 600, time.time() + 5
        exemplar_ranks: dict[str, set[str]] = {}
        exemplar_spans = []
        for metric in ("spec_decode_accepted_tokens_total",
                       "spec_decode_stage_duration_seconds_bucket"):
            for series in prom.exemplars(metric, start, end):
                rank = series["seriesLabels"]["rank"]
                for exemplar in series["exemplars"]:
                    tid = exemplar["labels"]["trace_id"]
                    assert rank_of_trace[tid] == int(rank), (metric, series)
                    exemplar_ranks.setdefault(metric, set()).add(rank)
                    exemplar_spans.append((tid, exemplar["labels"]["span_id"]))
        assert exemplar_ranks == {m: {str(r) for r in range(WORKERS)} for m in (
            "spec_decode_accepted_tokens_total", "spec_decode_stage_duration_seconds_bucket")}

        # Spans: all ranks' spans reached the one receiver, exactly, with their rank resource.
        expected = SPANS_PER_STEP * sum(steps_of(r) for r in range(WORKERS))
        wait_for(lambda: len(tap.spans) >= expected and sum(
            len(ss.spans) for rs in tap.resource_spans() for ss in rs.scope_spans) >= expected,
            f"{expected} spans at the receiver", diagnostics, timeout=60)
        received = Counter((rank_of_trace[s.trace_id.hex()], s.name) for s in tap.spans)
        assert received == Counter({(r, name): steps_of(r) for r in range(WORKERS) for name in (
            "spec_decode.step", "spec_decode.draft", "spec_decode.verify",
            "spec_decode.draft_extend")})
        span_keys = {(s.trace_id.hex(), s.span_id.hex()) for s in tap.spans}
        assert set(exemplar_spans) <= span_keys
        host = socket.gethostname()
        per_resource_rank: Counter[int] = Counter()
        for rs in tap.resource_spans():
            attributes = _attributes(rs.resource)
            rank = attributes["spec_metrics.rank"]
            assert attributes["service.instance.id"] == f"{host}-rank-{rank}"
            for ss in rs.scope_spans:
                for span in ss.spans:
                    assert rank_of_trace[span.trace_id.hex()] == rank
                    per_resource_rank[rank] += 1
        assert per_resource_rank == Counter(
            {r: SPANS_PER_STEP * steps_of(r) for r in range(WORKERS)})
    finally:
        for w in workers:
            if w.stdin is not None and not w.stdin.closed:
                try:
                    w.stdin.close()  # the worker shuts down by itself
                except OSError:
                    pass
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                stop_process(w)
        tap.close()


if __name__ == "__main__":
    worker_main(sys.argv[1:])
