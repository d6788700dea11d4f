"""spec_metrics: make speculative decoding observable.

One set of stage hooks (draft, verify, draft_extend) feeds Prometheus histograms and
counters, OpenTelemetry spans of the steps, and exemplars that link the two.

The public API is this module (the hook API, serving /metrics, span export, pushing the
metrics over OTLP), the metric catalog (`spec_metrics.catalog`), the per-rank helpers
(`spec_metrics.multiprocess`), the engine integrations (`spec_metrics.integrations.*`) and the
`spec-metrics` CLI. Everything in an underscored subpackage is internal; ARCHITECTURE.md maps
it.
"""

from typing import TYPE_CHECKING

from spec_metrics._core.hooks import SpecDecodeHooks
from spec_metrics._core.sinks import StepResult
from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._support.config import HooksConfig
from spec_metrics._support.drops import StrictModeError
from spec_metrics._version import __version__
from spec_metrics.http.auth import BasicAuth
from spec_metrics.http.server import (
    MetricsServer,
    make_asgi_app,
    make_tls_context,
    make_wsgi_app,
    start_http_server,
)

if TYPE_CHECKING:  # loaded on first access (module __getattr__): it imports the OTel SDK
    from spec_metrics._prometheus.otlp_push import start_otlp_metrics_exporter

__all__ = [
    # the hook API
    "SpecDecodeHooks",
    "HooksConfig",
    "StepResult",
    "StrictModeError",
    "SpecDecodeCollector",
    # serving /metrics
    "start_http_server",
    "MetricsServer",
    "make_wsgi_app",
    "make_asgi_app",
    "make_tls_context",
    "BasicAuth",
    # span export
    "SpanExportProcessor",
    # pushing the metrics over OTLP
    "start_otlp_metrics_exporter",
    "__version__",
]


def __getattr__(name: str) -> object:
    # The span processor and the OTLP metrics push import the OpenTelemetry SDK: loaded on
    # first use only.
    if name == "SpanExportProcessor":
        from spec_metrics._tracing.processor import SpanExportProcessor

        return SpanExportProcessor
    if name == "start_otlp_metrics_exporter":
        from spec_metrics._prometheus.otlp_push import start_otlp_metrics_exporter

        return start_otlp_metrics_exporter
    raise AttributeError(f"module 'spec_metrics' has no attribute {name!r}")
