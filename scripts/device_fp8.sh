#!/usr/bin/env bash
# On the GPU machine (H200/H100: FP8 tensor cores, sm89+): the FP8 GPU tests (Triton kernels vs the torch
# references at DeepSeek-V3 shapes, the model from FP8 weights), the FP8 kernel tests under Triton's
# interpreter, then bench.gemm (FP8 vs bf16 TFLOP/s; JSON + PNG to bench/results/ and $OUT).
# Usage: OUT=DIR bash scripts/device_fp8.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_fp8}"
mkdir -p "$OUT"
source scripts/device_lib.sh  # what the image lacks, and step()
step 01_pytest_fp8_gpu 420 python3 -m pytest -q -p no:cacheprovider -rs -s --durations=10 tests/test_fp8_gpu.py
step 02_pytest_fp8_cpu 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fp8_kernels_ref.py
step 03_bench_gemm 420 python3 -m bench.gemm --out-dir bench/results
# The decode step with FP8 vs bf16 weights on the V2-Lite-shaped dummy model (issue goal: FP8 <= 0.65x at batch 1).
for q in none fp8; do
    step 04_decode_step_$q 300 python3 -m bench.decode_step --device cuda --model-config v2-lite --load-format dummy \
        --quantization $q --batch-sizes 1,8,64 --context 1024 --out "$OUT/decode_step_gpu_weights_$q.json"
done
cp bench/results/gemm_cuda.json bench/results/gemm_cuda.png "$OUT/" 2>/dev/null
exit $status
