"""End to end: a real Prometheus scrapes /metrics over HTTPS with basic auth and a client
certificate, as docs/reliability.md tells users to configure it.

Three scrape jobs hit the same server: the right password and a client certificate
(`up == 1`, an exact counter value), a wrong password (401, `up == 0`), and no client
certificate (handshake refused, `up == 0`). Then the demo's --tls-*/--basic-auth-file flags.
Select them with `pytest -m e2e`.
"""

from __future__ import annotations

import base64
import signal
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from spec_metrics import start_http_server
from spec_metrics.http.auth import BasicAuth, hash_password
from tests.certs import make_pki
from tests.conftest import run_step

pytestmark = pytest.mark.e2e

PASSWORD = "scrape-password"
STEPS = 25  # batch of 2 per step: spec_decode_drafts_total == 50


def _job(name: str, target: str, pki: Any, password_file: Path, client_cert: bool
         ) -> dict[str, Any]:
    tls: dict[str, Any] = {"ca_file": str(pki.ca)}
    if client_cert:
        tls.update(cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    return {"job_name": name, "scheme": "https", "metrics_path": "/metrics",
            "basic_auth": {"username": "prometheus", "password_file": str(password_file)},
            "tls_config": tls, "static_configs": [{"targets": [target]}]}


def _wait(predicate, what: str, prom: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s\n{prom.log.text(last=30)}")
        time.sleep(0.25)


def _up(prom: Any, job: str) -> float | None:
    result = prom.query(f'up{{job="{job}"}}')["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_over_tls_with_basic_auth(prometheus, make_hooks, registry,
                                                     tmp_path):
    pki = make_pki(tmp_path)
    hooks = make_hooks()
    for _ in range(STEPS):
        run_step(hooks, None, [1, 2], 2)
    auth = BasicAuth({"prometheus": hash_password(PASSWORD, iterations=1000)})
    server = start_http_server(port=0, registry=registry, certfile=pki.server_cert,
                               keyfile=pki.server_key, client_cafile=pki.ca, basic_auth=auth,
                               environ={})
    try:
        target = f"127.0.0.1:{server.port}"
        good, wrong = tmp_path / "password", tmp_path / "wrong-password"
        good.write_text(PASSWORD + "\n")  # Prometheus trims the trailing newline
        wrong.write_text("not-the-password\n")
        prom = prometheus(targets=[])
        config = yaml.safe_load(prom.config_path.read_text())
        config["scrape_configs"] = [
            _job("tls_auth", target, pki, good, client_cert=True),
            _job("wrong_password", target, pki, wrong, client_cert=True),
            _job("no_client_cert", target, pki, good, client_cert=False),
        ]
        prom.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        prom.process.send_signal(signal.SIGHUP)  # reload the configuration

        _wait(lambda: _up(prom, "tls_auth") == 1.0, "up{job=tls_auth} == 1", prom)
        value = prom.query('spec_decode_drafts_total{job="tls_auth"}')["result"]
        assert [float(v["value"][1]) for v in value] == [2.0 * STEPS]
        _wait(lambda: _up(prom, "wrong_password") == 0.0, "up{job=wrong_password} == 0", prom)
        _wait(lambda: _up(prom, "no_client_cert") == 0.0, "up{job=no_client_cert} == 0", prom)
        targets = {t["labels"]["job"]: t for t in prom.targets()}
        assert targets["tls_auth"]["scrapeUrl"] == f"https://{target}/metrics"
        assert targets["tls_auth"]["health"] == "up"
        assert "401 Unauthorized" in targets["wrong_password"]["lastError"]
        assert "tls: certificate required" in targets["no_client_cert"]["lastError"]
        assert prom.query('count(spec_decode_drafts_total{job!="tls_auth"})')["result"] == []
        assert server.connection_counts["tls_failed"] >= 1
    finally:
        server.close()


def test_demo_serves_https_with_basic_auth(demo, demo_model_cached, tmp_path):
    """`spec-metrics demo --tls-cert --tls-key --basic-auth-file`, scraped with urllib."""
    pki = make_pki(tmp_path)
    users = tmp_path / "users"
    users.write_text(f"prometheus:{hash_password(PASSWORD, iterations=1000)}\n")
    process = demo("--duration", "60", "--batch-size", "2", "--quiet",
                   "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                   "--basic-auth-file", str(users))
    context = ssl.create_default_context(cafile=str(pki.ca))
    url = f"https://{process.target}/metrics"
    token = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()

    def scrape(authorization: str | None) -> tuple[int, str] | None:
        headers = {"Authorization": authorization} if authorization else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=5, context=context) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return None  # not listening yet

    def drafted() -> bool:
        answer = scrape(f"Basic {token}")
        return bool(answer) and answer[0] == 200 and any(
            line.startswith("spec_decode_drafts_total{") and float(line.split()[-1]) > 0
            for line in answer[1].splitlines())

    deadline = time.monotonic() + 120
    while not drafted():
        assert process.process.poll() is None, process.diagnostics()
        assert time.monotonic() < deadline, process.diagnostics()
        time.sleep(0.5)
    status, body = scrape(None)
    assert status == 401 and "spec_decode" not in body
