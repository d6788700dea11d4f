"""Test plumbing for alert delivery: a real Alertmanager on loopback and a webhook receiver.

`alertmanager` is a factory fixture: `alertmanager(config)` writes the config (a dict) into a
temp dir and starts Debian's `prometheus-alertmanager` (or an `alertmanager` on PATH) with its
own storage dir, listening on 127.0.0.1 only, clustering off; it waits for `/-/ready`. The
`webhook` fixture is an HTTP server on 127.0.0.1 that keeps every POSTed notification with
the path it came to and the monotonic time it arrived. `example_config(webhook_url)` is the
shipped `alerts/alertmanager.example.yml` with every receiver replaced by that webhook (one
path per receiver name) and short group timings, its routes and inhibit rules unchanged.
Everything started is stopped at teardown, each process by its own handle.
"""

from __future__ import annotations

import copy
import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.otlp import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "alerts" / "alertmanager.example.yml"
INSTALL_HINT = (
    "Alertmanager not found on PATH: the alert delivery tests run a real one "
    "(Debian/Ubuntu: apt-get install -y --no-install-recommends prometheus-alertmanager)"
)


def alertmanager_binary() -> str | None:
    """Debian names the server `prometheus-alertmanager`; upstream's tarball `alertmanager`."""
    return shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")


def amtool_binary() -> str:
    path = shutil.which("amtool")
    if path is None:
        pytest.skip(INSTALL_HINT)
    return path


def unix_time(text: str) -> float:
    """Unix time of an RFC 3339 timestamp as Alertmanager writes them (nanoseconds, 'Z' or
    an offset)."""
    import re
    from datetime import datetime

    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    assert match is not None, text
    head, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(head + zone).timestamp() + float("0." + (fraction or "0"))


@dataclass
class Notification:
    at: float  # monotonic time it arrived
    path: str  # "/<receiver name>" with example_config()
    payload: dict[str, Any]  # Alertmanager's webhook JSON (version 4)

    def alerts(self, alertname: str) -> list[dict[str, Any]]:
        return [a for a in self.payload["alerts"] if a["labels"].get("alertname") == alertname]


class WebhookReceiver:
    """Collects Alertmanager's webhook notifications (POSTed JSON) on 127.0.0.1."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                note = Notification(time.monotonic(), self.path, json.loads(body))
                with receiver._lock:
                    receiver.notifications.append(note)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="webhook-receiver", daemon=True)
        self._thread.start()

    def received(self) -> list[Notification]:
        with self._lock:
            return list(self.notifications)

    def wait_for(self, match: Callable[[Notification], bool], timeout: float,
                 alive: Callable[[], None] | None = None) -> Notification | None:
        """The first notification (in arrival order) that `match`es, waiting up to `timeout`
        seconds; `alive()` is called between polls (to fail early if a process died)."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((n for n in self.received() if match(n)), None)
            if found is not None or time.monotonic() > deadline:
                return found
            if alive is not None:
                alive()
            time.sleep(0.1)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@dataclass
class AlertmanagerServer:
    process: subprocess.Popen
    url: str
    config_path: Path
    log_path: Path

    @property
    def target(self) -> str:
        return self.url.removeprefix("http://")

    def log(self, last: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-last:])

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts (filters: active, silenced, inhibited, unprocessed: "true")."""
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=10) as r:
            return json.load(r)

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """POST /api/v2/alerts, as Prometheus does."""
        request = urllib.request.Request(
            f"{self.url}/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.status


def example_config(webhook_url: str, group_wait: str = "1s", group_interval: str = "1s",
                   repeat_interval: str = "1h") -> dict[str, Any]:
    """The shipped example, every receiver a webhook at `<webhook_url>/<receiver name>`,
    timings shortened on every route that sets them; routes and inhibit rules as shipped."""
    config = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))
    config["receivers"] = [
        {"name": r["name"],
         "webhook_configs": [{"url": f"{webhook_url}/{r['name']}", "send_resolved": True}]}
        for r in config["receivers"]]
    timings = {"group_wait": group_wait, "group_interval": group_interval,
               "repeat_interval": repeat_interval}
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        for key, value in timings.items():
            if key in route or route is config["route"]:
                route[key] = value
        routes += route.get("routes", [])
    return config


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture
def alertmanager(tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Callable[..., AlertmanagerServer]]:
    """Factory: start a real Alertmanager with `config` (a dict) on a free loopback port."""
    binary = alertmanager_binary()
    if binary is None:
        pytest.skip(INSTALL_HINT)
    started: list[tuple[AlertmanagerServer, Any]] = []

    def start(config: dict[str, Any], ready_timeout: float = 30.0) -> AlertmanagerServer:
        root = tmp_path_factory.mktemp("alertmanager")
        config_path = root / "alertmanager.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log_path = root / "alertmanager.log"
        log = open(log_path, "w")
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
             "--log.level=debug"],
            stdout=log, stderr=subprocess.STDOUT, cwd=root)
        server = AlertmanagerServer(process, f"http://127.0.0.1:{port}", config_path, log_path)
        started.append((server, log))
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"alertmanager exited with {process.returncode}:\n{server.log()}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return server
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"alertmanager not ready after {ready_timeout}s:\n{server.log()}")
            time.sleep(0.1)

    try:
        yield start
    finally:
        for server, log in started:
            stop_process(server.process)
            log.close()
