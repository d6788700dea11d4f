"""Tracer-provider set-up for the command line and the vLLM plugin (the library itself never
installs one).

Spans go to an OTLP JSON-lines file (the official `opentelemetry-exporter-otlp-json-file`,
the format the Collector's file exporter writes), to an OTLP/HTTP endpoint, or both, each
through a `SpanExportProcessor` (bounded queue, losses counted on /metrics, exemplars shown
only for exported spans). The standard `OTEL_*` variables keep working: `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*` (read by
SpanExportProcessor), `OTEL_SPAN_LINK_COUNT_LIMIT`, and
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` when no endpoint is given on the command line.

The provider's `shutdown()` — which the SDK also runs at interpreter exit — returns within
`shutdown_timeout` seconds even when the span endpoint is down, where the SDK's alone can
take up to 30 s per BatchSpanProcessor (retries with backoff, see docs/reliability.md).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Mapping

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from prometheus_client.registry import REGISTRY, CollectorRegistry

from spec_metrics._support.log import logger
from spec_metrics._tracing.processor import SpanExportProcessor

__all__ = ["BoundedShutdownTracerProvider", "DEFAULT_SHUTDOWN_TIMEOUT_S", "make_tracer_provider"]

_EXTRA = "pip install 'spec_metrics[demo]'"
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
DEFAULT_MAX_LINKS = 1024
# Past the deadline the exporters are shut down, which ends their retry waits at once; this
# long more is granted for that. A request already on the wire (black-holed endpoint) is
# left to its daemon thread.
_ABANDON_GRACE_S = 1.0


class BoundedShutdownTracerProvider(TracerProvider):
    """An SDK TracerProvider whose `shutdown()` and `force_flush(timeout_millis)` return
    by their deadline whatever the exporters do.

    The SDK's shutdown (also run at exit) waits for a BatchSpanProcessor's worker for up to
    30 s and its force_flush ignores its timeout, while the OTLP exporter retries an
    unreachable endpoint with backoff. Here both run on a helper thread; past the deadline,
    shutdown() shuts the exporters down (ending their retries), logs it and returns. Spans
    not exported by then are lost, as they would be anyway.
    """

    def __init__(self, *args: Any, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                 **kwargs: Any) -> None:
        if not shutdown_timeout > 0:
            raise ValueError(f"shutdown_timeout must be > 0 seconds, got {shutdown_timeout!r}")
        super().__init__(*args, **kwargs)
        self.shutdown_timeout = float(shutdown_timeout)
        self._exporters: list[Any] = []
        self._counting: list[SpanExportProcessor] = []

    def span_export_counts(self) -> dict[str, int] | None:
        """Exported and dropped spans summed over this provider's SpanExportProcessors
        (None if it has none)."""
        if not self._counting:
            return None
        totals: dict[str, int] = {}
        for processor in self._counting:
            for key, value in processor.counts.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def add_span_processor(self, span_processor: Any) -> None:
        if isinstance(span_processor, SpanExportProcessor):
            self._counting.append(span_processor)
        # The SDK's Batch/Simple processors and SpanExportProcessor expose `span_exporter`.
        exporter = getattr(span_processor, "span_exporter", None)
        if exporter is not None:
            self._exporters.append(exporter)
        super().add_span_processor(span_processor)

    def shutdown(self) -> None:
        done = _in_thread(super().shutdown, "spec-metrics-otel-shutdown")
        if done.wait(self.shutdown_timeout):
            return
        logger.warning("spec_metrics: spans not exported within %gs at tracer provider "
                       "shutdown (is the span endpoint down?); the rest are dropped",
                       self.shutdown_timeout)
        for exporter in self._exporters:
            try:
                exporter.shutdown()
            except Exception:  # already shut down, or failing: we are leaving anyway
                pass
        done.wait(_ABANDON_GRACE_S)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        flush = super().force_flush
        result: list[bool] = []
        done = _in_thread(lambda: result.append(flush(timeout_millis)), "spec-metrics-otel-flush")
        return done.wait(timeout_millis / 1000) and bool(result and result[0])


def _in_thread(call: Callable[[], Any], name: str) -> threading.Event:
    """Run `call` on a daemon thread; the event is set when it returns or raises."""
    done = threading.Event()

    def run() -> None:
        try:
            call()
        finally:
            done.set()

    try:
        threading.Thread(target=run, name=name, daemon=True).start()
    except RuntimeError:  # no new threads this late in interpreter shutdown: run it here
        run()
    return done


def make_tracer_provider(
    service_name: str,
    traces_file: str | None = None,
    otlp_endpoint: str | None = None,
    environ: Mapping[str, str] | None = None,
    registry: CollectorRegistry | None = REGISTRY,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    max_links: int = DEFAULT_MAX_LINKS,
) -> BoundedShutdownTracerProvider:
    """A provider exporting to a file and/or OTLP/HTTP; its shutdown (explicit or at exit)
    takes at most `shutdown_timeout` seconds (+1 s when an export must be abandoned). Its
    span link limit is `max_links` (unless OTEL_SPAN_LINK_COUNT_LIMIT says otherwise), so
    a step span keeps a link to every request of a large batch (the SDK's default is 128)."""
    environ = os.environ if environ is None else environ
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    link_limit = None if "OTEL_SPAN_LINK_COUNT_LIMIT" in environ else max_links
    provider = BoundedShutdownTracerProvider(resource=Resource.create(attributes),
                                             shutdown_timeout=shutdown_timeout,
                                             span_limits=SpanLimits(max_links=link_limit))
    if traces_file:
        try:
            from opentelemetry.exporter.otlp.json.file import FileSpanExporter
        except ImportError as exc:
            raise SystemExit(f"--traces-file needs the OTLP JSON file exporter: {_EXTRA}") from exc
        provider.add_span_processor(SpanExportProcessor(FileSpanExporter(traces_file),
                                                        registry=registry))
    if otlp_endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise SystemExit(f"OTLP export needs the OTLP/HTTP exporter: {_EXTRA}") from exc
        if otlp_endpoint:
            # Like OTEL_EXPORTER_OTLP_ENDPOINT, a base URL: the traces path is added.
            url = otlp_endpoint.rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url)
        elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            # Given here rather than left to the exporter, which reads os.environ: `environ`
            # may be another mapping. Its other OTEL_EXPORTER_OTLP_* settings still apply.
            exporter = OTLPSpanExporter(endpoint=environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
        else:
            base = environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/")
            exporter = OTLPSpanExporter(endpoint=base + "/v1/traces")
        # Ours: bounded queue, never blocks the engine, counts lost spans on /metrics.
        provider.add_span_processor(SpanExportProcessor(exporter, registry=registry))
    return provider
