"""/metrics over real HTTP on loopback: content negotiation, /healthz, 404, mounting."""

from __future__ import annotations

import asyncio
import io
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as classic_families

import spec_metrics
from spec_metrics.http.server import DEFAULT_HOST, DEFAULT_PORT

from .conftest import run_step

# What Prometheus 2.42 sends when it scrapes.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.fixture
def served(make_hooks, registry):
    hooks = make_hooks(trace_ratio=1.0)
    run_step(hooks, None, [1, 2], 2)
    server = spec_metrics.start_http_server(port=0, registry=registry)
    yield server
    server.close()


def _get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_defaults_are_loopback_9464():
    assert (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 9464)


def test_binds_loopback(served):
    assert served.host == "127.0.0.1"
    assert served._server.socket.getsockname()[0] == "127.0.0.1"


def test_openmetrics_with_exemplars_when_asked(served):
    status, content_type, body = _get(served.url, PROMETHEUS_ACCEPT)
    assert status == 200
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    exemplars = [s.exemplar for f in families.values() for s in f.samples if s.exemplar]
    assert exemplars and all(len(e.labels["trace_id"]) == 32 for e in exemplars)
    assert body.endswith("# EOF\n")


def test_classic_text_without_exemplars_otherwise(served):
    status, content_type, body = _get(served.url)
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "trace_id" not in body
    names = {f.name for f in classic_families(body)}
    assert "spec_decode_accepted_tokens" in names


def test_healthz_and_404(served):
    base = served.url.rsplit("/", 1)[0]
    assert _get(base + "/healthz")[0:3:2] == (200, "ok\n")
    for path in ("/", "/metrics/extra", "/favicon.ico", "/debug"):
        assert _get(base + path)[0] == 404, path


def _wsgi_get(app, path: str, accept: str = "") -> tuple[str, bytes]:
    captured = {}

    def start_response(status, headers):
        captured["status"] = status

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
               "HTTP_ACCEPT": accept, "wsgi.input": io.BytesIO()}
    body = b"".join(app(environ, start_response))
    return captured["status"], body


def test_wsgi_app_mountable_under_a_prefix(make_hooks, registry):
    make_hooks()
    app = spec_metrics.make_wsgi_app(registry)
    assert _wsgi_get(app, "/metrics")[0] == "200 OK"
    assert _wsgi_get(app, "/healthz") == ("200 OK", b"ok\n")
    assert _wsgi_get(app, "/other")[0].startswith("404")
    # mounted at /metrics by the host app: PATH_INFO is what remains, "/" or ""
    mounted = spec_metrics.make_wsgi_app(registry, metrics_path="/")
    status, body = _wsgi_get(mounted, "", PROMETHEUS_ACCEPT)
    assert status == "200 OK" and body.endswith(b"# EOF\n")


def _asgi_get(app, path: str, root_path: str = "", accept: str = "") -> tuple[int, bytes]:
    messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path,
             "query_string": b"", "headers": [(b"accept", accept.encode())]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body


def test_asgi_app(make_hooks, registry):
    hooks = make_hooks(trace_ratio=1.0)
    run_step(hooks, None, [1], 1)
    app = spec_metrics.make_asgi_app(registry)
    status, body = _asgi_get(app, "/metrics", accept=PROMETHEUS_ACCEPT)
    assert status == 200 and b"trace_id" in body
    assert _asgi_get(app, "/healthz") == (200, b"ok\n")
    assert _asgi_get(app, "/nope")[0] == 404
    # Starlette-style mount: full path with root_path set
    assert _asgi_get(app, "/monitoring/metrics", root_path="/monitoring")[0] == 200
