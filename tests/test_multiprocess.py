"""Per-rank endpoints: rank from the environment, the rank label and resource, the ports, and
the generated Prometheus scrape configuration (exact text, and accepted by promtool)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

import spec_metrics
from spec_metrics.multiprocess import (
    RankInfo,
    file_sd_targets,
    rank_from_env,
    rank_labels,
    rank_resource,
    render_scrape_config,
    scrape_config,
    start_rank_http_server,
)

from .conftest import run_step


def test_rank_from_env_torchrun_variables():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert rank_from_env(env) == RankInfo(rank=5, local_rank=1, world_size=8)


def test_rank_from_env_defaults():
    assert rank_from_env({}) == RankInfo(0, 0, 1)
    assert rank_from_env({"RANK": "3"}) == RankInfo(3, 3, 4)
    assert rank_from_env({"RANK": " ", "LOCAL_RANK": ""}) == RankInfo(0, 0, 1)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "two"}, "RANK='two' is not an integer"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 must be below world_size 4"),
    ({"RANK": "1", "LOCAL_RANK": "2", "WORLD_SIZE": "4"}, "local_rank 2 cannot exceed rank 1"),
    ({"RANK": "-1"}, "rank must be an integer >= 0, got -1"),
])
def test_rank_from_env_rejects_bad_values(env, message):
    with pytest.raises(ValueError, match=message):
        rank_from_env(env)


def test_rank_labels():
    info = RankInfo(2, 2, 4)
    assert rank_labels({"model": "m"}, info) == {"model": "m", "rank": "2"}
    assert rank_labels(None, info) == {"rank": "2"}
    assert rank_labels({"rank": "2"}, info) == {"rank": "2"}
    with pytest.raises(ValueError, match="labels already hold rank='1'"):
        rank_labels({"rank": "1"}, info)


def test_rank_resource(monkeypatch):
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "engine")
    attributes = rank_resource(RankInfo(3, 1, 4), {"deployment.environment": "test"}).attributes
    assert attributes["service.instance.id"] == f"{socket.gethostname()}-rank-3"
    assert attributes["spec_metrics.rank"] == 3
    assert attributes["service.name"] == "engine"
    assert attributes["deployment.environment"] == "test"


def test_rank_resource_environment_wins(monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7")
    attributes = rank_resource(RankInfo(1, 1, 2)).attributes
    assert attributes["service.instance.id"] == "pod-7"
    assert attributes["spec_metrics.rank"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_server_port_is_base_plus_local_rank_and_series_carry_rank(make_hooks, registry):
    port = _free_port()
    info = RankInfo(rank=5, local_rank=1, world_size=8)
    hooks = make_hooks(labels=rank_labels({"model": "m"}, info))
    run_step(hooks, None, [1, 2], 4)
    server = start_rank_http_server(info, base_port=port - 1, registry=registry)
    try:
        assert (server.host, server.port) == ("127.0.0.1", port)
        with urllib.request.urlopen(server.url, timeout=10) as response:
            text = response.read().decode()
        assert ('spec_decode_accepted_tokens_total{method="eagle",model="m",rank="5"} 3.0'
                in text.splitlines())
    finally:
        server.close()


def test_rank_server_port_taken_says_what_to_do(registry):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port} \(base_port "
                                          rf"{port} \+ local rank 0\).*choose a base_port"):
            start_rank_http_server(RankInfo(), base_port=port, registry=registry)


def test_rank_server_reads_env(monkeypatch, registry):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with start_rank_http_server(base_port=0, registry=registry) as server:
        assert server.host == "127.0.0.1" and server.port > 0


def test_file_sd_targets_two_hosts():
    assert file_sd_targets(2, 9500, ["gpu-a", "gpu-b"]) == [
        {"targets": ["gpu-a:9500"], "labels": {"rank": "0"}},
        {"targets": ["gpu-a:9501"], "labels": {"rank": "1"}},
        {"targets": ["gpu-b:9500"], "labels": {"rank": "2"}},
        {"targets": ["gpu-b:9501"], "labels": {"rank": "3"}},
    ]
    assert file_sd_targets(1, 9464, ["::1"]) == [
        {"targets": ["[::1]:9464"], "labels": {"rank": "0"}}]


@pytest.mark.parametrize("args, message", [
    ((0, 9464, ["h"]), "ranks per host must be an integer >= 1, got 0"),
    ((2, 65535, ["h"]), "ports 65535..65536 are not all within 1..65535"),
    ((2, 0, ["h"]), "ports 0..1 are not all within"),
    ((2, 9464, ["h", "h"]), "hosts must be distinct and non-empty"),
    ((2, 9464, []), "hosts must be distinct and non-empty"),
])
def test_layout_errors(args, message):
    with pytest.raises(ValueError, match=message):
        file_sd_targets(*args)


def test_scrape_config_file_sd_job():
    assert scrape_config(4, job_name="engine", file_sd_path="targets/spec.json") == {
        "job_name": "engine", "honor_labels": True,
        "file_sd_configs": [{"files": ["targets/spec.json"]}]}


STATIC_TEXT = """\
scrape_configs:
- job_name: spec_metrics
  honor_labels: true
  static_configs:
  - targets:
    - 127.0.0.1:9464
    labels:
      rank: '0'
  - targets:
    - 127.0.0.1:9465
    labels:
      rank: '1'
  - targets:
    - 127.0.0.1:9466
    labels:
      rank: '2'
"""


def test_render_static_exact():
    assert render_scrape_config(3) == STATIC_TEXT


def test_render_file_sd_exact():
    text = render_scrape_config(2, 9600, ["h1"], fmt="file_sd")
    assert text == (
        '[\n  {\n    "targets": [\n      "h1:9600"\n    ],\n    "labels": {\n'
        '      "rank": "0"\n    }\n  },\n  {\n    "targets": [\n      "h1:9601"\n    ],\n'
        '    "labels": {\n      "rank": "1"\n    }\n  }\n]\n')
    assert json.loads(text) == file_sd_targets(2, 9600, ["h1"])
    with pytest.raises(ValueError, match="format must be 'static' or 'file_sd'"):
        render_scrape_config(2, fmt="kubernetes")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spec_metrics", "scrape-config", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_static_and_file_sd():
    done = _cli("--ranks", "3")
    assert (done.returncode, done.stdout) == (0, STATIC_TEXT)
    done = _cli("--ranks", "2", "--base-port", "9600", "--host", "h1", "--host", "h2",
                "--format", "file_sd")
    assert done.returncode == 0
    assert json.loads(done.stdout) == [
        {"targets": ["h1:9600"], "labels": {"rank": "0"}},
        {"targets": ["h1:9601"], "labels": {"rank": "1"}},
        {"targets": ["h2:9600"], "labels": {"rank": "2"}},
        {"targets": ["h2:9601"], "labels": {"rank": "3"}},
    ]
    done = _cli("--ranks", "0")
    assert done.returncode == 1
    assert done.stderr == ("spec-metrics scrape-config: spec_metrics: ranks per host must be an "
                           "integer >= 1, got 0\n")


def test_promtool_accepts_generated_configs(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install -y --no-install-recommends prometheus")
    static = tmp_path / "static.yml"
    static.write_text(render_scrape_config(4, 9464, ["gpu-a", "gpu-b"]))
    (tmp_path / "targets.json").write_text(render_scrape_config(4, fmt="file_sd"))
    file_sd = tmp_path / "file_sd.yml"
    file_sd.write_text(yaml.safe_dump(
        {"scrape_configs": [scrape_config(4, file_sd_path="targets.json")]}))
    for config in (static, file_sd):
        done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"SUCCESS: {config} is valid prometheus config file syntax" in done.stdout


def test_public_names():
    # The per-rank helpers live in spec_metrics.multiprocess, not in the package facade.
    from spec_metrics import multiprocess

    for name in ("RankInfo", "rank_from_env", "rank_labels", "rank_resource",
                 "start_rank_http_server", "scrape_config"):
        assert name in multiprocess.__all__ and hasattr(multiprocess, name)
        assert name not in spec_metrics.__all__


DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations" / "multiprocess.md"


def _blocks(language: str) -> list[str]:
    parts = DOC.read_text().split(f"```{language}\n")[1:]
    return [part.split("```", 1)[0] for part in parts]


def test_doc_static_job_is_the_generated_one():
    static = [b for b in _blocks("yaml") if "static_configs" in b]
    assert static == [render_scrape_config(2)]


def test_doc_file_sd_job_passes_promtool(tmp_path: Path):
    (file_sd,) = [b for b in _blocks("yaml") if "file_sd_configs" in b]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install -y --no-install-recommends prometheus")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "spec_metrics.json").write_text(render_scrape_config(2, fmt="file_sd"))
    (tmp_path / "prometheus.yml").write_text(file_sd)
    done = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_doc_collector_pipeline_names_defined_components():
    (text,) = [b for b in _blocks("yaml") if "receivers:" in b]
    config = yaml.safe_load(text)
    pipeline = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(config[kind]), kind
    policies = config["processors"]["tail_sampling"]["policies"]
    assert policies[0] == {"name": "keep-spec-metrics", "type": "numeric_attribute",
                           "numeric_attribute": {"key": "spec_metrics.rank", "min_value": 0,
                                                 "max_value": 1000000}}
    for policy in policies:
        assert policy["type"] in policy  # each policy's settings sit under its type's key


def test_doc_python_snippets_compile():
    blocks = _blocks("python")
    assert len(blocks) == 2
    for block in blocks:
        compile(block, str(DOC), "exec")
