"""The sglang adapter against sglang's real source: for every release it claims
(`SUPPORTED_SGLANG_VERSIONS`), the wheel's `req_time_stats.py`, read with `ast`, has exactly
the setters, `set_time_batch` arguments and spec stages (names and trace levels) the
adapter declares for it — present where claimed, absent where the docs say they were
removed. The wheels come from scripts/fetch_sglang_sources.sh (run by scripts/setup.sh)."""

from __future__ import annotations

import ast
import inspect
import os
import zipfile
from pathlib import Path

import pytest

from spec_metrics.integrations.sglang import (
    SET_FUNCS,
    SGLANG_SETTERS,
    SGLANG_STAGES,
    SUPPORTED_SGLANG_VERSIONS,
    SglangSpecAdapter,
)

WHEELS = Path(__file__).resolve().parents[2] / ".cache" / "sglang-wheels"
MODULE = "sglang/srt/observability/req_time_stats.py"
SET_TIME_BATCH_PARAMS = ["reqs", "set_func", "trace_only", "attrs"]


def source(version: str) -> ast.Module:
    wheels = sorted(WHEELS.glob(f"sglang-{version}-*.whl"))
    if not wheels:
        message = (f"sglang {version}'s wheel is not in {WHEELS}: run "
                   "scripts/fetch_sglang_sources.sh (scripts/setup.sh does)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with zipfile.ZipFile(wheels[0]) as wheel:
        return ast.parse(wheel.read(MODULE).decode("utf-8"))


def setters(tree: ast.Module) -> set[str]:
    """set_spec_* methods of SchedulerReqTimeStats."""
    (stats,) = [node for node in tree.body
                if isinstance(node, ast.ClassDef) and node.name == "SchedulerReqTimeStats"]
    return {node.name for node in stats.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("set_spec_")}


def spec_stages(tree: ast.Module) -> dict[str, int]:
    """RequestStage's `X = RequestStageConfig("spec_...", level=N)` entries."""
    (stage_class,) = [node for node in tree.body
                      if isinstance(node, ast.ClassDef) and node.name == "RequestStage"]
    stages = {}
    for node in stage_class.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            call = node.value
            if getattr(call.func, "id", None) != "RequestStageConfig" or not call.args:
                continue
            name = ast.literal_eval(call.args[0])
            levels = [ast.literal_eval(k.value) for k in call.keywords if k.arg == "level"]
            if name.startswith("spec_"):
                stages[name] = levels[0]
    return stages


def set_time_batch_params(tree: ast.Module) -> list[str]:
    (function,) = [node for node in tree.body
                   if isinstance(node, ast.FunctionDef) and node.name == "set_time_batch"]
    return [arg.arg for arg in function.args.args]


@pytest.mark.parametrize("version", SUPPORTED_SGLANG_VERSIONS)
def test_setters_exist_exactly_as_declared(version):
    declared = set(SGLANG_SETTERS[version])
    assert declared <= set(SET_FUNCS)
    assert setters(source(version)) == declared


@pytest.mark.parametrize("version", SUPPORTED_SGLANG_VERSIONS)
def test_spec_stages_and_trace_levels_exist_exactly_as_declared(version):
    assert spec_stages(source(version)) == SGLANG_STAGES[version]


@pytest.mark.parametrize("version", SUPPORTED_SGLANG_VERSIONS)
def test_set_time_batch_takes_the_adapters_arguments(version):
    assert set_time_batch_params(source(version)) == SET_TIME_BATCH_PARAMS
    # The adapter's drop-in takes the same arguments, in the same order.
    ours = list(inspect.signature(SglangSpecAdapter.set_time_batch).parameters)[1:]
    assert ours == SET_TIME_BATCH_PARAMS


def test_0_5_23_removed_verify_end_and_draft_extend():
    """What the docs say changed in 0.5.23, read from its source."""
    tree = source("0.5.23")
    names = setters(tree)
    assert "set_spec_verify_end_time" not in names
    assert not {"set_spec_draft_extend_start_time", "set_spec_draft_extend_end_time"} & names
    assert "spec_draft_extend" not in spec_stages(tree)
