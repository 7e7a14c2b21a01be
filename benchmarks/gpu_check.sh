#!/usr/bin/env bash
# The CUDA path in one run, on a machine with one GPU, in under 5 minutes; every result
# goes to one file (and the terminal).
#
#   benchmarks/gpu_check.sh [RESULTS_FILE]        # default: gpu_check_<host>_<UTC time>.txt
#
# Run from a checkout whose environment has tokenfeed installed with its dev extra and a
# CUDA build of torch (the script activates ./.venv when there is one). Steps, each with
# its own time limit (seconds):
#   1. environment: GPU, driver, torch and its CUDA, tokenfeed --version, ulimit -l   (30)
#   2. tests/test_cuda.py: the registered ring, the non-blocking copy, events, the
#      seqlock checked after the copy's event, best fit on the device               (150)
#   3. the sample corpus the next steps read                                          (60)
#   4. benchmarks/latency.py --device cuda: next() p50/p99 with the ring full        (90)
#   5. a 1-rank NCCL job under torchrun: gather_states over NCCL, resume from it      (90)
#   6. a short training loop on the GPU: the trainer's stall share, its own clock
#      and the daemon's                                                               (90)
# The limits add up to 510 s; expected on an idle 16-core node: 2-4 minutes. A failed
# step is recorded and the next one runs; the last lines summarize, and the script exits
# 1 when any step failed (a skipped CUDA test counts as failed: it means no GPU).
#
# GPU_CHECK_DRY_RUN=1 runs steps 3-6 on the CPU (gloo, a tiny model, 5 steps) to check
# the script itself on a machine without a GPU; steps 1 and 2 then fail, as they should.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

OUT=${1:-gpu_check_$(hostname -s)_$(date -u +%Y%m%dT%H%M%SZ).txt}
WORK=$(mktemp -d /tmp/tfgpu-XXXXXX)
export WORK
trap 'rm -rf "$WORK"' EXIT
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu
    CHECK_FLAGS=(--cpu)
    TRAIN_FLAGS=(--steps 3 --warmup 2 --batch-size 2 --seq-len 64 --workers 1)
else
    DEVICE=cuda
    CHECK_FLAGS=()
    TRAIN_FLAGS=(--steps 300 --workers 4)
fi
: > "$OUT"
SUMMARY=()
FAILED=0

log() { printf '%s\n' "$*" | tee -a "$OUT"; }

# step NAME LIMIT_S COMMAND...: run it with a time limit, its output into the file
step() {
    local name=$1 limit=$2
    shift 2
    log ""
    log "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    local verdict=PASS
    if [ "$rc" -ne 0 ]; then
        verdict="FAIL (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
        FAILED=1
    fi
    log "-- $name: $verdict in ${took} s"
    SUMMARY+=("$name: $verdict in ${took} s")
}

environment() {
    date -u +"date: %Y-%m-%d %H:%M:%S UTC"
    echo "host: $(hostname), $(nproc) CPUs"
    git log -1 --format='commit: %H %s' 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: "
      f"{torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}")
PY
    tokenfeed --version
    echo "ulimit -l (memlock, KiB): $(ulimit -l)"
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
}

cuda_tests() {
    python -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$WORK/pytest.txt"
    local rc=${PIPESTATUS[0]}
    if grep -q "skipped" "$WORK/pytest.txt"; then
        echo "a CUDA test was skipped: no usable GPU in this run"
        return 1
    fi
    return "$rc"
}
export -f environment cuda_tests

log "tokenfeed GPU check: results in $OUT"
step "environment" 30 bash -c environment
step "tests/test_cuda.py" 150 bash -c cuda_tests
step "sample corpus" 60 python -c "
import sys
from tokenfeed.tools.corpus import build_sample_corpus
build_sample_corpus(sys.argv[1])
print('built', sys.argv[1])" "$WORK/corpus"
step "next() latency, device $DEVICE" 90 python benchmarks/latency.py --device "$DEVICE" \
    --data "$WORK/corpus" --workers 4 --max-quiet-wait-s 5
step "NCCL gather_states, 1 rank" 90 torchrun --standalone --nproc_per_node=1 \
    benchmarks/gpu_check.py nccl --data "$WORK/corpus" "${CHECK_FLAGS[@]}"
step "training loop stall share" 90 python benchmarks/gpu_check.py train \
    --data "$WORK/corpus" "${TRAIN_FLAGS[@]}" "${CHECK_FLAGS[@]}"

log ""
log "== summary"
for line in "${SUMMARY[@]}"; do log "$line"; done
log "results: $OUT"
exit "$FAILED"
