"""The command line's tracer-provider set-up; it lives in `spec_metrics._tracing.provider`
(the vLLM plugin builds the same provider) and is re-exported here."""

from spec_metrics._tracing.provider import (
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    BoundedShutdownTracerProvider,
    make_tracer_provider,
)

__all__ = ["BoundedShutdownTracerProvider", "DEFAULT_SHUTDOWN_TIMEOUT_S", "make_tracer_provider"]
