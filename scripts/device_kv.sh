#!/usr/bin/env bash
# On the GPU machine (the device `run` tool, or any CUDA box): issue 10's KV-transfer measurements between
# two processes, each with its own pool (source on --device, destination on --dst-device; one GPU by
# default, e.g. SRC=cuda:0 DST=cuda:1 for two), each step time-boxed and guarded; logs and JSON go to $OUT:
#   1. NIXL (UCX cuda_ipc): 16/64-token pages, 1k/4k/32k-token prompts, default and no-thread variants
#   2. Mooncake cuda13 wheel, protocol tcp, then nvlink_intra (its intra-node CUDA IPC transport)
# Carry (device `run`): .gpu_bundle (NIXL and Mooncake trimmed to what loads, plus the small wheels; see
# scripts/device_lib.sh). Usage: OUT=DIR [SRC=cuda:0 DST=cuda:0] bash scripts/device_kv.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_kv}"
SRC="${SRC:-cuda:0}"
DST="${DST:-$SRC}"
mkdir -p "$OUT"
# No RDMA NIC: UCX's IB module can crash at exit (TRANSPORTS.md).
export UCX_MODULES="${UCX_MODULES:-^ib}"
source scripts/device_lib.sh  # what the image lacks, and step()

{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    grep PRETTY_NAME /etc/os-release
    ldconfig -p | grep -E "libibverbs.so.1|libmlx5.so.1|libnuma.so.1|libcurl.so.4" || true
    python3 -c "import nixl; print('nixl', nixl.__file__)"
    python3 -c "import mooncake.engine as m; print('mooncake engine', m.__file__)"
} 2>&1 | tee "$OUT/env.txt"

step kv_nixl 330 python3 -m bench.kv_transfer --engine nixl --device "$SRC" --dst-device "$DST" \
    --page-sizes 16,64 --prompts 1024,4096,32768 --variants default,threads0 --case-budget-s 1.5 \
    --json "$OUT/kv_transfer_cuda_nixl.json"
for protocol in tcp nvlink_intra; do
    step "kv_mooncake_$protocol" 100 python3 -m bench.kv_transfer --engine mooncake --device "$SRC" \
        --dst-device "$DST" --mooncake-protocol "$protocol" --page-sizes 64 --prompts 1024,4096 \
        --variants default --case-budget-s 1 --json "$OUT/kv_transfer_cuda_mooncake_$protocol.json"
done
exit $status
