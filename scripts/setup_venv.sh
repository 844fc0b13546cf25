#!/usr/bin/env bash
# Create (or reuse) the repo-local .venv with everything swiftdp needs.
# torch is installed first, pinned, so pip takes the CPU wheel on disk and no
# other package can pull a CUDA build of a newer torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.swiftdp-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[dev,prv,bench,hf]" "torch==2.13.0"
    touch "$STAMP"
fi
