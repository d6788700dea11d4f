"""Hooks on several threads at full rate while several threads scrape /metrics over HTTP.

Every scrape (OpenMetrics and classic text, parsed by prometheus_client's own parsers) must
parse, show cumulative buckets with +Inf == _count, never show a step half-recorded, and never
go backwards from the previous scrape of the same scraper; after the threads stop, the totals
must equal exactly what the threads recorded. Everything stops by itself: bounded loops and
joins with timeouts.
"""

from __future__ import annotations

import sys
import threading
import urllib.request
from collections import Counter
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

import spec_metrics
from spec_metrics.catalog import STAGES

K = 4
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
MAX_STEPS = 60_000  # per hook thread: bounds the test's time however slow the scrapers are
JOIN_TIMEOUT = 120.0
# Each hook thread pauses after BEFORE_FIRST_SCRAPE steps until the first scrape has been read,
# and honours `stop` only after MIN_STEPS: the first scrape sees at most the first part, the
# final one all of it, however slowly the machine schedules the scrapers.
BEFORE_FIRST_SCRAPE = 100
MIN_STEPS = 300


def workload(i: int) -> tuple[list, int]:
    """Step i of every hook thread: deterministic, so the totals can be recomputed."""
    batch = 1 + i % 4
    accepted: list = [(7 * i + j) % (K + 1) for j in range(batch)]
    if i % 97 == 96:
        accepted[0] = float("nan")  # dropped as non_finite; the stage times still count
    return accepted, K


def expected_totals(threads: list[tuple[str, int]]) -> dict:
    """Per method, from (method, steps done) of each thread: every thread ran workload(0..)."""
    out: dict = {}
    for method in {m for m, _ in threads}:
        accepted: Counter = Counter()
        requests = dropped = steps = 0
        for thread_steps in (n for m, n in threads if m == method):
            steps += thread_steps
            for index in range(thread_steps):
                values, _ = workload(index)
                if isinstance(values[0], float):
                    dropped += 1
                    continue
                accepted.update(values)
                requests += len(values)
        a = np.repeat(list(accepted), list(accepted.values())).astype(np.int64)
        out[method] = {
            "steps": steps, "dropped": dropped, "drafts": requests, "draft_tokens": K * requests,
            "accepted": int(a.sum()), "emitted": int(a.sum()) + requests,
            "accepted_le": [int((a <= le).sum()) for le in range(K + 1)],
            "accepted_per_position": [int((a > p).sum()) for p in range(K)],
        }
    return out


class HookThread(threading.Thread):
    def __init__(self, hooks: spec_metrics.SpecDecodeHooks, stop: threading.Event,
                 first_scrape: threading.Event, scopes: bool, errors: list) -> None:
        super().__init__(daemon=True)
        self.hooks, self.stop, self.scopes, self.errors = hooks, stop, scopes, errors
        self.first_scrape = first_scrape
        self.steps = 0

    def run(self) -> None:
        hooks = self.hooks
        try:
            while self.steps < MAX_STEPS and not (self.stop.is_set()
                                                  and self.steps >= MIN_STEPS):
                if self.steps == BEFORE_FIRST_SCRAPE and not self.first_scrape.wait(JOIN_TIMEOUT):
                    raise AssertionError("the first scrape never came")
                accepted, k = workload(self.steps)
                if self.scopes:
                    with hooks.step(batch_size=len(accepted)):
                        with hooks.draft():
                            pass
                        with hooks.verify() as verify:
                            verify.set_accepted(accepted, k)
                        with hooks.draft_extend():
                            pass
                else:
                    hooks.begin_step(request_ids=list(range(len(accepted))))
                    hooks.draft_start()
                    hooks.draft_end()
                    hooks.verify_start()
                    hooks.verify_end(accepted, k)
                    hooks.draft_extend_start()
                    hooks.draft_extend_end()
                    hooks.end_step()
                self.steps += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def scrape(url: str, openmetrics: bool) -> dict:
    """One real HTTP scrape, parsed: {(sample name, frozenset(labels)): value}, exemplars."""
    headers = {"Accept": OPENMETRICS} if openmetrics else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=JOIN_TIMEOUT) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    assert content_type.startswith(
        "application/openmetrics-text" if openmetrics else "text/plain"), content_type
    families = parse_om(text) if openmetrics else parse_text(text)
    samples: dict = {}
    exemplars = []
    for family in families:
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, key
            samples[key] = s.value
            if s.exemplar is not None:
                exemplars.append(s.exemplar)
    return {"samples": samples, "exemplars": exemplars}


def check_scrape(samples: dict, previous: dict | None, methods: set[str]) -> None:
    buckets: dict = {}
    for (name, labels), value in samples.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            buckets.setdefault((name[: -len("_bucket")], labels - {("le", le)}), []).append(
                (float(le), value))
    assert buckets
    for (base, rest), points in buckets.items():
        points.sort()
        assert [v for _, v in points] == sorted(v for _, v in points), (base, points)
        assert points[-1][0] == float("inf")
        assert points[-1][1] == samples[(base + "_count", rest)], (base, rest)
    if previous is not None:
        for key, value in previous.items():
            assert samples[key] >= value, (key, value, samples[key])
    # A scrape never shows half a step: per method, every stage and the step were counted
    # together, and the verify counts of each step together.
    by_method: dict = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if "method" in label and label.get("le") in (None, "+Inf"):
            by_method.setdefault(label["method"], {})[(name, label.get("stage"))] = value
    assert set(by_method) <= methods
    for method, v in by_method.items():
        steps = v[("spec_decode_step_duration_seconds_count", None)]
        for stage in STAGES:
            assert v[("spec_decode_stage_duration_seconds_count", stage)] == steps, (method, v)
        drafts = v[("spec_decode_drafts_total", None)]
        assert v[("spec_decode_accepted_length_count", None)] == drafts
        assert v[("spec_decode_draft_tokens_total", None)] == K * drafts
        assert v[("spec_decode_emitted_tokens_total", None)] == (
            v[("spec_decode_accepted_tokens_total", None)] + drafts)


def run_concurrently(methods: list[str], scrapers: int, scrapes_each: int,
                     **extra: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    options: dict[str, Any] = dict(tracer_provider=provider, trace_ratio=0.02,
                                   max_draft_tokens=K, labels={"engine": "test"}, **extra)
    first = spec_metrics.SpecDecodeHooks(methods[0], registry=registry, **options)
    options.pop("labels")
    hooks = [first] + [spec_metrics.SpecDecodeHooks(m, collector=first.collector, **options)
                       for m in methods[1:]]
    stop = threading.Event()
    first_scrape = threading.Event()
    errors: list = []
    threads = [HookThread(h, stop, first_scrape, scopes=index % 2 == 1, errors=errors)
               for index, h in enumerate(hooks)]
    # The per-connection deadline (10 s by default) is not what this test checks
    # (test_server_security does): with 3 hook threads at full rate on a loaded 2-core
    # machine a response may take longer to get the GIL, so the deadline here is the test's
    # own give-up time.
    server = spec_metrics.start_http_server(port=0, registry=registry, timeout=JOIN_TIMEOUT)
    results: list[list[dict]] = [[] for _ in range(scrapers)]

    def scraper(index: int) -> None:
        previous = None
        try:
            for n in range(scrapes_each):
                result = scrape(server.url, openmetrics=(n + index) % 2 == 0)
                check_scrape(result["samples"], previous, set(methods))
                previous = result["samples"]
                results[index].append(result)
                if index == 0:
                    first_scrape.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            first_scrape.set()  # a failed scraper must not leave the hook threads waiting

    scraper_threads = [threading.Thread(target=scraper, args=(i,), daemon=True)
                       for i in range(scrapers)]
    try:
        for thread in threads + scraper_threads:
            thread.start()
        for thread in scraper_threads:
            thread.join(JOIN_TIMEOUT)
        stop.set()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
        assert not any(t.is_alive() for t in threads + scraper_threads), "a thread hung"
        assert errors == [], errors
        assert sum(len(r) for r in results) == scrapers * scrapes_each
        final = [scrape(server.url, openmetrics=om) for om in (True, False)]
    finally:
        stop.set()
        server.close()
        provider.shutdown()
    # The hooks ran during the scrapes: the first scrape saw at most the steps before the pause,
    # the final ones every step, and every thread went on after the first scrape.
    assert all(t.steps >= MIN_STEPS for t in threads)

    def steps_seen(samples: dict) -> float:
        return sum(v for (n, _), v in samples.items()
                   if n == "spec_decode_step_duration_seconds_count")

    assert steps_seen(results[0][0]["samples"]) <= BEFORE_FIRST_SCRAPE * len(threads)
    assert steps_seen(final[0]["samples"]) == sum(t.steps for t in threads)
    assert final[0]["samples"].keys() == final[1]["samples"].keys()
    want = expected_totals([(t.hooks.config.method, t.steps) for t in threads])
    for result in final:
        samples = result["samples"]
        check_scrape(samples, results[0][-1]["samples"], set(methods))

        def value(name: str, samples: dict = samples, **labels: str) -> float:
            return samples[(name, frozenset({"engine": "test", **labels}.items()))]

        dropped = sum(w["dropped"] for w in want.values())
        assert value("spec_metrics_dropped_total", reason="non_finite") == dropped
        assert sum(v for (n, _), v in samples.items() if n == "spec_metrics_dropped_total") == (
            dropped)
        for method, w in want.items():
            m = {"method": method}
            assert value("spec_decode_step_duration_seconds_count", **m) == w["steps"]
            for stage in STAGES:
                assert value("spec_decode_stage_duration_seconds_count", stage=stage,
                             **m) == w["steps"]
            for name, sample in (("drafts", "drafts"), ("draft_tokens", "draft_tokens"),
                                 ("accepted", "accepted_tokens"),
                                 ("emitted", "emitted_tokens")):
                assert value(f"spec_decode_{sample}_total", **m) == w[name], name
            for le in range(K + 1):
                assert value("spec_decode_accepted_length_bucket", le=str(float(le)),
                             **m) == w["accepted_le"][le]
            for p in range(K):
                assert value("spec_decode_accepted_tokens_per_position_total",
                             position=str(p), **m) == w["accepted_per_position"][p]
                assert value("spec_decode_draft_tokens_per_position_total",
                             position=str(p), **m) == w["drafts"]
    # Exemplars appeared, and each points at a span that was exported before the scrape.
    exported = {(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
                for s in exporter.get_finished_spans()}
    seen = [e for r in results for result in r for e in result["exemplars"]]
    assert seen
    assert all((e.labels["trace_id"], e.labels["span_id"]) in exported for e in seen)


@pytest.fixture(autouse=True)
def _frequent_thread_switches():
    # Switch threads 50x more often than CPython's default: more interleavings per second,
    # and the scrapers get their share of the GIL against hook threads at full rate.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


def test_hook_threads_sharing_a_collector_while_scraped_1000_times():
    run_concurrently(["eagle"] * 3, scrapers=6, scrapes_each=170)


def test_several_methods_on_threads_while_scraped():
    run_concurrently(["eagle", "ngram", "draft_model"], scrapers=4, scrapes_each=30)


@pytest.mark.worker
def test_hook_threads_with_the_worker_consuming_while_scraped():
    # The default consumer: the worker thread and the scrapes both consume the queues. Hook
    # threads that never release the GIL outrun any consumer; the queue bound (backpressure
    # and pending_overflow, tested in test_worker.py) is set out of reach here, so that every
    # step must arrive exactly once and in order through the worker and the scrapes.
    run_concurrently(["eagle", "eagle", "ngram"], scrapers=4, scrapes_each=60,
                     max_queued_steps=10**7)
