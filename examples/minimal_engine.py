"""The smallest instrumented engine loop: where the hooks go, and /metrics while it runs.

The "engine" here is a stand-in (sleeps, and accepted counts drawn at random with numpy) so
this runs anywhere in seconds; `spec-metrics demo` runs real models. Run:

    python examples/minimal_engine.py --duration 20
    curl -H 'Accept: application/openmetrics-text; version=1.0.0' http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

import spec_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds to run")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--print-spans", action="store_true", help="print sampled spans")
    args = parser.parse_args()

    provider = TracerProvider()  # honours OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, ...
    if args.print_spans:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    hooks = spec_metrics.SpecDecodeHooks(
        "draft_model", labels={"model": "example", "engine": "minimal_engine"},
        tracer_provider=provider, trace_ratio=0.01, max_draft_tokens=args.draft_tokens,
    )
    server = spec_metrics.start_http_server(port=args.port, host=args.host)
    print(f"serving {server.url} for {args.duration:g}s")

    rng = np.random.default_rng(0)
    k, batch = args.draft_tokens, args.batch_size
    steps = accepted_total = 0
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        hooks.begin_step(request_ids=[f"req-{steps}-{i}" for i in range(batch)])
        hooks.draft_start()
        time.sleep(0.002)  # the drafter proposes k tokens for every request
        hooks.draft_end()
        hooks.verify_start()
        time.sleep(0.008)  # one target forward over all draft tokens
        accepted = np.minimum(rng.geometric(0.3, size=batch) - 1, k)
        hooks.verify_end(accepted, k)  # one call for the whole batch
        hooks.draft_extend_start()
        time.sleep(0.001)  # the drafter catches up on the accepted tokens
        hooks.draft_extend_end()
        hooks.end_step()
        steps += 1
        accepted_total += int(accepted.sum())
    hooks.flush()
    server.close()
    provider.shutdown()
    print(f"{steps} steps, acceptance rate {accepted_total / (steps * batch * k):.3f}")


if __name__ == "__main__":
    main()
