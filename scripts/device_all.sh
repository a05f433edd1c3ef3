#!/usr/bin/env bash
# On the GPU machine, one call: the decode step against its floor with bf16 and FP8 weights (V2-Lite-shaped
# dummy model), FP8 GEMM vs bf16 (bench.gemm), then every GPU-marked test of the kernels, CUDA graphs, FP8
# weights, FP8 KV and the memory plan. Carry .gpu_bundle (scripts/make_gpu_bundle.sh) or .whl_small.
# Usage: OUT=DIR bash scripts/device_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_all}"
mkdir -p "$OUT" /tmp/device_all_logs
source scripts/device_lib.sh
OUT_SAVED=$OUT OUT=/tmp/device_all_logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/00_env.log"
step 01_decode_step 200 python3 -m bench.decode_step --device cuda --model-config v2-lite --load-format dummy \
    --batch-sizes 1,8,64 --context 1024 --profile --out "$OUT_SAVED/decode_step_gpu.json"
step 02_decode_step_fp8 200 python3 -m bench.decode_step --device cuda --model-config v2-lite --load-format dummy \
    --quantization fp8 --batch-sizes 1,8,64 --context 1024 --out "$OUT_SAVED/decode_step_gpu_fp8.json"
step 03_bench_gemm 150 python3 -m bench.gemm --out-dir "$OUT_SAVED"
step 04_pytest_gpu 240 python3 -m pytest -q -p no:cacheprovider -rs --durations=8 -m gpu -x \
    tests/test_kernels_decode_fused.py tests/test_cuda_graph.py tests/test_kernels_gpu.py tests/test_kernels_norm.py \
    tests/test_fp8_gpu.py tests/test_kv_cache_fp8.py tests/test_engine_plan.py
OUT=$OUT_SAVED
cat /tmp/device_all_logs/*.log >"$OUT/device_all.log"
exit $status
