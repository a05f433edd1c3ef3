#!/usr/bin/env bash
# On the GPU machine (the device `run` tool, or any CUDA box): serving on one GPU and where a decode step's
# time goes; each step time-boxed and guarded; JSON (+ PNG) and one log go to $OUT (≤ 8 files come back):
#   1. bench.compare_pd --device cuda: 1P1D (NIXL, cuda_ipc) vs 2 colocated workers, tiny model, CUDA graphs;
#      at concurrency 8 and at concurrency 1 (the fixed TTFT cost of disaggregation)
#   2. bench.decode_step --profile: V2-Lite-shaped dummy model, eager vs graphs, top kernels of a graph step
# Carry (device `run`): .gpu_bundle (see scripts/device_lib.sh). Usage: OUT=DIR bash scripts/device_serve.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_serve}"
mkdir -p "$OUT" /tmp/device_serve_logs
export UCX_MODULES="${UCX_MODULES:-^ib}"
source scripts/device_lib.sh  # what the image lacks, and step()
OUT_SAVED=$OUT OUT=/tmp/device_serve_logs  # step() logs aside; joined into one file at the end
step 01_compare_pd_c8 240 python3 -m bench.compare_pd --device cuda --cuda-graph-max-bs 8 --disable-tqdm \
    --output-json "$OUT_SAVED/compare_pd_cuda.json" --log-dir /tmp/compare_pd_c8
step 02_compare_pd_c1 240 python3 -m bench.compare_pd --device cuda --cuda-graph-max-bs 8 --disable-tqdm \
    --max-concurrency 1 --num-prompts 16 --output-json "$OUT_SAVED/compare_pd_cuda_c1.json" \
    --log-dir /tmp/compare_pd_c1
step 03_decode_step 200 python3 -m bench.decode_step --device cuda --model-config v2-lite --load-format dummy \
    --batch-sizes 1,8,64 --context 1024 --profile --out "$OUT_SAVED/decode_step_gpu.json"
OUT=$OUT_SAVED
cat /tmp/device_serve_logs/*.log >"$OUT/device_serve.log"
exit $status
