#!/usr/bin/env bash
# Everything the tests need on a fresh machine: Prometheus' promtool (Debian's `prometheus`
# package, 2.42 on Debian 12; rule, dashboard-query and end-to-end tests use the real thing)
# and a virtualenv with the project. torch is pinned to the build the machine has, so no
# dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo,dev,hf}"
if ! command -v promtool >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: install Prometheus >= 2.42 so that promtool and prometheus are on PATH" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # Without recommends: the package alone; with them it pulls ~420 MB.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e ".[$extras]"
