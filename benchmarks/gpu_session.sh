#!/usr/bin/env bash
# The GPU session's one prepared run (issue 13, must-have 4), at most 520 s on
# an H200. Prepare here first: `bash benchmarks/gpu_prepare.sh`; then one device
# call with carry [".whl"], timeout_s 570 and the command `bash benchmarks/gpu_session.sh`.
# Everything lands in $OUT (at most 8 files come back): log.txt, suite/ (the
# suite at a fixed batch, nonprivate against swiftdp) and maxb/ (the largest
# batch for two models against non-private and Opacus ghost). Each part has its
# own timeout and the run goes on past a failed part: a failure is a finding.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
# SMOKE=1: a dry run of the script itself on a CPU (tiny bench, no largest batch).
DEV=(--device cuda); [ "${SMOKE:-0}" = 1 ] && DEV=(--device cpu --quick --models mlp)
part() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; shift; "$@" 2>&1 | tee -a "$LOG"; echo "=== rc ${PIPESTATUS[0]}" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1; then
    part "wheels" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
part "machine" bash -c "nvidia-smi -L || true; $PY -c 'import torch, swiftdp; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'"
# CUDA-only tests (device noise, fp16 autocast with GradScaler), skipped on the CPU.
part "cuda tests" timeout 80 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/optim/test_device_noise.py tests/clipping/test_mixed_precision.py
# No host synchronisation in a steady step (set_sync_debug_mode("error") and HostReads).
part "sync check" timeout 80 "$PY" benchmarks/gpu_sync_check.py --batch-size 64
# The suite at its fixed batches, timed synchronised, peak = max_memory_allocated.
part "suite" timeout 200 "$PY" -m swiftdp.bench "${DEV[@]}" --no-max-batch \
    --methods nonprivate,swiftdp --steps 10 --min-steps 5 --budget-s 2 --timeout-s 40 \
    --no-progress --out "$OUT/suite"
# The largest batch that fits (doubling then bisection), two models.
[ "${SMOKE:-0}" = 1 ] || part "largest batch" timeout 160 "$PY" -m swiftdp.bench --device cuda --max-batch \
    --models resnet18,gpt --methods nonprivate,swiftdp,opacus-ghost --steps 5 --min-steps 3 \
    --budget-s 1 --timeout-s 50 --no-progress --out "$OUT/maxb"  # a cut run leaves results.partial.jsonl
echo "=== done ($(date +%T))" | tee -a "$LOG"
