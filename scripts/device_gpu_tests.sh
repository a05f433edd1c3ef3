#!/usr/bin/env bash
# On the GPU machine: every GPU-marked test, then bench.decode_step --profile (V2-Lite-shaped dummy model,
# CUDA graphs vs eager, top kernels of a graph step) and the same step on an FP8 KV pool. JSON and one log go to $OUT.
# Carry (device `run`): .gpu_bundle (see scripts/device_lib.sh). Usage: OUT=DIR bash scripts/device_gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_gpu_tests}"
mkdir -p "$OUT" /tmp/device_gpu_tests_logs
export UCX_MODULES="${UCX_MODULES:-^ib}"
source scripts/device_lib.sh  # what the image lacks, and step()
OUT_SAVED=$OUT OUT=/tmp/device_gpu_tests_logs
# The files by name: collecting all of tests/ imports the router tests, which need `openai` (not on the image).
step 01_pytest_gpu 360 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 -m gpu tests/test_kernels_gpu.py \
    tests/test_cuda_graph.py tests/test_kernels_norm.py tests/test_prefill_batcher.py tests/test_pd_gpu.py \
    tests/test_engine_plan.py tests/test_kv_messages.py tests/test_dynamic_a2a_gpu.py
step 02_decode_step 200 python3 -m bench.decode_step --device cuda --model-config v2-lite --load-format dummy \
    --batch-sizes 1,8,64 --context 1024 --profile --out "$OUT_SAVED/decode_step_gpu.json"
step 03_decode_step_fp8_kv 200 python3 -m bench.decode_step --device cuda --model-config v2-lite --load-format dummy \
    --batch-sizes 1,8,64 --context 1024 --kv-cache-dtype fp8_e4m3 --out "$OUT_SAVED/decode_step_gpu_kv_fp8_e4m3.json"
OUT=$OUT_SAVED
cat /tmp/device_gpu_tests_logs/*.log >"$OUT/device_gpu_tests.log"
exit $status
