"""Run an exporter's blocking `export` on a thread of its own, so that the caller can give
up on it after a deadline: the SDK's exporters take no deadline of theirs, or retry past it.

Shared by the span export (`_tracing/processor.py`) and the OTLP metrics push
(`_prometheus/otlp_push.py`). One request at a time; a request still running when the
caller gave up keeps the thread until it returns (`wait_idle` says when).
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value

from spec_metrics._support.log import logger

__all__ = ["ExportCaller"]

Request = TypeVar("Request")
Result = TypeVar("Result")


class ExportCaller(Generic[Request, Result]):
    """`export(request, timeout_s)` on the daemon thread `thread_name`. An exception is
    logged (`loss(request)` says what was lost) and returns `failure`."""

    def __init__(self, export: Callable[[Request, float], Result], failure: Result,
                 thread_name: str, loss: Callable[[Request], str]) -> None:
        self._export_fn = export
        self._failure = failure
        self._thread_name = thread_name
        self._loss = loss
        self._request: Request | None = None
        self._timeout = 0.0
        self._result: Result | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._done.set()  # idle
        self._stopped = False
        self._thread: threading.Thread | None = None

    def call(self, request: Request, timeout: float) -> Result | None:
        """The export's result, or None if it did not return within `timeout` seconds."""
        if self._thread is None:
            thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no new threads this late in interpreter exit: export here
                return self._export(request, timeout)
            self._thread = thread
        self._done.clear()
        self._request, self._timeout, self._result = request, timeout, None
        self._ready.set()
        if not self._done.wait(timeout):
            return None
        return self._result

    def wait_idle(self, timeout: float) -> bool:
        """True once no export runs (waiting at most `timeout` seconds)."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        self._stopped = True
        self._ready.set()

    def _run(self) -> None:
        while True:
            self._ready.wait()
            self._ready.clear()
            if self._stopped:
                return
            request, self._request = self._request, None
            result = self._failure if request is None else self._export(request, self._timeout)
            request = None  # exported: do not keep it alive here
            self._result = result
            self._done.set()

    def _export(self, request: Request, timeout: float) -> Result:
        # Like the SDK's processors: an instrumented HTTP client inside the exporter makes
        # no spans of its own (else every export would export a span of itself).
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            return self._export_fn(request, timeout)
        except Exception:  # an exporter bug must not kill the thread
            logger.exception("spec_metrics: the exporter raised; %s", self._loss(request))
            return self._failure
        finally:
            detach(token)
