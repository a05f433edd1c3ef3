#!/usr/bin/env bash
# On the GPU machine (the device `run` tool, or any CUDA box): issue 10's KV-transfer measurements between
# two processes, each with its own pool (source on --device, destination on --dst-device; one GPU by
# default, e.g. SRC=cuda:0 DST=cuda:1 for two), then 1P1D against colocated serving on the GPU; each step
# time-boxed and guarded. $OUT gets the JSON + PNG of each step and one log (device calls bring back at
# most 8 files):
#   1. NIXL (UCX cuda_ipc): 1/16/64-token pages, 1k-32k-token prompts, default and no-thread variants
#   2. Mooncake cuda13 wheel, protocol nvlink_intra (its intra-node CUDA IPC transport)
#   3. bench.compare_pd --device cuda: router + 1 prefill + 1 decode vs router + 2 colocated, tiny model
# Carry (device `run`): .gpu_bundle (NIXL and Mooncake trimmed to what loads, plus the small wheels; see
# scripts/device_lib.sh). Usage: OUT=DIR [SRC=cuda:0 DST=cuda:0] bash scripts/device_kv.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_kv}"
SRC="${SRC:-cuda:0}"
DST="${DST:-$SRC}"
mkdir -p "$OUT" /tmp/device_kv_logs
# No RDMA NIC: UCX's IB module can crash at exit (TRANSPORTS.md).
export UCX_MODULES="${UCX_MODULES:-^ib}"
source scripts/device_lib.sh  # what the image lacks, and step()
LOGS=/tmp/device_kv_logs
{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    grep PRETTY_NAME /etc/os-release
    python3 -c "import nixl; print('nixl', nixl.__file__)"
    python3 -c "import mooncake.engine as m; print('mooncake engine', m.__file__)"
} >"$LOGS/00_env.log" 2>&1

OUT_SAVED=$OUT OUT=$LOGS  # step() tees each step's log into $OUT: keep them aside, join them at the end
step 01_kv_nixl 240 python3 -m bench.kv_transfer --engine nixl --device "$SRC" --dst-device "$DST" \
    --prompts 1024,4096,16384,32768 --variants default,threads0 --case-budget-s 1.5 \
    --json "$OUT_SAVED/kv_transfer_cuda_nixl.json"
step 02_kv_mooncake_nvlink_intra 120 python3 -m bench.kv_transfer --engine mooncake --device "$SRC" \
    --dst-device "$DST" --mooncake-protocol nvlink_intra --page-sizes 16,64 --prompts 1024,4096,32768 \
    --variants default --case-budget-s 1 --json "$OUT_SAVED/kv_transfer_cuda_mooncake_nvlink_intra.json"
step 03_compare_pd 240 python3 -m bench.compare_pd --device cuda --cuda-graph-max-bs 8 --disable-tqdm \
    --output-json "$OUT_SAVED/compare_pd_cuda.json" --log-dir /tmp/compare_pd_logs
OUT=$OUT_SAVED
tail -n 30 /tmp/compare_pd_logs/*/*.log >"$LOGS/04_compare_pd_server_tails.log" 2>&1
cat "$LOGS"/*.log >"$OUT/device_kv.log"
exit $status
