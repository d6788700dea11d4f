"""The package logger: every warning spec_metrics writes goes to the `spec_metrics` logger."""

from __future__ import annotations

import logging

__all__ = ["logger"]

logger = logging.getLogger("spec_metrics")
