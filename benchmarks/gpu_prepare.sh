#!/usr/bin/env bash
# Run HERE (no GPU needed), before a session's one device call: fetch, as wheels
# for the GPU machine's Python 3.12, the packages its image lacks (swiftdp's
# accountant, Opacus for the comparison rows). They land in .whl/ (ignored by
# git through .git/info/exclude) and travel with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d .whl \
    dp-accounting==0.6.0 dm-tree==0.1.10 opacus==1.6.0 prv-accountant==0.2.0
ls -la .whl
