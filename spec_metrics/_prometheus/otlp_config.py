"""Settings of the OTLP metrics push: arguments first, then the standard variables.

The interval `OTEL_METRIC_EXPORT_INTERVAL` and the export timeout `OTEL_METRIC_EXPORT_TIMEOUT`
(milliseconds; 60000 and 30000, the SDK's defaults), the temporality from
`OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` (cumulative by default; delta and
lowmemory both mean delta here, since our counters and histograms count like synchronous
instruments). The endpoint, headers, per-request timeout (seconds, in the Python exporter),
compression and TLS files are the OTLP/HTTP exporter's own `OTEL_EXPORTER_OTLP_[METRICS_]*`
variables, which it reads itself.
"""

from __future__ import annotations

from typing import Any, Mapping

from spec_metrics._support.log import logger

__all__ = ["DEFAULT_INTERVAL_MS", "DEFAULT_TIMEOUT_MS", "delta_from", "otlp_http_exporter",
           "seconds_from"]

DEFAULT_INTERVAL_MS = 60_000
DEFAULT_TIMEOUT_MS = 30_000
TEMPORALITY_VARIABLE = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
_METRICS_PATH = "/v1/metrics"
_EXTRA = ("the OTLP metrics push needs opentelemetry-exporter-otlp-proto-http "
          "(pip install opentelemetry-exporter-otlp-proto-http, or 'spec_metrics[demo]')")


def otlp_http_exporter(endpoint: str | None, headers: Mapping[str, str] | None) -> Any:
    """The SDK's OTLP/HTTP metric exporter. `endpoint`: a base URL (`/v1/metrics` is added,
    as for OTEL_EXPORTER_OTLP_ENDPOINT) or the full metrics URL; None: the variables."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        raise ImportError(_EXTRA) from exc
    url = None
    if endpoint:
        url = endpoint.rstrip("/")
        if not url.endswith(_METRICS_PATH):
            url += _METRICS_PATH
    return OTLPMetricExporter(endpoint=url, headers=headers)


def seconds_from(given: float | None, environ: Mapping[str, str], variable: str,
                 default_ms: int) -> float:
    """`given` seconds, else `variable` (milliseconds), else the default."""
    if given is not None:
        return float(given)
    raw = environ.get(variable, "").strip()
    if not raw:
        return default_ms / 1e3
    try:
        return float(raw) / 1e3
    except ValueError:
        raise ValueError(f"spec_metrics: {variable}={raw!r} is not a number of "
                         "milliseconds") from None


def delta_from(temporality: str | None, environ: Mapping[str, str]) -> bool:
    """True for delta, from the argument or else the standard preference variable."""
    if temporality is not None:
        if temporality.lower() not in ("cumulative", "delta"):
            raise ValueError(f"temporality must be 'cumulative' or 'delta', got {temporality!r}")
        return temporality.lower() == "delta"
    variable = TEMPORALITY_VARIABLE
    preference = environ.get(variable, "").strip().lower() or "cumulative"
    if preference not in ("cumulative", "delta", "lowmemory"):
        logger.warning("spec_metrics: %s=%r is not cumulative, delta or lowmemory; pushing "
                       "cumulative", variable, preference)
    return preference in ("delta", "lowmemory")
