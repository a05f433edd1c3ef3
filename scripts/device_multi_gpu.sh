#!/usr/bin/env bash
# On a two-GPU machine (device kind nvidia-h200-x2 / nvidia-h100-x2), issue 22's CUDA-graph EP decode checks,
# each time-boxed and guarded so one failure does not stop the rest; logs, JSON and PNG go to $OUT:
#   1. the decode step with CUDA graphs vs eager at tp 2 (dp 2, EP 2), V2-Lite shapes with dummy weights,
#      batch 1 / 8 / 64 per DP group, and one prefill-sized step with DBO on vs off across the two GPUs
#      (bench.ep_decode_step: NCCL, rank r on cuda:r)
#   2. greedy tokens of the tiny float32 model through the graph runner at tp 2 dp 2 equal the single-rank
#      run, the instance on the GPUs with graphs captured (tests/test_ep_graphs.py, EP_GRAPH_DEVICE=cuda;
#      tp 4 skips on two GPUs), and the masked EP path's gloo checks
#   3. the NCCL EP dispatch/combine test (pytest -m gpu tests/test_multirank_ep.py)
#   4. with four GPUs or more (nvidia-h200-x4 / -x8): bench.elastic_ep --device cuda, router + prefill + a decode
#      instance at tp 2 dp 2 with EPLB (a rebalance every 16 steps) scaling 2 -> 4 -> 2 GPUs over NCCL while 32
#      streams run: requests completed, tokens equal to the static run, each scale's wall time and the longest
#      token gap clients saw
# Usage: OUT=DIR bash scripts/device_multi_gpu.sh   (carry .whl_small if the image lacks orjson/msgspec/pyzmq)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_multi_gpu}"
mkdir -p "$OUT"
# NVLink multicast/SHARP stays off on these machines (KINDS.md).
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
source scripts/device_lib.sh  # wheels the image lacks, and step()

nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>&1 | tee "$OUT/env.txt"

step ep_decode_step 420 python3 -m bench.ep_decode_step --tp 2 --device cuda --model-config v2-lite \
    --batch-sizes 1,8,64 --context 1024 --prefill 2x512,4x512 --out "$OUT/ep_decode_step_gpu.json"
step ep_graph_tests 240 env EP_GRAPH_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_ep_graphs.py
step nccl_ep_test 120 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_multirank_ep.py
if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
    step elastic_ep_gpu 420 env UCX_MODULES="${UCX_MODULES:-^ib}" python3 -m bench.elastic_ep --device cuda \
        --out "$OUT/elastic_ep_cuda"
fi

exit $status
