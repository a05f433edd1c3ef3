#!/usr/bin/env bash
# On the GPU machine: dual batch overlap (engine.dbo) on one GPU.
#   1. the GPU test: greedy tokens with DBO (dispatch/combine on a second CUDA stream) equal those without
#   2. bench.dbo_step on the V2-Lite-shaped dummy model: one forward with DBO on vs off at prefill-sized
#      batches (and decode 64 / 256), ratio + argmax agreement, JSON (+ PNG where matplotlib is there)
# One GPU holds every expert, so nothing is dispatched: the bench measures what splitting a step costs.
# Carry: .whl_small (orjson, msgspec, pyzmq cp312 wheels) or .gpu_bundle (scripts/make_gpu_bundle.sh).
# Usage: OUT=DIR bash scripts/device_dbo.sh   (then: python -m bench.dbo_step --replot DIR/dbo_step_gpu.json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_dbo}"
mkdir -p "$OUT"
source scripts/device_lib.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/00_env.log"
step 01_pytest_gpu 240 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_dbo.py
step 02_dbo_step 300 python3 -m bench.dbo_step --device cuda --model-config v2-lite --load-format dummy \
    --batches 2x512,4x512,8x512,4x1024,8x1024 --decode-batches 64,256 --out "$OUT/dbo_step_gpu.json"
exit $status
