#!/usr/bin/env bash
# On a two-GPU machine (device kind nvidia-h200-x2, or any box with 2 NVLink-joined GPUs), issue 11's
# checks in order, each time-boxed and guarded so one failure does not stop the rest; logs and JSON go
# to $OUT:
#   1. build DeepEP V1 from the carried source archive (scripts/build_deepep.sh), unless it imports already
#   2. pytest -m gpu: deepep vs a2a dispatch/combine (normal + low-latency) and the NCCL EP test
#   3. KV transfer GPU 0 -> GPU 1 (bench.kv_transfer --device cuda:0 --dst-device cuda:1, NIXL VRAM->VRAM)
#   4. 1P1D across the GPUs: prefill on GPU 0, decode on GPU 1 (--device cuda), tiny model, greedy
# Usage: OUT=DIR [DEEPEP_SRC=.deepep_src/deepep-567632d.tar] bash scripts/device_two_gpu.sh
# Carry (device `run`): .deepep_src (git archive of DeepEP 567632d, ~1.8 MiB) and .whl_small if the image
# lacks orjson/msgspec/pyzmq.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_two_gpu}"
mkdir -p "$OUT"
DEEPEP_SRC="${DEEPEP_SRC:-.deepep_src/deepep-567632d.tar}"
# NVLink multicast/SHARP stays off on these machines (KINDS.md): NCCL, NVSHMEM and torch symmetric memory.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# No RDMA NIC: UCX's IB module can crash at exit (TRANSPORTS.md).
export UCX_MODULES="${UCX_MODULES:-^ib}"
source scripts/device_lib.sh  # wheels the image lacks, and step()

{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    nvidia-smi topo -m
    ls /sys/class/infiniband 2>/dev/null || echo "no /sys/class/infiniband (no RDMA NIC)"
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee "$OUT/env.txt"

if python3 -c "import deep_ep" 2>/dev/null; then
    echo "deep_ep already importable" | tee "$OUT/build_deepep.log"
else
    step build_deepep 240 bash scripts/build_deepep.sh "$DEEPEP_SRC"
fi

step pytest_gpu_ep 180 python3 -m pytest -v -p no:cacheprovider -rs --durations=8 -m gpu \
    tests/test_ep_deepep.py tests/test_multirank_ep.py

step kv_transfer_gpu0_to_gpu1 240 python3 -m bench.kv_transfer --engine nixl --device cuda:0 --dst-device cuda:1 \
    --quick --json "$OUT/kv_transfer_cuda0_to_cuda1.json"

# 1P1D across the GPUs. Workers place rank r on cuda:r, so each worker sees both GPUs with its own first:
# CUDA_VISIBLE_DEVICES reorders rather than hides (hiding the peer GPU would keep UCX from cuda_ipc).
TINY=/tmp/tandem_tiny_v3
python3 -m engine.tiny_model --out "$TINY" --variant v3 --seed 3 >/dev/null 2>&1 || status=1
pd_across_gpus() {
    local pids=() common=(--model "$TINY" --host 127.0.0.1 --device cuda --dtype float32 --transfer-backend nixl
                          --page-size 16 --max-total-tokens 16384 --log-level warning)
    CUDA_VISIBLE_DEVICES=0,1 setsid python3 -m prefill_worker "${common[@]}" --port 30000 --bootstrap-port 8998 \
        >"$OUT/pd_prefill.log" 2>&1 & pids+=("$!")
    CUDA_VISIBLE_DEVICES=1,0 setsid python3 -m decode_worker "${common[@]}" --port 30001 \
        >"$OUT/pd_decode.log" 2>&1 & pids+=("$!")
    setsid python3 -m router --host 127.0.0.1 --port 8000 --prefill http://127.0.0.1:30000 8998 \
        --decode http://127.0.0.1:30001 --log-level warning >"$OUT/pd_router.log" 2>&1 & pids+=("$!")
    local rc=1
    for _ in $(seq 1 240); do
        curl -sf -o /dev/null http://127.0.0.1:30000/health && curl -sf -o /dev/null http://127.0.0.1:30001/health \
            && curl -sf -o /dev/null http://127.0.0.1:8000/health && { rc=0; break; }
        sleep 0.5
    done
    if [ "$rc" -eq 0 ]; then
        for i in 0 1 2 3; do
            curl -sf http://127.0.0.1:8000/generate -H 'Content-Type: application/json' \
                -d "{\"text\": \"prefill on GPU 0, decode on GPU 1, request $i\", \"sampling_params\": \
{\"max_new_tokens\": 24, \"temperature\": 0, \"ignore_eos\": true}}" || rc=1
            echo
        done | tee "$OUT/pd_across_gpus_outputs.jsonl"
        nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv
    else
        echo "workers not healthy; see pd_*.log"
    fi
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 3
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    return "$rc"
}
step pd_across_gpus 200 bash -c "$(declare -f pd_across_gpus); OUT='$OUT' TINY='$TINY' pd_across_gpus"

exit $status
