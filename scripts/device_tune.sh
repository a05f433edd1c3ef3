#!/usr/bin/env bash
# On the GPU machine, one call: tile sweeps of the decode step's memory-bound kernels (bench.tune_gpu: masked
# MoE GEMMs, shared experts, skinny projections vs cuBLAS, MLA decode at 16 and 128 heads, FlashMLA beside it
# when an extension is carried), then the FP8 GPU tests with short tracebacks.
# Carry .gpu_bundle (scripts/make_gpu_bundle.sh); a FlashMLA build of your own may ride in .gpu_carry/
# (scripts/make_flashmla_carry.sh writes .gpu_carry/flashmla_src.tar.gz, built here by scripts/build_flashmla.sh
# into DIR/flash_mla_dense.so; nothing of FlashMLA is committed).
# Usage: OUT=DIR bash scripts/device_tune.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_tune}"
mkdir -p "$OUT" /tmp/device_tune_logs
source scripts/device_lib.sh
OUT_SAVED=$OUT OUT=/tmp/device_tune_logs
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/00_env.log"
flashmla_start "$OUT_SAVED" "$OUT"
step 01_tune_moe_dense 210 python3 -m bench.tune_gpu --only moe,dense --jobs 8 --out "$OUT_SAVED/tune_moe_dense.json"
left=$((330 - ($(date +%s) - start)))
flashmla_wait $((left > 10 ? left : 10))
step 02_tune_mla 150 python3 -m bench.tune_gpu --only mla16,mla128 --out "$OUT_SAVED/tune_mla.json"
left=$((585 - ($(date +%s) - start)))
step 03_pytest_fp8_gpu $((left > 30 ? left : 30)) python3 -m pytest -q -p no:cacheprovider -rf --tb=short -m gpu \
    tests/test_fp8_gpu.py
OUT=$OUT_SAVED
cat /tmp/device_tune_logs/*.log >"$OUT/device_tune.log"
exit $status
