"""Runs a real vLLM `LLMEngine` (offline, CPU) once and writes what the tests compare as JSON.

Run as a script (vLLM spawns its engine-core and worker processes, which re-import the main
module): `python engine_driver.py SETTINGS.json OUT.json`. Settings: method, models dir,
metrics port (SPEC_METRICS_PORT, set by the caller in the environment), prompts, max_tokens,
how many times to pass `SpecMetricsStatLogger` in `stat_loggers`.

Written out: generated token ids per request; how many requests got tokens in iterations
that verified drafts; vLLM's own truth, per request
(`per_request_spec_decode_metrics="detailed"`: drafted and accepted per verify step) and its
`vllm:spec_decode_*` counters (`get_metrics_snapshot`); per engine iteration, the
SpecDecodingStats vLLM's scheduler handed to stat loggers; the worker's /metrics scraped
while the engine is up (text and OpenMetrics) or the error connecting to it; this process's
default registry (where the stat logger's series are); wall time.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def scrape(port: int, accept: str | None = None) -> str:
    headers = {"Accept": accept} if accept else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def sample_value(text: str, name: str) -> float:
    """Sum of a sample's values over its label sets in a text exposition (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split("#")[0].split()[-1])
    return total


def wait_for_spans(port: int, deadline_s: float = 30.0) -> None:
    """Until every traced step's spans were exported or lost: the exporter works on its own
    thread, and exemplars appear only once their spans were exported."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        text = scrape(port)
        done = (sample_value(text, "spec_metrics_spans_exported_total")
                + sample_value(text, "spec_metrics_spans_dropped_total"))
        if done and done == last:
            return
        last = done
        time.sleep(1.0)


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.reader import Counter, Vector, get_metrics_snapshot

    iterations: list[Any] = []

    class IterationLog(StatLoggerBase):  # vLLM's own per-iteration stats, as handed out
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0, **_: Any) -> None:
            if scheduler_stats is None:
                return
            stats = scheduler_stats.spec_decoding_stats
            iterations.append(None if stats is None else {
                "drafts": stats.num_drafts, "draft_tokens": stats.num_draft_tokens,
                "accepted": stats.num_accepted_tokens,
                "accepted_per_pos": list(stats.num_accepted_tokens_per_pos),
                "draft_tokens_per_pos": list(stats.num_draft_tokens_per_pos)})

        def log_engine_initialized(self) -> None:
            pass

    spec: dict[str, Any] = {"method": settings["method"], "num_speculative_tokens": 3}
    models = Path(settings["models"])
    if settings["method"] == "ngram":
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        spec["model"] = str(models / settings["method"])
    args = EngineArgs(model=str(models / "target"), speculative_config=spec,
                      enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0,
                      dtype="float32", disable_log_stats=False,
                      per_request_spec_decode_metrics="detailed")
    loggers: list[Any] = [IterationLog]
    if settings.get("stat_loggers"):
        from spec_metrics.integrations.vllm import SpecMetricsStatLogger

        loggers += [SpecMetricsStatLogger] * settings["stat_loggers"]
    started = time.monotonic()
    engine = LLMEngine.from_engine_args(args, stat_loggers=loggers)
    result: dict[str, Any] = {"start_s": time.monotonic() - started}
    params = SamplingParams(max_tokens=settings["max_tokens"], temperature=0.0,
                            ignore_eos=True)
    # The engine core starts on the first request: the clock starts before it.
    began = time.monotonic()
    for index, prompt in enumerate(settings["prompts"]):
        engine.add_request(f"r{index}", prompt, params)
    finished: dict[str, Any] = {}
    engine_steps = 0
    verified_rows = 0  # requests that got tokens in iterations that verified drafts
    while engine.has_unfinished_requests():
        seen = len(iterations)
        outputs = engine.step()
        if any(stats is not None for stats in iterations[seen:]):
            verified_rows += len(outputs)
        for output in outputs:
            if output.finished:
                finished[output.request_id] = output
        engine_steps += 1
    result["generate_s"] = time.monotonic() - began
    result["engine_steps"] = engine_steps
    result["verified_rows"] = verified_rows
    result["iterations"] = iterations
    result["tokens"] = {rid: list(out.outputs[0].token_ids) for rid, out in finished.items()}
    truth = {}
    for rid, out in finished.items():
        metrics = out.outputs[0].spec_decode_metrics
        truth[rid] = {"drafted": list(metrics.per_step_drafted),
                      "accepted": list(metrics.per_step_accepted)}
    result["per_request"] = truth
    counters: dict[str, Any] = {}
    for metric in get_metrics_snapshot():
        if metric.name.startswith("vllm:spec_decode"):
            if isinstance(metric, Counter):
                counters[metric.name] = counters.get(metric.name, 0) + metric.value
            elif isinstance(metric, Vector):
                counters[metric.name] = list(metric.values)
    result["vllm_counters"] = counters
    from prometheus_client import REGISTRY
    from prometheus_client.exposition import generate_latest

    # The stat logger's series live in this (the front-end) process's default registry.
    result["frontend_metrics"] = generate_latest(REGISTRY).decode()
    port = settings["port"]
    try:
        if settings.get("wait_for_spans"):
            wait_for_spans(port)
        result["metrics_text"] = scrape(port)
        result["metrics_openmetrics"] = scrape(port, OPENMETRICS)
    except (urllib.error.URLError, OSError) as exc:
        result["metrics_error"] = repr(exc)
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
