#!/usr/bin/env bash
# The README's main-job command: set up .venv, then train with DP on bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/swiftdp train "$@"
