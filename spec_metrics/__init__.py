"""spec_metrics: make speculative decoding observable.

One set of stage hooks (draft, verify, draft_extend) feeds Prometheus histograms and
counters, OpenTelemetry spans of the steps, and exemplars that link the two.
"""

from spec_metrics._core.hooks import SpecDecodeHooks
from spec_metrics._core.sinks import StepResult
from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._support.config import HooksConfig
from spec_metrics._support.drops import StrictModeError
from spec_metrics.catalog import METRICS, STAGES, MetricSpec
from spec_metrics.http.server import MetricsServer, make_asgi_app, make_wsgi_app, start_http_server
from spec_metrics.multiprocess import (
    RankInfo,
    rank_from_env,
    rank_labels,
    rank_resource,
    scrape_config,
    start_rank_http_server,
)

__version__ = "0.1.0"

__all__ = [
    "SpecDecodeHooks",
    "SpecDecodeCollector",
    "StepResult",
    "HooksConfig",
    "StrictModeError",
    "MetricSpec",
    "METRICS",
    "STAGES",
    "MetricsServer",
    "start_http_server",
    "make_wsgi_app",
    "make_asgi_app",
    "RankInfo",
    "rank_from_env",
    "rank_labels",
    "rank_resource",
    "start_rank_http_server",
    "scrape_config",
    "SpanExportProcessor",
    "__version__",
]


def __getattr__(name: str) -> object:
    # The span processor imports the OpenTelemetry SDK: loaded on first use only.
    if name == "SpanExportProcessor":
        from spec_metrics._tracing.processor import SpanExportProcessor

        return SpanExportProcessor
    raise AttributeError(f"module 'spec_metrics' has no attribute {name!r}")
