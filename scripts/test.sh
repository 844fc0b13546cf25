#!/usr/bin/env bash
# The README's test command: set up .venv, lint, type-check, check import contracts, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
.venv/bin/python -m ruff check src tests examples $(ls -d benchmarks 2>/dev/null)
.venv/bin/python -m mypy
.venv/bin/lint-imports --no-logo
.venv/bin/python -m pytest -q -n 2 "$@"
