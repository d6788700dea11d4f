"""An EAGLE-style worker written the sglang way, instrumented with SglangSpecAdapter.

The worker mirrors the call sites of sglang's EAGLE worker: one timestamp per batch through
`set_time_batch(batch.reqs, "set_spec_..._time", trace_only=True)`, accepted lengths per
request after verify. The models are numpy stand-ins (a fixed next-token table as the
target, the same table with some entries changed as the drafter), so this runs anywhere
without sglang or torch. The lines that spec_metrics adds or changes are marked
`# spec_metrics`. Run:

    python examples/sglang_style_eagle_worker.py --steps 200
    python examples/sglang_style_eagle_worker.py --serve --duration 20   # /metrics on :9464
    curl -H 'Accept: application/openmetrics-text; version=1.0.0' http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

import spec_metrics
from spec_metrics.integrations.sglang import SglangSpecAdapter

VOCAB = 512
TRACING_ENABLED = False  # sglang: get_global_tracing_enabled() (--trace-level > 0)


# ---- the engine's own pieces, sglang style ---------------------------------------------

@dataclass
class ReqTimeStats:
    """Per-request timestamps, as sglang keeps them (its trace slices are built from these)."""

    spec_draft_start_time: float = 0.0
    spec_verify_start_time: float = 0.0
    spec_draft_extend_start_time: float = 0.0
    slices: list[tuple[str, float]] = field(default_factory=list)

    def set_spec_draft_start_time(self, ts: float) -> None:
        self.spec_draft_start_time = ts

    def set_spec_draft_end_time(self, ts: float) -> None:
        self.slices.append(("spec_draft", ts - self.spec_draft_start_time))

    def set_spec_verify_start_time(self, ts: float) -> None:
        self.spec_verify_start_time = ts

    def set_spec_draft_extend_start_time(self, ts: float) -> None:
        self.spec_draft_extend_start_time = ts

    def set_spec_draft_extend_end_time(self, ts: float) -> None:
        self.slices.append(("spec_draft_extend", ts - self.spec_draft_extend_start_time))


def set_time_batch(reqs, set_func, trace_only=False, attrs=None):
    """The engine's helper: one timestamp for the batch, copied into every request."""
    if not reqs or (trace_only and not TRACING_ENABLED):
        return
    ts = time.perf_counter()
    for req in reqs:
        getattr(req.time_stats, set_func)(ts)


@dataclass
class Req:
    rid: str
    last_token: int
    time_stats: ReqTimeStats = field(default_factory=ReqTimeStats)


@dataclass
class ScheduleBatch:
    reqs: list[Req]


class EAGLEWorker:
    """Draft K tokens per request, verify them with the target in one pass, extend the
    drafter on the accepted tokens. Tokens come from lookup tables: cheap and exact."""

    def __init__(self, num_steps: int, mismatch: float, seed: int, spec: SglangSpecAdapter):
        rng = np.random.default_rng(seed)
        self.k = num_steps
        self.target_next = rng.integers(0, VOCAB, VOCAB)
        self.draft_next = self.target_next.copy()
        changed = rng.random(VOCAB) < mismatch  # the drafter disagrees on these tokens
        self.draft_next[changed] = rng.integers(0, VOCAB, int(changed.sum()))
        self.spec = spec  # spec_metrics

    def draft(self, batch: ScheduleBatch) -> np.ndarray:
        tokens = np.empty((len(batch.reqs), self.k), dtype=np.int64)
        current = np.array([req.last_token for req in batch.reqs])
        for i in range(self.k):  # K sequential draft forwards
            current = self.draft_next[current]
            tokens[:, i] = current
        time.sleep(0.0005 * self.k)
        return tokens

    def verify(self, batch: ScheduleBatch, draft_tokens: np.ndarray) -> list[int]:
        last = np.array([req.last_token for req in batch.reqs])
        previous = np.concatenate([last[:, None], draft_tokens[:, :-1]], axis=1)
        matches = self.target_next[previous] == draft_tokens  # one target pass over all
        accept_length = np.cumprod(matches, axis=1).sum(axis=1)  # prefix acceptance
        time.sleep(0.004)
        rows = np.arange(len(batch.reqs))
        accepted_last = np.where(accept_length > 0,
                                 draft_tokens[rows, np.maximum(accept_length - 1, 0)], last)
        bonus = self.target_next[accepted_last]  # the target's own next token
        for req, token in zip(batch.reqs, bonus.tolist()):
            req.last_token = token
        # sglang 0.5.11: verify_output.num_accepted_drafts_per_req_cpu
        return accept_length.tolist()

    def forward_draft_extend_after_decode(self, batch: ScheduleBatch) -> None:
        time.sleep(0.0008)

    def forward_batch_generation(self, batch: ScheduleBatch) -> list[int]:
        # spec_metrics: `set_time_batch(...)` became `self.spec.set_time_batch(...)` (same
        # arguments; the adapter passes each call on to set_time_batch), plus the verify line.
        reqs = batch.reqs
        self.spec.set_time_batch(reqs, "set_spec_draft_start_time", trace_only=True)
        spec_info = self.draft(batch)
        self.spec.set_time_batch(reqs, "set_spec_draft_end_time", trace_only=True)
        self.spec.set_time_batch(reqs, "set_spec_verify_start_time", trace_only=True)
        accept_length_per_req_cpu = self.verify(batch, spec_info)
        self.spec.verify_end_batch(reqs, accept_length_per_req_cpu)
        self.spec.set_time_batch(reqs, "set_spec_draft_extend_start_time", trace_only=True)
        self.forward_draft_extend_after_decode(batch)
        self.spec.set_time_batch(reqs, "set_spec_draft_extend_end_time", trace_only=True)
        return accept_length_per_req_cpu


# ---- running it ------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps (without --serve)")
    parser.add_argument("--serve", action="store_true", help="serve /metrics while running")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds, with --serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-steps", type=int, default=4, help="K: draft tokens per request")
    parser.add_argument("--mismatch", type=float, default=0.25,
                        help="fraction of tokens where the drafter disagrees with the target")
    parser.add_argument("--trace-level", type=int, default=3,
                        help="sglang-style level: 2 leaves spec_draft_extend out, <2 records "
                             "nothing")
    parser.add_argument("--print-spans", action="store_true", help="print traced steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    provider = TracerProvider()
    if args.print_spans:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    totals = {"steps": 0, "drafted": 0, "accepted": 0}

    def on_step(result: spec_metrics.StepResult) -> None:
        totals["steps"] += 1
        totals["drafted"] += result.draft_tokens
        totals["accepted"] += result.accepted_tokens

    hooks = spec_metrics.SpecDecodeHooks(                       # spec_metrics
        "eagle", labels={"model": "numpy-table", "engine": "sglang-style"},
        tracer_provider=provider, trace_ratio=0.01, max_draft_tokens=max(8, args.num_steps),
        on_step=on_step)
    spec = SglangSpecAdapter(hooks, trace_level=args.trace_level,  # spec_metrics
                             draft_tokens=args.num_steps, request_id_attr="rid",
                             forward=set_time_batch)
    worker = EAGLEWorker(args.num_steps, args.mismatch, args.seed, spec)
    server = None
    if args.serve:
        server = spec_metrics.start_http_server(port=args.port, host=args.host)
        print(f"serving {server.url} for {args.duration:g}s")
    rng = np.random.default_rng(args.seed)
    deadline = time.monotonic() + args.duration
    step = 0
    try:
        while (time.monotonic() < deadline) if args.serve else (step < args.steps):
            reqs = [Req(f"req-{step}-{i}", int(t))
                    for i, t in enumerate(rng.integers(0, VOCAB, args.batch_size))]
            worker.forward_batch_generation(ScheduleBatch(reqs))
            step += 1
    except KeyboardInterrupt:
        pass
    finally:
        hooks.flush()
        if server is not None:
            server.close()
        provider.shutdown()
    rate = totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0
    print(f"{step} decode steps, {totals['steps']} recorded by spec_metrics, "
          f"acceptance rate {rate:.3f}")


if __name__ == "__main__":
    main()
