#!/usr/bin/env bash
# On the GPU machine: the decode step against its floor (issue: one GPU at its weight-read floor).
#   1. GPU tests of the fused decode ops, CUDA-graph decode (tiny float32 model: greedy tokens equal CPU,
#      eager and graphs), the Triton kernels, and the memory plan
#   2. bench.decode_step --profile on the V2-Lite-shaped dummy model: step / floor, kernels per step, PNG
#   3. the same bench from the landed tree (carried as .baseline, made by:
#      git archive <landed commit> engine kernels bench kvtransfer decode_worker prefill_worker | tar -x -C .baseline)
#   4. bench.kernels_gpu --quick (MLA decode at 16 and 128 heads, MoE GEMMs, SDPA prefill)
# Carry: .whl_small (orjson, msgspec, pyzmq cp312 wheels; or .gpu_bundle, scripts/make_gpu_bundle.sh) and .baseline.
# Usage: OUT=DIR bash scripts/device_floor.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_floor}"
mkdir -p "$OUT" /tmp/device_floor_logs
source scripts/device_lib.sh
OUT_SAVED=$OUT OUT=/tmp/device_floor_logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/00_env.log"
step 01_pytest_gpu 300 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 -m gpu \
    tests/test_kernels_decode_fused.py tests/test_cuda_graph.py tests/test_kernels_gpu.py tests/test_kernels_norm.py
step 02_decode_step 240 python3 -m bench.decode_step --device cuda --model-config v2-lite --load-format dummy \
    --batch-sizes 1,8,64 --context 1024 --profile --out "$OUT_SAVED/decode_step_gpu.json"
if [ -d .baseline ]; then
    step 03_decode_step_landed 150 env PYTHONPATH="$PWD/.baseline:$SITE" bash -c "cd .baseline && python3 -m \
bench.decode_step --device cuda --model-config v2-lite --load-format dummy --batch-sizes 1,8,64 --context 1024 \
--out $OUT_SAVED/decode_step_gpu_landed.json"
fi
step 04_kernels_gpu 150 python3 -m bench.kernels_gpu --quick --out "$OUT_SAVED/kernels_gpu.json"
OUT=$OUT_SAVED
cat /tmp/device_floor_logs/*.log >"$OUT/device_floor.log"
exit $status
