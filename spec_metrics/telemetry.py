"""Tracer-provider set-up for the command line (the library itself never installs one).

Spans go to an OTLP JSON-lines file (the official `opentelemetry-exporter-otlp-json-file`,
the format the Collector's file exporter writes), to an OTLP/HTTP endpoint, or both. The
standard `OTEL_*` variables keep working: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, and `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` when
no endpoint is given on the command line.
"""

from __future__ import annotations

import os
from typing import Mapping

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client.registry import REGISTRY, CollectorRegistry

from .spans import SpanExportProcessor

__all__ = ["make_tracer_provider"]

_EXTRA = "pip install 'spec_metrics[demo]'"


def make_tracer_provider(
    service_name: str,
    traces_file: str | None = None,
    otlp_endpoint: str | None = None,
    environ: Mapping[str, str] | None = None,
    registry: CollectorRegistry | None = REGISTRY,
) -> TracerProvider:
    environ = os.environ if environ is None else environ
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    if traces_file:
        try:
            from opentelemetry.exporter.otlp.json.file import FileSpanExporter
        except ImportError as exc:
            raise SystemExit(f"--traces-file needs the OTLP JSON file exporter: {_EXTRA}") from exc
        provider.add_span_processor(BatchSpanProcessor(FileSpanExporter(traces_file)))
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
        else:
            exporter = OTLPSpanExporter()  # reads the OTEL_EXPORTER_OTLP_* variables
        # Ours: bounded queue, never blocks the engine, counts lost spans on /metrics.
        provider.add_span_processor(SpanExportProcessor(exporter, registry=registry))
    return provider
