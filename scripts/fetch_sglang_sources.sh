#!/usr/bin/env bash
# The sglang wheels whose source tests/integrations/test_sglang_source.py reads with `ast`
# (sglang is never imported: on a CPU machine it pulls torch, triton and more). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/sglang-wheels
mkdir -p "$dest"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
for version in 0.5.11 0.5.12 0.5.23; do
    ls "$dest"/sglang-"$version"-*.whl >/dev/null 2>&1 && continue
    "$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        "sglang==$version" -d "$dest" 2>&1 | grep -v '^WARNING: Location' || true
    ls "$dest"/sglang-"$version"-*.whl >/dev/null 2>&1 \
        || { echo "fetch_sglang_sources: sglang $version could not be downloaded" >&2; exit 1; }
done
