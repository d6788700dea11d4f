"""End-to-end fixtures: a real Prometheus on loopback and the `spec-metrics demo` process.

`prometheus` is a factory fixture: `prometheus(targets=[...], rule_files=[...])` writes a
`prometheus.yml` into a temp dir, starts `prometheus` (TSDB in the temp dir, listening on
127.0.0.1 only, exemplar storage on), waits for `/-/ready` and returns a `PrometheusServer`
with small HTTP API helpers. Every server started is terminated (then killed) at teardown,
whatever happened in the test. `start_demo(...)` starts the demo the same way a user does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import alertmanager as _alerting

INSTALL_HINT = (
    "prometheus not found on PATH: the end-to-end tests run a real Prometheus "
    "(Debian/Ubuntu: apt-get install -y --no-install-recommends prometheus)"
)


# A real Alertmanager (factory) and a webhook receiver: tests/alertmanager.py.
alertmanager, webhook = _alerting.alertmanager, _alerting.webhook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; only this process, by its handle."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class OutputReader:
    """Reads a pipe on a thread, keeping every line with the monotonic time it arrived."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        stream.close()

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)

    def first(self, needle: str) -> float | None:
        """When the first line containing `needle` arrived, or None."""
        return next((t for t, line in list(self.lines) if needle in line), None)

    def text(self, last: int | None = None) -> str:
        lines = [line for _, line in list(self.lines)]
        return "\n".join(lines[-last:] if last else lines)


@dataclass
class PrometheusServer:
    process: subprocess.Popen
    url: str
    config_path: Path
    data_dir: Path
    log: OutputReader

    def get(self, path: str, timeout: float = 10.0, **params: Any) -> Any:
        """GET an API path; returns the `data` of a successful answer, raises otherwise."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, say which
            raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read().decode()}") from exc
        assert body.get("status") == "success", (url, body)
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """Instant query (`at` is a Unix time, default now): {'resultType', 'result'}."""
        return self.get("/api/v1/query", query=expr, time=at)

    def alerts(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/alerts")["alerts"]

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return self.get("/api/v1/query_exemplars", query=expr, start=start, end=end)

    def targets(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/targets")["activeTargets"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/rules")["groups"]


def _prometheus_config(targets: Sequence[str], rule_files: Sequence[Path], scrape_interval: str,
                       evaluation_interval: str,
                       scrape_configs: Sequence[dict[str, Any]] | None = None,
                       alertmanagers: Sequence[str] = ()) -> dict[str, Any]:
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": evaluation_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": list(scrape_configs) if scrape_configs is not None else [
            {"job_name": "spec_metrics", "metrics_path": "/metrics",
             "static_configs": [{"targets": list(targets)}]}],
    }
    if alertmanagers:
        config["alerting"] = {"alertmanagers": [
            {"api_version": "v2", "static_configs": [{"targets": list(alertmanagers)}]}]}
    return config


@pytest.fixture
def prometheus(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory: start a real Prometheus scraping `targets` ("127.0.0.1:PORT") with rules, or
    running the given `scrape_configs` jobs instead; `alertmanagers` ("127.0.0.1:PORT") get
    its alerts."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(INSTALL_HINT)
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str], rule_files: Sequence[Path] = (),
              scrape_interval: str = "1s", evaluation_interval: str = "1s",
              ready_timeout: float = 60.0,
              scrape_configs: Sequence[dict[str, Any]] | None = None,
              alertmanagers: Sequence[str] = ()) -> PrometheusServer:
        root = tmp_path_factory.mktemp("prometheus")
        config_path = root / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(_prometheus_config(
            targets, rule_files, scrape_interval, evaluation_interval, scrape_configs,
            alertmanagers), sort_keys=False))
        data_dir = root / "data"
        port = free_port()
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={data_dir}",
             f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=root)
        server = PrometheusServer(process, f"http://127.0.0.1:{port}", config_path, data_dir,
                                  OutputReader(process.stderr))
        started.append(server)
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                server.log.join()
                pytest.fail(f"prometheus exited with {process.returncode}:\n"
                            f"{server.log.text(last=40)}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {ready_timeout}s:\n"
                            f"{server.log.text(last=40)}")
            time.sleep(0.2)

    try:
        yield start
    finally:
        for server in started:
            _stop(server.process)
            server.log.join()


@dataclass
class DemoProcess:
    process: subprocess.Popen
    port: int
    traces: Path
    stdout: OutputReader
    stderr: OutputReader
    started_at: float = field(default_factory=time.monotonic)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def diagnostics(self) -> str:
        return (f"demo returncode={self.process.poll()}\n--- demo stdout ---\n"
                f"{self.stdout.text(last=60)}\n--- demo stderr ---\n{self.stderr.text(last=60)}")


def start_demo(tmp_path: Path, *args: str) -> DemoProcess:
    """`spec-metrics demo` on a free loopback port, spans to tmp_path/traces.jsonl (not
    --quiet: its stderr says when the drafter collapsed)."""
    port = free_port()
    traces = tmp_path / "traces.jsonl"
    command = [sys.executable, "-m", "spec_metrics", "demo", "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--traces-file", str(traces), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return DemoProcess(process, port, traces, OutputReader(process.stdout),
                       OutputReader(process.stderr))


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Callable[..., DemoProcess]]:
    """Factory: start the demo; every process started is stopped at teardown."""
    started: list[DemoProcess] = []

    def start(*args: str) -> DemoProcess:
        started.append(start_demo(tmp_path, *args))
        return started[-1]

    try:
        yield start
    finally:
        for d in started:
            _stop(d.process, grace=20.0)  # SIGTERM: the demo flushes its spans and exits
            d.stdout.join()
            d.stderr.join()


@pytest.fixture(scope="session")
def demo_model_cached() -> None:
    """Train (first run, ~45 s) and cache the demo's target and its distilled drafter before
    any timing starts."""
    torch = pytest.importorskip("torch")
    from spec_metrics.demo.distill import load_or_distill
    from spec_metrics.demo.training import load_or_train

    torch.manual_seed(0)
    load_or_distill(load_or_train())
