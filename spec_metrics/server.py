"""Serving /metrics: a standalone loopback server, or apps to mount in an existing one.

prometheus_client renders the output and negotiates the format from the Accept header:
OpenMetrics (with exemplars) for scrapers that ask for it, as Prometheus does, and the
classic text format otherwise. Only `/metrics` and `/healthz` answer; anything else is 404.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client.registry import REGISTRY, CollectorRegistry

from .exemplars import mark_rendered_shown

__all__ = ["MetricsServer", "start_http_server", "make_wsgi_app", "make_asgi_app",
           "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
_NOT_FOUND = b"not found: this server answers /metrics and /healthz\n"


def _route(path: str, metrics_path: str) -> str:
    path = path.rstrip("/") or "/"
    if path == metrics_path:
        return "metrics"
    if path == "/healthz":
        return "healthz"
    return "other"


def make_wsgi_app(registry: CollectorRegistry = REGISTRY,
                  metrics_path: str = "/metrics") -> Callable:
    """A WSGI app serving `metrics_path` and `/healthz`. Mounted under a prefix that is
    itself the metrics URL (e.g. at "/metrics"), pass metrics_path="/"."""
    metrics_path = metrics_path.rstrip("/") or "/"
    metrics_app = prometheus_client.make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        route = _route(environ.get("PATH_INFO", ""), metrics_path)
        if route == "metrics":
            formats: list[str] = []

            def recording_start_response(status: str, headers: list, *args: Any) -> Any:
                formats.extend(v for k, v in headers if k.lower() == "content-type")
                return start_response(status, headers, *args)

            body = metrics_app(environ, recording_start_response)
            _after_render(formats)
            return body
        if route == "healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [_NOT_FOUND]

    return app


def make_asgi_app(registry: CollectorRegistry = REGISTRY,
                  metrics_path: str = "/metrics") -> Callable:
    """The ASGI counterpart of `make_wsgi_app`."""
    metrics_path = metrics_path.rstrip("/") or "/"
    metrics_app = prometheus_client.make_asgi_app(registry)

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        route = _route(path, metrics_path)
        if route == "metrics":
            formats: list[str] = []

            async def recording_send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    formats.extend(v.decode() for k, v in message.get("headers", [])
                                   if k.lower() == b"content-type")
                await send(message)

            await metrics_app(scope, receive, recording_send)
            _after_render(formats)
            return
        status, body = (200, b"ok\n") if route == "healthz" else (404, _NOT_FOUND)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})

    return app


def _after_render(content_types: list[str]) -> None:
    # Only OpenMetrics carries exemplars: only then may newer ones replace those shown.
    if any(t.startswith("application/openmetrics-text") for t in content_types):
        mark_rendered_shown()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper must never keep the engine process alive


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """A running /metrics server in a daemon thread. Stop it with `close()`."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._server = make_server(host, port, make_wsgi_app(registry),
                                   server_class=server_class, handler_class=_QuietHandler)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="spec-metrics-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_http_server(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST,
                      registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve /metrics and /healthz on host:port (127.0.0.1:9464 unless told otherwise;
    port 0 picks a free port, see `.port`)."""
    return MetricsServer(host, port, registry)
