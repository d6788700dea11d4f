"""`spec-metrics demo`: the reference engine, instrumented, with /metrics and traces.

Runs the torch reference speculative decoder with continuous batching for `--duration`
seconds, serves /metrics the whole time, writes spans where asked, can make the drafter
collapse (and recover) or the verify stage spike on a schedule, and prints a summary at the
end (and on Ctrl-C).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

__all__ = ["add_arguments", "run"]

DEFAULT_SPIKE_MS = 300.0
DEFAULT_PLAIN_EVERY = 20
DEFAULT_DRAFT_SLOWDOWN = 6.0
# Workload classes (request groups): prose (high acceptance) and hex (low acceptance).
HEX_SHARE = 0.25
HEX_SHARE_SHIFTED = 0.7
# The weaker drafter --drafter-swap-at switches to replaces this share of draft tokens with
# random ones: acceptance falls by ~45% in every workload class (measured with the default
# drafter, greedy: prose 0.74 -> 0.39, hex 0.49 -> 0.28; the mix 0.67 -> 0.36), still above
# the low-acceptance alert's 25%.
SWAP_WEAKNESS = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spec_metrics.http.server import DEFAULT_HOST, DEFAULT_PORT

    parser.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                        help="how long to run (default 30)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address /metrics listens on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"/metrics port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="serve /metrics over HTTPS with this certificate chain")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key (if not in --tls-cert)")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="require client certificates signed by these CAs (mutual TLS)")
    parser.add_argument("--basic-auth-file", metavar="PATH",
                        help="user:secret lines; /metrics then needs basic auth "
                        "(python -m spec_metrics.http.auth USER prints a line)")
    parser.add_argument("--method", choices=("draft_model", "ngram"), default="draft_model",
                        help="drafter: a noisy copy of the target, or n-gram prompt lookup")
    parser.add_argument("--batch-size", type=int, default=8, help="running requests (default 8)")
    parser.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                        help="draft tokens per request per step (default 4)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where the models run (default: cuda if available)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy acceptance; > 0: rejection sampling (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-ratio", type=float, default=0.01,
                        help="fraction of ordinary steps traced; outliers always are")
    parser.add_argument("--arrival-rate", type=float, default=50.0,
                        help="Poisson request arrivals per second (default 50)")
    parser.add_argument("--dynamic-k", action="store_true",
                        help="dynamic speculation: K per step falls as the batch fills, to 0 "
                             "(plain decode steps) with a full batch")
    parser.add_argument("--plain-every", type=int, default=DEFAULT_PLAIN_EVERY, metavar="N",
                        help="every Nth step is a plain decode step (K = 0): a measured "
                        f"baseline for the speedup estimate (default {DEFAULT_PLAIN_EVERY}; "
                        "0: never, the estimate is then an upper bound)")
    parser.add_argument("--baseline", action="store_true",
                        help="after each step, time one step of plain greedy decoding of the "
                        "same workload at the same batch size, and print the measured speedup "
                        "next to the hooks' estimate (halves the demo's throughput)")
    parser.add_argument("--draft-slowdown-at", type=float, metavar="SECONDS",
                        help="from then on the draft stage takes --draft-slowdown times as "
                        "long, as a drafter on a contended device would")
    parser.add_argument("--draft-slowdown", type=float, default=DEFAULT_DRAFT_SLOWDOWN,
                        metavar="FACTOR",
                        help=f"how much slower (default {DEFAULT_DRAFT_SLOWDOWN:g}x)")
    parser.add_argument("--drafter-swap-at", type=float, metavar="SECONDS",
                        help="then replace the drafter with a weaker one (acceptance ~45%% "
                        "lower, still above the low-acceptance alert's 25%%) and declare it")
    parser.add_argument("--mix-shift-at", type=float, metavar="SECONDS",
                        help=f"then the share of hex requests (low acceptance) rises from "
                        f"{HEX_SHARE * 100:.0f}%% to {HEX_SHARE_SHIFTED * 100:.0f}%%; "
                        "each class keeps its own acceptance")
    parser.add_argument("--traces-file", metavar="PATH",
                        help="write spans as OTLP JSON lines to PATH")
    parser.add_argument("--otlp-endpoint", metavar="URL",
                        help="send spans over OTLP/HTTP, e.g. http://127.0.0.1:4318")
    parser.add_argument("--otlp-metrics", nargs="?", const="", metavar="URL",
                        help="also push the metrics /metrics shows (exemplars included) over "
                        "OTLP/HTTP: to URL (a base like http://127.0.0.1:4318 or the full "
                        ".../v1/metrics), else to --otlp-endpoint, else where "
                        "OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT says (docs/otlp-metrics.md)")
    parser.add_argument("--otlp-metrics-interval", type=float, metavar="SECONDS",
                        help="push interval (default: OTEL_METRIC_EXPORT_INTERVAL, else 60); "
                        "a last push follows the run")
    parser.add_argument("--collapse-at", type=float, metavar="SECONDS",
                        help="from then on the drafter no longer matches the target")
    parser.add_argument("--recover-at", type=float, metavar="SECONDS",
                        help="then restore the drafter --collapse-at broke: acceptance "
                        "recovers and the low-acceptance alerts resolve")
    parser.add_argument("--spike-every", type=float, metavar="SECONDS",
                        help="inject a slow verify stage this often")
    parser.add_argument("--spike-ms", type=float, default=DEFAULT_SPIKE_MS,
                        help=f"how slow an injected spike is (default {DEFAULT_SPIKE_MS:g} ms)")
    parser.add_argument("--slow-ms", type=float, default=100.0,
                        help="a step slower than this is always traced (default 100 ms); "
                        "the running p99.9 estimate catches other outliers")
    parser.add_argument("--quiet", action="store_true", help="no status line, summary only")


def run(args: argparse.Namespace) -> int:
    from opentelemetry import trace

    from spec_metrics import SpecDecodeHooks, start_http_server
    from spec_metrics.demo.summary import DemoSummary
    from spec_metrics.ops.telemetry import make_tracer_provider

    _check(args)
    import torch

    from spec_metrics.demo.factory import build_engine
    from spec_metrics.demo.records import EngineConfig

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.manual_seed(args.seed)

    provider = make_tracer_provider("spec-metrics-demo", args.traces_file, args.otlp_endpoint)
    trace.set_tracer_provider(provider)  # the CLI owns the process; the library never does
    summary = DemoSummary()
    hooks = SpecDecodeHooks(
        args.method,
        labels={"model": "tiny-gpt", "engine": "spec_metrics-demo"},
        trace_ratio=args.sample_ratio,
        slow_step_seconds=args.slow_ms / 1e3,
        max_draft_tokens=max(8, args.draft_tokens),
        group_label="group",  # the workload class of each request: prose or hex
        timer="cuda" if device == "cuda" else "cpu",
        on_step=summary.observe,
    )
    server = start_http_server(port=args.port, host=args.host, certfile=args.tls_cert,
                               keyfile=args.tls_key, client_cafile=args.tls_client_ca,
                               basic_auth=args.basic_auth_file)
    say = _printer(args.quiet)
    say(f"serving {server.url} (OpenMetrics with exemplars when asked); device {device}")
    pusher = _otlp_metrics(args)
    if pusher is not None:
        say(f"pushing the metrics to {pusher.endpoint} every {pusher.interval_s:g} s")
    config = EngineConfig(batch_size=args.batch_size, k=args.draft_tokens,
                          temperature=args.temperature, arrival_rate=args.arrival_rate,
                          seed=args.seed, dynamic_k=args.dynamic_k,
                          plain_every=args.plain_every, workloads=_mix(HEX_SHARE),
                          report_groups=True)
    say("loading the models (the first run trains them, ~45 s, then caches them)")
    engine = build_engine("model" if args.method == "draft_model" else "ngram",
                          device=device, hooks=hooks, config=config, seed=args.seed,
                          num_threads=1 if device == "cpu" else None)
    if device == "cuda":
        hooks.warm_up_device(args.batch_size)
    baseline = None
    if args.baseline:
        from spec_metrics.demo.baseline import InterleavedBaseline

        engine.step_log = []  # (rows, seconds, tokens) of each step, taken by the loop
        baseline = InterleavedBaseline(config, device, seed=args.seed)
    # What the demo speculates with (spec_decode_drafter_info).
    hooks.declare_drafter("tiny-gpt", _drafter_name(args.method, swapped=False),
                          args.draft_tokens)
    # Ctrl-C and SIGTERM stop the loop between two steps, never inside one: every step
    # either reached the metrics and the trace sink whole, or did not start.
    stop = _StopFlag()
    previous = {sig: signal.signal(sig, stop.set) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        _loop(engine, hooks, args, summary, started, stop, baseline)
        if stop.signal is not None:
            say("\ninterrupted: stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        elapsed = time.monotonic() - started
        hooks.flush()
        provider.shutdown()  # every span is in the traces file before we exit
        if pusher is not None:
            pusher.shutdown()  # a last push, with the exemplars of the spans just exported
        server.close()
    measured = baseline.speedups() if baseline is not None else None
    print(summary.render(engine.counters, elapsed, args.draft_tokens,
                         skipped=dict(hooks.collector.skipped.counts),
                         withheld=dict(hooks.collector.withheld.counts),
                         spans=provider.span_export_counts(), measured=measured), flush=True)
    return 0


def _loop(engine: Any, hooks: Any, args: argparse.Namespace, summary: Any,
          started: float, stop: "_StopFlag", baseline: Any) -> None:
    live = sys.stderr.isatty() and not args.quiet
    collapsed = recovered = slowed = swapped = shifted = False
    next_spike = args.spike_every
    next_status = 0.5
    while stop.signal is None:
        elapsed = time.monotonic() - started
        if elapsed >= args.duration:
            break
        if args.collapse_at is not None and not collapsed and elapsed >= args.collapse_at:
            engine.collapse()
            collapsed = True
            if not args.quiet:
                sys.stderr.write(f"\n[{elapsed:.1f}s] drafter collapsed\n")
        if (args.recover_at is not None and collapsed and not recovered
                and elapsed >= args.recover_at):
            engine.restore()
            recovered = True
            if not args.quiet:
                sys.stderr.write(f"\n[{elapsed:.1f}s] drafter recovered\n")
        if (args.draft_slowdown_at is not None and not slowed
                and elapsed >= args.draft_slowdown_at):
            engine.set_draft_slowdown(args.draft_slowdown)
            slowed = True
            slower = f"{args.draft_slowdown:g}x slower"
            _phase(summary, baseline, f"from {elapsed:.1f} s: draft {slower}")
            if not args.quiet:
                sys.stderr.write(f"\n[{elapsed:.1f}s] draft stage {slower}\n")
        if args.drafter_swap_at is not None and not swapped and elapsed >= args.drafter_swap_at:
            engine.weaken_drafter(SWAP_WEAKNESS)
            hooks.declare_drafter("tiny-gpt", _drafter_name(args.method, swapped=True),
                                  args.draft_tokens)
            swapped = True
            _phase(summary, baseline, f"from {elapsed:.1f} s: weaker drafter")
            if not args.quiet:
                sys.stderr.write(f"\n[{elapsed:.1f}s] drafter swapped for a weaker one\n")
        if args.mix_shift_at is not None and not shifted and elapsed >= args.mix_shift_at:
            engine.set_workloads(_mix(HEX_SHARE_SHIFTED))
            shifted = True
            _phase(summary, baseline, f"from {elapsed:.1f} s: {HEX_SHARE_SHIFTED:.0%} hex")
            if not args.quiet:
                sys.stderr.write(f"\n[{elapsed:.1f}s] workload mix shifted to "
                                 f"{HEX_SHARE_SHIFTED:.0%} hex\n")
        if next_spike is not None and elapsed >= next_spike:
            engine.set_spike(args.spike_ms, steps=1)
            next_spike += args.spike_every
        if engine.step():
            if baseline is not None:  # one plain step at the same batch size
                baseline.after_step(*engine.step_log.pop())
        else:
            hooks.poll()  # idle: publish steps whose device results have landed
            if engine.idle():
                break
        if live and elapsed >= next_status:
            sys.stderr.write("\r" + summary.status_line(elapsed, engine.counters) + "  ")
            sys.stderr.flush()
            next_status = elapsed + 0.5
    if live:
        sys.stderr.write("\n")


def _otlp_metrics(args: argparse.Namespace) -> Any:
    """The OTLP metrics push of --otlp-metrics (None without it)."""
    if args.otlp_metrics is None:
        return None
    import os

    from opentelemetry.sdk.resources import Resource

    from spec_metrics import start_otlp_metrics_exporter

    named = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "spec-metrics-demo"}
    return start_otlp_metrics_exporter(endpoint=args.otlp_metrics or args.otlp_endpoint or None,
                                       interval_s=args.otlp_metrics_interval,
                                       resource=Resource.create(named))


def _mix(hex_share: float) -> tuple[tuple[str, float], ...]:
    return (("prose", 1.0 - hex_share), ("hex", hex_share))


def _drafter_name(method: str, swapped: bool) -> str:
    if method == "draft_model":
        return "tiny-gpt-draft-noisy" if swapped else "tiny-gpt-draft"
    return "prompt-lookup-random" if swapped else "prompt-lookup"


def _phase(summary: Any, baseline: Any, name: str) -> None:
    """A scheduled event starts a new phase of the payoff summary (and of --baseline)."""
    summary.start_phase(name)
    if baseline is not None:
        baseline.start_phase()


def _check(args: argparse.Namespace) -> None:
    problems = []
    if args.duration <= 0:
        problems.append("--duration must be > 0")
    if args.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if not 1 <= args.draft_tokens <= 16:
        problems.append("--draft-tokens must be within 1..16")
    if args.temperature < 0:
        problems.append("--temperature must be >= 0")
    if not 0 <= args.sample_ratio <= 1:
        problems.append("--sample-ratio must be within [0, 1]")
    if args.spike_every is not None and args.spike_every <= 0:
        problems.append("--spike-every must be > 0")
    if args.slow_ms <= 0:
        problems.append("--slow-ms must be > 0")
    if args.plain_every < 0 or args.plain_every == 1:
        problems.append("--plain-every must be 0 (never) or >= 2")
    if args.draft_slowdown < 1:
        problems.append("--draft-slowdown must be >= 1")
    if args.recover_at is not None and (args.collapse_at is None
                                        or args.recover_at <= args.collapse_at):
        problems.append("--recover-at needs a --collapse-at before it")
    if args.arrival_rate <= 0:
        problems.append("--arrival-rate must be > 0")
    if args.otlp_metrics_interval is not None and args.otlp_metrics_interval <= 0:
        problems.append("--otlp-metrics-interval must be > 0")
    if problems:
        raise SystemExit("spec-metrics demo: " + "; ".join(problems))


def _printer(quiet: bool) -> Any:
    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)
    return say


class _StopFlag:
    """A signal handler that asks the loop to stop after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def set(self, signum: int, frame: Any) -> None:
        self.signal = signum
