#!/usr/bin/env bash
# The lab's GPU check: one command, at most 8 minutes on one H200 (the steps' limits add up to 7.8).
#
#   bash benchmarks/gpu_check.sh                # on a CUDA machine, results in benchmarks/results/gpu/
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --quick --out /tmp/gpu   # its own test on a CPU
#
# Steps (each under its own time limit; a failed step is recorded and the others still run):
#   1. env        the device, torch / triton / fla versions
#   2. tests      the kernel tests (tests/test_kernels.py) and fla's Gated DeltaNet test
#   3. kernels    each Triton kernel against its PyTorch path on the device, and one FwPKM layer's
#                 training step with the Triton backend against the PyTorch one
#   4. layer      one layer's training step, ours vs the dense implementation, 128^2 to 1024^2 slots
#                 (benchmarks/bench_memory.py train --device cuda)
#   5. bandwidth  the device's copy bandwidth and the bandwidth each layer step achieved
#   6. model      a training step of the `paper` preset in bf16: tokens/s and model FLOP utilisation
#                 (benchmarks/bench_model.py train --device cuda --precision bf16-mixed)
#   7. gdn        fla's Gated DeltaNet kernel against the PyTorch path: difference and time
# Exit status: 0 when every step passed; the summary is <out>/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=benchmarks/results/gpu
QUICK=""
PEAK_TFLOPS=${GPU_CHECK_PEAK_TFLOPS:-989}   # dense bf16 of an H100/H200 SXM
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=--quick ;;
        --out) OUT=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (allowed: --quick, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log to OUT/NAME.log, record the outcome
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local outcome="ok"
    [ $rc -eq 124 ] && outcome="timed out"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && outcome="failed (exit $rc)"
    [ $rc -ne 0 ] && FAILED=1
    printf '%-10s %-18s %4ds  %s\n' "$name" "$outcome" $((SECONDS - t0)) "$*" | tee -a "$SUMMARY"
    [ $rc -ne 0 ] && tail -5 "$OUT/$name.log"
    return 0
}

if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch (set GPU_CHECK_DEVICE=cpu for the CPU run)" >&2
    exit 2
fi

if [ -n "$QUICK" ]; then  # tiny sizes: the check's own test
    LAYER_ARGS=(--n-subkeys 8 --dim 16 --chunk 16 --topk 2 --batch 1 --seq 40 --steps 1 --warmup 0
                --dense-steps 1 --dense-warmup 0)
    MODEL_ARGS=(--models preset:tiny --steps 1 --warmup 0 --rounds 1 --threads 1)
    TESTS=(tests/test_kernels.py -k "row_kernels_match_torch")
else
    LAYER_ARGS=(--n-subkeys 128 256 512 1024 --steps 10 --warmup 3 --rounds 2 --dense-max-n 1024)
    MODEL_ARGS=(--models preset:paper preset:paper-swa_interleave-pkm --steps 5 --warmup 2 --rounds 1 --threads 8)
    TESTS=(tests/test_kernels.py tests/test_layers.py -k "kernel or triton or fla")
fi
BACKEND=$([ "$DEVICE" = cuda ] && echo triton || echo torch)

step env 20 $PY benchmarks/gpu_check.py env --device "$DEVICE" --out "$OUT"
step tests 75 $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step kernels 60 $PY benchmarks/gpu_check.py kernels --device "$DEVICE" $QUICK --out "$OUT"
step layer 170 $PY benchmarks/bench_memory.py train --device "$DEVICE" --backend "$BACKEND" "${LAYER_ARGS[@]}" \
    --out "$OUT"
step bandwidth 25 $PY benchmarks/gpu_check.py bandwidth --device "$DEVICE" $QUICK --layer "$OUT/train.json" \
    --out "$OUT"
step model 90 $PY benchmarks/bench_model.py train --device "$DEVICE" \
    --precision "$([ "$DEVICE" = cuda ] && echo bf16-mixed || echo 32)" --peak-tflops "$PEAK_TFLOPS" \
    "${MODEL_ARGS[@]}" --out "$OUT"
step gdn 30 $PY benchmarks/gpu_check.py gdn --device "$DEVICE" $QUICK --out "$OUT"

echo "summary: $SUMMARY"
cat "$SUMMARY"
exit $FAILED
