"""Endpoint security with real clients on loopback: bind address, TLS (server and mutual),
basic auth, routes, and clients that connect and stall or read slowly.

Certificates come from a throwaway CA made with the openssl CLI (tests/certs.py).
"""

from __future__ import annotations

import base64
import http.client
import io
import logging
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

import spec_metrics
from spec_metrics.http.auth import CHALLENGE, BasicAuth, hash_password
from spec_metrics.http.server import make_tls_context, start_http_server

from .certs import TestPKI, make_pki
from .conftest import run_step
from .test_server import _asgi_get

PASSWORD = "correct horse battery staple"
SHA256_TOKEN = "a-long-random-scrape-token"
SHA256_SECRET = "sha256:" + __import__("hashlib").sha256(SHA256_TOKEN.encode()).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def hooks(make_hooks):
    return make_hooks()


@pytest.fixture
def auth() -> BasicAuth:
    # Few iterations: the hash is the same code path, the test stays fast.
    return BasicAuth({"prometheus": hash_password(PASSWORD, iterations=1000),
                      "robot": SHA256_SECRET, "legacy": "plain:s3cret"})


@pytest.fixture
def servers():
    started: list[spec_metrics.MetricsServer] = []

    def start(registry: CollectorRegistry, **options: Any) -> spec_metrics.MetricsServer:
        options.setdefault("environ", {})
        started.append(start_http_server(port=0, registry=registry, **options))
        return started[-1]

    yield start
    for server in started:
        server.close()


def client_context(pki: TestPKI, ca: Path | None = None, cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    if cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def get(url: str, context: ssl.SSLContext | None = None, user: str | None = None,
        password: str = "") -> tuple[int, Any, str]:
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def drafts_total(body: str) -> float:
    """spec_decode_drafts_total from a classic-text scrape."""
    values = [s.value for f in text_string_to_metric_families(body) for s in f.samples
              if s.name == "spec_decode_drafts_total"]
    assert len(values) == 1, values
    return values[0]


def wait_for(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout}s")
        time.sleep(0.05)


# --- binding ---------------------------------------------------------------------------------


def test_default_bind_is_loopback_and_says_nothing(registry, servers, caplog):
    with caplog.at_level(logging.INFO, logger="spec_metrics"):
        server = servers(registry)
    assert server._server.socket.getsockname()[0] == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    assert [r for r in caplog.records if "reachable" in r.getMessage()] == []


def test_all_interfaces_only_when_asked_and_logged(registry, hooks, servers, caplog):
    run_step(hooks, None, [1, 2], 2)
    with caplog.at_level(logging.INFO, logger="spec_metrics"):
        server = servers(registry, host="0.0.0.0")
    assert server._server.socket.getsockname()[0] == "0.0.0.0"
    [record] = [r for r in caplog.records if "reachable" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (f"spec_metrics: http://0.0.0.0:{server.port}/metrics is "
                                   "reachable from other hosts (TLS off, basic auth off)")
    status, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200 and drafts_total(body) == 2.0


def test_empty_host_is_refused(registry):
    with pytest.raises(ValueError, match="every interface"):
        start_http_server(port=0, host="", registry=registry, environ={})


# --- TLS -------------------------------------------------------------------------------------


def test_tls_scrape_verified_against_the_test_ca(registry, hooks, servers, pki):
    for _ in range(3):
        run_step(hooks, None, [1, 2], 2)
    server = servers(registry, certfile=pki.server_cert, keyfile=pki.server_key)
    assert server.url == f"https://127.0.0.1:{server.port}/metrics"
    status, headers, body = get(server.url, client_context(pki))
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert drafts_total(body) == 6.0
    # TLS 1.2 is accepted; nothing older is offered by the server.
    only_12 = client_context(pki)
    only_12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert get(server.url, only_12)[0] == 200
    assert make_tls_context(pki.server_cert, pki.server_key).minimum_version == \
        ssl.TLSVersion.TLSv1_2


def test_tls_untrusted_certificate_is_rejected_by_the_client(registry, servers, pki):
    server = servers(registry, certfile=pki.server_cert, keyfile=pki.server_key)
    with pytest.raises(urllib.error.URLError) as caught:
        get(server.url, client_context(pki, ca=pki.other_ca))
    assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)


def test_plain_http_to_a_tls_port_fails(registry, servers, pki):
    server = servers(registry, certfile=pki.server_cert, keyfile=pki.server_key)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            connection.request("GET", "/metrics")
            connection.getresponse()
    finally:
        connection.close()
    wait_for(lambda: server.connection_counts["tls_failed"] == 1, "the failed handshake")
    assert server.connection_counts["accepted"] == 1


def test_mutual_tls_requires_a_client_certificate(registry, hooks, servers, pki):
    run_step(hooks, None, [1, 2], 2)
    server = servers(registry, certfile=pki.server_cert, keyfile=pki.server_key,
                     client_cafile=pki.ca)
    status, _, body = get(server.url, client_context(pki, cert=True))
    assert status == 200 and drafts_total(body) == 2.0
    # TLS 1.3 reports a missing client certificate on the first read, 1.2 in the handshake.
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(server.url, client_context(pki))


def test_tls_options_errors_say_what_to_do(registry, pki, tmp_path):
    with pytest.raises(ValueError, match="without certfile"):
        start_http_server(port=0, registry=registry, keyfile=pki.server_key, environ={})
    with pytest.raises(ValueError, match="cannot load certfile"):
        start_http_server(port=0, registry=registry, certfile=pki.server_cert,
                          keyfile=pki.client_key, environ={})  # key of another certificate
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True, timeout=60,
                   capture_output=True)
    with pytest.raises(ValueError, match="the private key is encrypted"):  # never a prompt
        start_http_server(port=0, registry=registry, certfile=pki.server_cert,
                          keyfile=encrypted, environ={})
    with pytest.raises(ValueError, match="either ssl_context"):
        start_http_server(port=0, registry=registry, certfile=pki.server_cert,
                          ssl_context=ssl.create_default_context(), environ={})


# --- basic auth ------------------------------------------------------------------------------


def test_basic_auth_over_tls(registry, hooks, servers, pki, auth):
    run_step(hooks, None, [1, 2], 2)
    server = servers(registry, certfile=pki.server_cert, keyfile=pki.server_key,
                     basic_auth=auth)
    context = client_context(pki)
    for user, password in (("prometheus", PASSWORD), ("robot", SHA256_TOKEN),
                           ("legacy", "s3cret")):
        status, _, body = get(server.url, context, user, password)
        assert status == 200 and drafts_total(body) == 2.0, user
    for user, password in ((None, ""), ("prometheus", "wrong"), ("nobody", PASSWORD),
                           ("robot", SHA256_SECRET), ("legacy", "plain:s3cret")):
        status, headers, body = get(server.url, context, user, password)
        assert (status, headers["WWW-Authenticate"]) == (401, CHALLENGE), user
        assert "spec_decode" not in body
    base = server.url.rsplit("/", 1)[0]
    assert get(base + "/healthz", context)[0:3:2] == (200, "ok\n")  # open by design
    for path in ("/", "/metrics/extra", "/api/v1/query", "/healthz/x"):
        assert get(base + path, context, "prometheus", PASSWORD)[0] == 404, path
        assert get(base + path, context)[0] == 404, path


def test_auth_header_variants(auth):
    def header(raw: bytes, scheme: str = "Basic") -> str:
        return f"{scheme} {base64.b64encode(raw).decode()}"

    assert auth.check(header(f"prometheus:{PASSWORD}".encode()))
    assert auth.check(header(f"prometheus:{PASSWORD}".encode(), "basic"))  # scheme is caseless
    assert not auth.check(header(f"prometheus:{PASSWORD}".encode(), "Bearer"))
    assert not auth.check(header(b"prometheus"))  # no colon
    assert not auth.check("Basic not*base64")
    assert not auth.check("")
    assert not auth.check(None)
    assert auth.check(header(b"legacy:s3cret"))  # the second time comes from the cache
    assert auth.check(header(b"legacy:s3cret"))
    assert auth.users == ("prometheus", "robot", "legacy")


def test_auth_file_and_hash_command(tmp_path, registry):
    line = subprocess.run([sys.executable, "-m", "spec_metrics.http.auth", "prometheus"],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()
    assert line.startswith("prometheus:pbkdf2_sha256:200000:")
    path = tmp_path / "users"
    path.write_text(f"# who may scrape\n\n{line}\nrobot:{SHA256_SECRET}\n")
    auth = BasicAuth.from_file(path)
    token = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
    assert auth.check(f"Basic {token}") and auth.users == ("prometheus", "robot")
    for text, message in (("prometheus\n", "users:1: expected user:secret"),
                          ("a:plain:x\na:plain:y\n", "users:2: user 'a' listed twice"),
                          ("# only a comment\n", "no user:secret line"),
                          ("a:md5:abc\n", "unreadable secret"),
                          ("a:sha256:abcd\n", "unreadable secret"),
                          ("a:pbkdf2_sha256:10:zz:00\n", "unreadable secret")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            BasicAuth.from_file(path)


def test_wsgi_and_asgi_apps_take_basic_auth(hooks, registry, auth):
    from .test_server import _wsgi_get

    run_step(hooks, None, [1, 2], 2)
    token = base64.b64encode(f"robot:{SHA256_TOKEN}".encode()).decode()
    wsgi = spec_metrics.make_wsgi_app(registry, basic_auth=auth)
    assert _wsgi_get(wsgi, "/metrics")[0] == "401 Unauthorized"
    captured = {}
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "HTTP_AUTHORIZATION": f"Basic {token}", "wsgi.input": io.BytesIO()}
    body = b"".join(wsgi(environ, lambda status, headers: captured.update(status=status)))
    assert captured["status"] == "200 OK" and drafts_total(body.decode()) == 2.0
    assert _wsgi_get(wsgi, "/healthz") == ("200 OK", b"ok\n")

    asgi = spec_metrics.make_asgi_app(registry, basic_auth=auth)
    assert _asgi_get(asgi, "/metrics")[0] == 401
    assert _asgi_get(asgi, "/healthz") == (200, b"ok\n")


def test_options_from_the_environment(registry, hooks, servers, pki, tmp_path):
    run_step(hooks, None, [1, 2], 2)
    users = tmp_path / "users"
    users.write_text(f"robot:{SHA256_SECRET}\n")
    server = servers(registry, environ={
        "SPEC_METRICS_TLS_CERT": str(pki.server_cert),
        "SPEC_METRICS_TLS_KEY": str(pki.server_key),
        "SPEC_METRICS_BASIC_AUTH_FILE": str(users)})
    assert server.url.startswith("https://") and server.tls and server.basic_auth
    assert get(server.url, client_context(pki))[0] == 401
    status, _, body = get(server.url, client_context(pki), "robot", SHA256_TOKEN)
    assert status == 200 and drafts_total(body) == 2.0


# --- slow and idle clients -------------------------------------------------------------------


def idle_tls_connection(port: int) -> socket.socket:
    """Connects and sends nothing: not even a TLS ClientHello."""
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_idle_clients_block_neither_hooks_nor_other_scrapers(registry, hooks, servers, pki):
    server = servers(registry, certfile=pki.server_cert, keyfile=pki.server_key, timeout=3.0)
    idle = [idle_tls_connection(server.port) for _ in range(3)]
    try:
        for _ in range(50):
            run_step(hooks, None, [1, 2], 2)
        status, _, body = get(server.url, client_context(pki))
        assert status == 200 and drafts_total(body) == 100.0
        # Past the deadline the server hangs up on each of them.
        for sock in idle:
            assert sock.recv(1) == b""
        wait_for(lambda: server.connection_counts["timed_out"] == 3, "3 timed-out connections")
        assert server.connection_counts == {"accepted": 4, "refused_busy": 0, "timed_out": 3,
                                            "tls_failed": 0, "errors": 0}
    finally:
        for sock in idle:
            sock.close()


def test_connections_over_the_bound_are_closed_then_room_again(registry, hooks, servers):
    run_step(hooks, None, [1, 2], 2)
    server = servers(registry, max_connections=2, timeout=3.0)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
    try:
        wait_for(lambda: server.connection_counts["accepted"] == 2, "2 accepted")
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            get(server.url)
        assert server.connection_counts["refused_busy"] == 1
        run_step(hooks, None, [1, 2], 2)  # the hooks do not care
        for sock in idle:
            assert sock.recv(1) == b""
        wait_for(lambda: server.connection_counts["timed_out"] == 2, "2 timed out")
        status, _, body = get(server.url)
        assert status == 200 and drafts_total(body) == 4.0
    finally:
        for sock in idle:
            sock.close()


def test_a_client_reading_one_byte_per_second_is_cut_off(registry, hooks, servers):
    # A body larger than the kernel's socket buffers, so the server's write really blocks.
    big = 16 * 1024 * 1024

    class Big:
        def collect(self):
            yield GaugeMetricFamily("padding", "x" * big, value=1.0)

    registry.register(Big())
    server = servers(registry, timeout=3.0)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(30)
    slow.connect(("127.0.0.1", server.port))
    received = bytearray()
    try:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received += slow.recv(1)
        for _ in range(20):
            run_step(hooks, None, [1, 2], 2)
        status, _, body = get(server.url)  # another scraper, while the slow one stalls
        assert status == 200 and drafts_total(body) == 40.0
        assert len(body) > big
        deadline = time.monotonic() + 20
        while server.connection_counts["timed_out"] == 0 and time.monotonic() < deadline:
            received += slow.recv(1)  # one byte a second, buffers stay full
            time.sleep(1.0)
    finally:
        slow.close()
    assert server.connection_counts["timed_out"] == 1  # the server gave up on it
    assert len(received) < big
    assert server.connection_counts["accepted"] == 2

