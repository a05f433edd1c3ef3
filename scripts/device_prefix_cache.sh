#!/usr/bin/env bash
# On the GPU machine: the multi-turn chat workload through router + 1 prefill + 1 decode (both on one GPU, NIXL
# cuda_ipc, V2-Lite-shaped dummy weights) with the prefix cache off, on prefill, and on prefill + decode-side reuse
# (bench.compare_prefix_cache): TTFT p50/p99, prefill tokens computed and KV bytes written per turn, JSON + PNG.
# Two bf16 V2-Lite workers take ~63 GB of weights beside their KV pools: run it on an H200.
# Carry .gpu_bundle (scripts/make_gpu_bundle.sh). PREFIX_ARGS replaces the workload flags (default: the README's).
# Usage: OUT=DIR bash scripts/device_prefix_cache.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_prefix_cache}"
mkdir -p "$OUT"
export UCX_MODULES="${UCX_MODULES:-^ib}"
source scripts/device_lib.sh
ARGS="${PREFIX_ARGS:---num-conversations 16 --num-turns 6 --system-prompt-len 2048 --turn-input-len 256 \
--turn-output-len 64}"
step prefix_cache_cuda 560 python3 -m bench.compare_prefix_cache --device cuda \
    --model engine/model_configs/deepseek-v2-lite --load-format dummy --cuda-graph-max-bs 16 $ARGS \
    --output-json "$OUT/prefix_cache_cuda.json" --log-dir /tmp/prefix_cache_logs
tail -n 40 /tmp/prefix_cache_logs/*/*.log 2>/dev/null | tail -n 300 >"$OUT/server_tails.log"
exit $status
