"""How the plugin loads inside a vLLM install: importing spec_metrics (and the entry point
vLLM imports in every process) stays light with vLLM installed; a vLLM version or model
runner layout the plugin was not checked against gets one clear warning and no patch; and
nothing the plugin does raises into vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="the real-vLLM tests run in .venv-vllm: scripts/setup.sh "
                    "builds it and the README's test command runs them there")


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    full = {k: v for k, v in os.environ.items() if k != "SPEC_METRICS_VLLM"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=300, check=True)


def test_import_stays_light_with_vllm_installed():
    code = ("import sys, spec_metrics\n"
            "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))")
    assert run(code).stdout.strip() == "[]"


def test_entry_point_is_inert_unless_enabled():
    """What vLLM does in each of its processes: load the entry point and call it."""
    code = ("import sys\n"
            "from importlib.metadata import entry_points\n"
            "(ep,) = [e for e in entry_points(group='vllm.general_plugins')"
            " if e.name == 'spec_metrics']\n"
            "ep.load()()\n"
            "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))")
    assert run(code).stdout.strip() == "[]"


PATCHED = ("from vllm.v1.worker.gpu_model_runner import GPUModelRunner\n"
           "print('patched', hasattr(GPUModelRunner.__init__, '_spec_metrics_wrapped_init'))\n")


def test_enabled_on_the_checked_layout_patches_the_runner():
    code = ("from spec_metrics.integrations import vllm_plugin\n"
            "vllm_plugin.register(); vllm_plugin.register()\n" + PATCHED +
            "print('once', not hasattr(GPUModelRunner.__init__.__wrapped__,"
            " '_spec_metrics_wrapped_init'))")
    out = run(code, SPEC_METRICS_VLLM="1").stdout
    assert "patched True" in out and "once True" in out


@pytest.mark.parametrize("change, reason", [
    ("import vllm; vllm.__version__ = '0.99.1'",
     "vLLM 0.99.1 is not a version this plugin was checked against (0.32.x)"),
    ("from vllm.v1.worker.gpu_model_runner import GPUModelRunner as R\n"
     "R._sample = lambda self, logits, metadata, extra: None",
     "GPUModelRunner._sample takes ('self', 'logits', 'metadata'), expected "
     "('self', 'logits', 'spec_decode_metadata')"),
    ("from vllm.v1.worker.gpu_model_runner import GPUModelRunner as R\n"
     "del R.propose_draft_token_ids",
     "GPUModelRunner.propose_draft_token_ids is missing"),
])
def test_unknown_layout_warns_once_and_patches_nothing(change, reason):
    code = (change + "\n"
            "import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from spec_metrics.integrations import vllm_plugin\n"
            "vllm_plugin.register()\n" + PATCHED)
    done = run(code, SPEC_METRICS_VLLM="1")
    assert "patched False" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "nothing is instrumented" in line]
    assert len(warnings) == 1 and reason in warnings[0], done.stderr[-2000:]


def test_a_failure_inside_the_plugin_never_raises_into_vllm():
    code = ("from spec_metrics.integrations import vllm_plugin\n"
            "def broken(): raise RuntimeError('boom')\n"
            "vllm_plugin._install = broken\n"
            "vllm_plugin.register()\n"
            "print('vLLM goes on')")
    done = run(code, SPEC_METRICS_VLLM="1")
    assert "vLLM goes on" in done.stdout
    assert "the vLLM plugin failed to load" in done.stderr and "boom" in done.stderr


def test_a_taken_port_leaves_the_runner_uninstrumented_with_a_warning():
    code = """
import logging, socket, sys
from types import SimpleNamespace
import torch
logging.basicConfig(level=logging.WARNING)
from spec_metrics.integrations import vllm_plugin

taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
port = taken.getsockname()[1]
import os; os.environ["SPEC_METRICS_PORT"] = str(port)

class Runner:  # what the plugin reads of a model runner
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_rank=0))
    speculative_config = SimpleNamespace(method="ngram", num_speculative_tokens=3)
    model_config = SimpleNamespace(get_vocab_size=lambda: 512, served_model_name="m")
    device = torch.device("cpu")
    def execute_model(self, scheduler_output): return "executed"

runner = Runner()
vllm_plugin._instrument(runner)
print("wrapped", "execute_model" in runner.__dict__, runner.execute_model(None))
print("listed", len(vllm_plugin.instrumented_runners()))
"""
    done = run(code, SPEC_METRICS_VLLM="1")
    assert "wrapped False executed" in done.stdout and "listed 0" in done.stdout
    assert "cannot serve /metrics" in done.stderr and "runs uninstrumented" in done.stderr


def test_each_rank_listens_on_the_base_port_plus_its_rank_on_loopback():
    """Data-parallel rank 3 of a one-worker world: SPEC_METRICS_PORT + 3, on 127.0.0.1
    unless SPEC_METRICS_HOST says otherwise."""
    import urllib.request
    from types import SimpleNamespace

    import torch
    from otlp import free_port

    from spec_metrics.integrations.vllm_plugin import RunnerInstruments

    class Runner:
        vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_rank=3),
                                      model_config=SimpleNamespace(served_model_name="m"))
        speculative_config = SimpleNamespace(method="eagle", num_speculative_tokens=3)
        model_config = SimpleNamespace(get_vocab_size=lambda: 512)
        device = torch.device("cpu")

    port = free_port()
    instruments = RunnerInstruments(Runner(), environ={"SPEC_METRICS_PORT": str(port - 3)})
    try:
        assert instruments.rank == 3 and instruments.port == port
        assert instruments.server.host == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        # Series of a method appear with its first step; the constant labels at once.
        assert b"# TYPE spec_decode_drafts_total counter" in body
        assert b'spec_metrics_dropped_total{engine="vllm",model="m",reason=' in body
    finally:
        instruments.close()
