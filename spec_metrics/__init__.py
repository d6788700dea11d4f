"""spec_metrics: make speculative decoding observable.

One set of stage hooks (draft, verify, draft_extend) feeds Prometheus histograms and
counters, OpenTelemetry spans of the steps, and exemplars that link the two.
"""

from .catalog import METRICS, STAGES, MetricSpec
from .collector import SpecDecodeCollector
from .config import HooksConfig
from .drops import StrictModeError
from .hooks import SpecDecodeHooks
from .multiprocess import (
    RankInfo,
    rank_from_env,
    rank_labels,
    rank_resource,
    scrape_config,
    start_rank_http_server,
)
from .server import MetricsServer, make_asgi_app, make_wsgi_app, start_http_server
from .sinks import StepResult

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
        from .spans import SpanExportProcessor

        return SpanExportProcessor
    raise AttributeError(f"module 'spec_metrics' has no attribute {name!r}")
