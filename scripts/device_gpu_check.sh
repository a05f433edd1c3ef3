#!/usr/bin/env bash
# On the GPU machine (the device `run` tool, or any CUDA box): GPU kernel tests, then the kernel bench.
# Installs nothing: the image's torch + Triton are enough. Logs and JSON go to $OUT (default runs/device).
# Usage: bash scripts/device_gpu_check.sh [--quick]   (--quick: bench default tiles only, no sweeps)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

start=$(date +%s)
python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_gpu.py 2>&1 | tee "$OUT/pytest_kernels_gpu.log" \
    || status=1
echo "tests took $(($(date +%s) - start)) s" | tee -a "$OUT/pytest_kernels_gpu.log"

start=$(date +%s)
python3 -m bench.kernels_gpu --out "$OUT/kernels_gpu.json" "$@" 2>&1 | tee "$OUT/bench_kernels_gpu.log" || status=1
echo "bench took $(($(date +%s) - start)) s"
exit $status
