"""Serving /metrics: a standalone loopback server, or apps to mount in an existing one.

The format is negotiated from the Accept header as prometheus_client does: OpenMetrics
(with exemplars) for scrapers that ask for it, as Prometheus does, and the classic text
format otherwise; the bytes are prometheus_client's, written faster (exposition.py).
Only `/metrics` and `/healthz` answer; anything else is 404.

Endpoint security (docs/reliability.md): 127.0.0.1 unless a host is passed; optional TLS
(minimum 1.2, optional client certificates) and HTTP basic auth on /metrics (/healthz stays
open: it says "ok" and nothing else); every connection has a deadline and their number is
bounded, so a slow or idle client holds one thread for a while and never the hooks.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
from typing import Any, Callable, Iterable, Mapping
from wsgiref.simple_server import make_server

from prometheus_client.registry import REGISTRY, CollectorRegistry

from spec_metrics._prometheus.exposition import metrics_response
from spec_metrics._support.forking import reset_after_fork
from spec_metrics._support.log import logger
from spec_metrics.http.auth import CHALLENGE, BasicAuth
from spec_metrics.http.listener import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    QuietHandler,
    ThreadingServer,
    ThreadingServer6,
    make_tls_context,
)

__all__ = ["MetricsServer", "start_http_server", "make_wsgi_app", "make_asgi_app",
           "make_tls_context", "DEFAULT_HOST", "DEFAULT_PORT", "SERVER_ENV_VARS"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
_NOT_FOUND = b"not found: this server answers /metrics and /healthz\n"
_UNAUTHORIZED = b"unauthorized: /metrics needs basic auth\n"
# start_http_server option -> environment variable, read when the option is not passed.
SERVER_ENV_VARS: dict[str, str] = {
    "certfile": "SPEC_METRICS_TLS_CERT",
    "keyfile": "SPEC_METRICS_TLS_KEY",
    "client_cafile": "SPEC_METRICS_TLS_CLIENT_CA",
    "basic_auth": "SPEC_METRICS_BASIC_AUTH_FILE",
}


def _route(path: str, metrics_path: str) -> str:
    path = path.rstrip("/") or "/"
    if path == metrics_path:
        return "metrics"
    if path == "/healthz":
        return "healthz"
    return "other"


def _as_auth(basic_auth: BasicAuth | str | os.PathLike[str] | None) -> BasicAuth | None:
    if basic_auth is None or isinstance(basic_auth, BasicAuth):
        return basic_auth
    return BasicAuth.from_file(basic_auth)


def make_wsgi_app(registry: CollectorRegistry = REGISTRY, metrics_path: str = "/metrics",
                  basic_auth: BasicAuth | str | os.PathLike[str] | None = None) -> Callable:
    """A WSGI app serving `metrics_path` and `/healthz`. Mounted under a prefix that is
    itself the metrics URL (e.g. at "/metrics"), pass metrics_path="/". With `basic_auth`
    (a `BasicAuth` or the path of a user:secret file), /metrics answers 401 to others.

    Unlike prometheus_client's `make_wsgi_app` it routes (404 outside /metrics and
    /healthz), takes basic auth, and marks the exemplars a response carried as shown."""
    metrics_path = metrics_path.rstrip("/") or "/"
    auth = _as_auth(basic_auth)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        route = _route(environ.get("PATH_INFO", ""), metrics_path)
        if route == "metrics" and auth and not auth.check(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                ("WWW-Authenticate", CHALLENGE)])
            return [_UNAUTHORIZED]
        if route == "metrics":
            response = metrics_response(
                registry, environ.get("REQUEST_METHOD", "GET"), environ.get("HTTP_ACCEPT"),
                environ.get("HTTP_ACCEPT_ENCODING"), environ.get("QUERY_STRING", ""))
            start_response(response.status, response.headers)
            response.sent()
            return [response.body]
        if route == "healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [_NOT_FOUND]

    return app


def make_asgi_app(registry: CollectorRegistry = REGISTRY, metrics_path: str = "/metrics",
                  basic_auth: BasicAuth | str | os.PathLike[str] | None = None) -> Callable:
    """The ASGI counterpart of `make_wsgi_app` (same differences from prometheus_client's
    `make_asgi_app`: routing, basic auth, exemplars marked shown per response)."""
    metrics_path = metrics_path.rstrip("/") or "/"
    auth = _as_auth(basic_auth)

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        route = _route(path, metrics_path)
        if route == "metrics" and auth:
            header = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                           if k.lower() == b"authorization"), None)
            if not auth.check(header):
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"www-authenticate", CHALLENGE.encode())]})
                await send({"type": "http.response.body", "body": _UNAUTHORIZED})
                return
        if route == "metrics":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", [])}
            response = metrics_response(
                registry, scope.get("method", "GET"), headers.get("accept"),
                headers.get("accept-encoding"), scope.get("query_string", b"").decode("latin-1"))
            await send({"type": "http.response.start",
                        "status": int(response.status.split()[0]),
                        "headers": [(k.lower().encode(), v.encode())
                                    for k, v in response.headers]})
            await send({"type": "http.response.body", "body": response.body})
            response.sent()  # this response's exemplars, whatever other scrapes interleave
            return
        status, body = (200, b"ok\n") if route == "healthz" else (404, _NOT_FOUND)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, say so


class MetricsServer:
    """A running /metrics server in a daemon thread. Stop it with `close()`.

    `ssl_context` turns TLS on (see `make_tls_context`); `basic_auth` guards /metrics;
    `timeout` is the most seconds one connection may last, handshake, request and response
    together; past `max_connections` open at once, new connections are closed unanswered.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry, *,
                 ssl_context: ssl.SSLContext | None = None,
                 basic_auth: BasicAuth | str | os.PathLike[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if not host:
            raise ValueError("host is empty, which would listen on every interface; pass "
                             "'0.0.0.0' or '::' to say so, or '127.0.0.1' for this host only")
        if not timeout > 0 or max_connections < 1:
            raise ValueError(f"timeout must be > 0 and max_connections >= 1, got {timeout!r} "
                             f"and {max_connections!r}")
        base = ThreadingServer6 if ":" in host else ThreadingServer
        server_class = type("_MetricsHTTPServer", (base,), {
            "ssl_context": ssl_context, "timeout_s": float(timeout),
            "max_connections": int(max_connections)})
        auth = _as_auth(basic_auth)
        app = make_wsgi_app(registry, basic_auth=auth)
        self._server: ThreadingServer = make_server(host, port, app, server_class=server_class,
                                                    handler_class=QuietHandler)
        self.host = host
        self.port = int(self._server.server_address[1])
        self.tls = ssl_context is not None
        self.basic_auth = auth is not None
        if not _is_loopback(host):
            logger.log(logging.INFO if self.tls and self.basic_auth else logging.WARNING,
                       "spec_metrics: %s is reachable from other hosts (TLS %s, basic auth %s)",
                       self.url, "on" if self.tls else "off", "on" if self.basic_auth else "off")
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="spec-metrics-http", daemon=True)
        self._thread.start()
        self._forked = False
        reset_after_fork(self)

    def _reset_after_fork(self) -> None:
        """In a forked child no thread serves: close the inherited listening socket (only
        this process's descriptor; the parent keeps serving) so the port is not held here
        after the parent closes it, and make close() a no-op (it would wait forever for a
        serve loop that does not run here). The child starts its own server if it needs one."""
        self._forked = True
        self._server.socket.close()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    @property
    def connection_counts(self) -> dict[str, int]:
        """Connections so far: accepted, refused_busy (over max_connections), timed_out
        (past the deadline), tls_failed (handshake), errors (anything else)."""
        with self._server.counts_lock:
            return dict(self._server.counts)

    def close(self) -> None:
        if self._forked:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_http_server(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST,
                      registry: CollectorRegistry = REGISTRY, *,
                      certfile: str | os.PathLike[str] | None = None,
                      keyfile: str | os.PathLike[str] | None = None,
                      client_cafile: str | os.PathLike[str] | None = None,
                      ssl_context: ssl.SSLContext | None = None,
                      basic_auth: BasicAuth | str | os.PathLike[str] | None = None,
                      timeout: float = DEFAULT_TIMEOUT,
                      max_connections: int = DEFAULT_MAX_CONNECTIONS,
                      environ: Mapping[str, str] | None = None) -> MetricsServer:
    """Serve /metrics and /healthz on host:port (127.0.0.1:9464 unless told otherwise;
    port 0 picks a free port, see `.port`).

    Not prometheus_client's `start_http_server`, although it serves the same registry:
    this one binds 127.0.0.1 (prometheus_client binds every interface), defaults to port
    9464, returns a `MetricsServer` to `close()` (not a (server, thread) pair), answers only
    /metrics and /healthz, bounds connections with deadlines, and writes spec_metrics'
    collectors with its fast writer.

    TLS: `certfile` (+ `keyfile`), `client_cafile` to require client certificates, or a
    ready `ssl_context`. `basic_auth`: a `BasicAuth` or a user:secret file. Options not
    passed are read from `SPEC_METRICS_TLS_CERT`, `..._TLS_KEY`, `..._TLS_CLIENT_CA`,
    `SPEC_METRICS_BASIC_AUTH_FILE` (see SERVER_ENV_VARS)."""
    environ = os.environ if environ is None else environ

    def pick(name: str, value: Any) -> Any:
        return value if value is not None else (environ.get(SERVER_ENV_VARS[name]) or None)

    certfile, keyfile = pick("certfile", certfile), pick("keyfile", keyfile)
    client_cafile, basic_auth = pick("client_cafile", client_cafile), pick("basic_auth",
                                                                           basic_auth)
    if ssl_context is not None and (certfile or client_cafile):
        raise ValueError("pass either ssl_context or certfile/keyfile/client_cafile, not both")
    if certfile is None and (keyfile or client_cafile):
        raise ValueError("keyfile/client_cafile given without certfile: TLS needs the "
                         "server certificate (certfile=... or SPEC_METRICS_TLS_CERT)")
    if certfile is not None:
        ssl_context = make_tls_context(certfile, keyfile, client_cafile)
    return MetricsServer(host, port, registry, ssl_context=ssl_context,
                         basic_auth=basic_auth, timeout=timeout,
                         max_connections=max_connections)
