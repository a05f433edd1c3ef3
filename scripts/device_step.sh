#!/usr/bin/env bash
# On the GPU machine, one call: the decode step against its floor (this tree with --profile, then the landed
# tree carried as .baseline), the GPU tests of the kernels, CUDA graphs and FP8, MLA decode with FlashMLA
# beside the Triton tiles (when a FlashMLA extension is carried or built from .gpu_carry/, which is never
# committed), and the FP8-weights decode step. Carry .gpu_bundle, .baseline, optionally .gpu_carry.
# Usage: OUT=DIR bash scripts/device_step.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_step}"
mkdir -p "$OUT" /tmp/device_step_logs
source scripts/device_lib.sh
OUT_SAVED=$OUT OUT=/tmp/device_step_logs
start=$(date +%s)
left() { local l=$(($1 - ($(date +%s) - start))); echo $((l > 20 ? l : 20)); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/00_env.log"
flashmla_start "$OUT_SAVED" "$OUT"
DS="--device cuda --model-config v2-lite --load-format dummy --batch-sizes 1,8,64 --context 1024"
step 01_decode_step 75 env TANDEM_MLA_DECODE=triton python3 -m bench.decode_step $DS --profile \
    --out "$OUT_SAVED/decode_step_gpu.json"
if [ -d .baseline ]; then
    step 02_decode_step_landed 60 env PYTHONPATH="$PWD/.baseline:$SITE" bash -c "cd .baseline && python3 -m \
bench.decode_step $DS --out $OUT_SAVED/decode_step_gpu_landed.json"
fi
step 03_pytest_gpu $(left ${TESTS_UNTIL:-300}) python3 -m pytest -q -p no:cacheprovider -rf --tb=line -m gpu \
    tests/test_cuda_graph.py tests/test_kernels_decode_fused.py tests/test_fp8_gpu.py ${TESTS_K:+-k "$TESTS_K"}
flashmla_wait 30
[ -n "${TANDEM_FLASHMLA_SO:-}" ] && step 04_tune_mla $(left 370) python3 -m bench.tune_gpu --quick --only mla16,mla128 \
    --out "$OUT_SAVED/tune_gpu_mla.json"
[ -z "${SKIP_FP8_STEP:-}" ] && step 05_decode_step_fp8 $(left 440) python3 -m bench.decode_step $DS --quantization fp8 \
    --out "$OUT_SAVED/decode_step_gpu_fp8.json"
OUT=$OUT_SAVED
cat /tmp/device_step_logs/*.log >"$OUT/device_step.log"
exit $status
