"""Running the real vLLM for the tests: its environment (CPU, loopback, offline), the
prompts, and one engine run in a child process (`engine_driver.py`)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# vLLM on CPU, on loopback, offline.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def prompts(count: int = 4, seed: int = 0) -> list[str]:
    """Prompts that repeat themselves, so that n-gram lookup finds drafts."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        phrase = [f"w{rng.randrange(4, 500)}" for _ in range(5)]
        out.append(" ".join(phrase * 3))
    return out



def run_engine(models: Path, tmp: Path, method: str, env: dict[str, str], port: int,
               *, max_tokens: int = 40, wait_for_spans: bool = False,
               stat_loggers: int = 0, timeout: float = 300) -> dict[str, Any]:
    settings = {"method": method, "models": str(models), "port": port,
                "prompts": prompts(), "max_tokens": max_tokens,
                "wait_for_spans": wait_for_spans, "stat_loggers": stat_loggers}
    settings_path = tmp / f"{method}-settings.json"
    out_path = tmp / f"{method}-{port}-out.json"
    settings_path.write_text(json.dumps(settings))
    full_env = {**os.environ, **VLLM_ENV, **env}
    done = subprocess.run([sys.executable, str(HERE / "engine_driver.py"), str(settings_path),
                           str(out_path)], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp)
    if done.returncode != 0 or not out_path.exists():
        raise AssertionError(f"engine run failed (rc {done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.loads(out_path.read_text())
    result["log"] = done.stdout + done.stderr
    return result


def install_stat_logger_entry_point(site: Path) -> Path:
    """A distribution on `site` (put it on PYTHONPATH) declaring SpecMetricsStatLogger in
    vLLM's `vllm.stat_logger_plugins` group, as the docs tell users to."""
    info = site / "spec_metrics_vllm_logger-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spec-metrics-vllm-logger\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.stat_logger_plugins]\n"
        "spec_metrics = spec_metrics.integrations.vllm:SpecMetricsStatLogger\n")
    return site
