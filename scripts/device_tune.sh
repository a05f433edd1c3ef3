#!/usr/bin/env bash
# On the GPU machine, one call: tile sweeps of the decode step's memory-bound kernels (bench.tune_gpu: masked
# MoE GEMMs, shared experts, MLA decode at 16 and 128 heads), then the FP8 GPU tests with short tracebacks.
# Carry .gpu_bundle (scripts/make_gpu_bundle.sh). Usage: OUT=DIR bash scripts/device_tune.sh [ONLY]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_tune}"
mkdir -p "$OUT" /tmp/device_tune_logs
source scripts/device_lib.sh
OUT_SAVED=$OUT OUT=/tmp/device_tune_logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/00_env.log"
step 01_tune 300 python3 -m bench.tune_gpu --only "${1:-moe,dense,mla16,mla128}" --out "$OUT_SAVED/tune_gpu.json"
step 02_pytest_fp8_gpu 240 python3 -m pytest -q -p no:cacheprovider -rf --tb=short --durations=5 -m gpu \
    tests/test_fp8_gpu.py
OUT=$OUT_SAVED
cat /tmp/device_tune_logs/*.log >"$OUT/device_tune.log"
exit $status
