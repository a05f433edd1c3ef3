#!/usr/bin/env bash
# On the GPU machine: serving throughput of the V2-Lite-shaped dummy model through router + 1 prefill + 1 decode
# (NIXL cuda_ipc) against 2 colocated workers, 4096 in / 100 out, at concurrency 8 (32 prompts) and 32 (64 prompts),
# for this tree and for the landed tree carried as .baseline (git archive <commit> | tar -x -C .baseline), then the
# decode step against its floor. Carry .gpu_bundle (scripts/make_gpu_bundle.sh) and .baseline.
# Usage: OUT=DIR bash scripts/device_serve_v2lite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_serve_v2lite}"
mkdir -p "$OUT" /tmp/serve_logs
export UCX_MODULES="${UCX_MODULES:-^ib}"
source scripts/device_lib.sh
OUT_SAVED=$OUT OUT=/tmp/serve_logs
ARGS="--device cuda --model engine/model_configs/deepseek-v2-lite --load-format dummy --input-len 4096 \
--output-len 100 --cuda-graph-max-bs 16 --disable-tqdm --max-duration-s 100"
for tree in new landed; do
    dir=$PWD; [ $tree = landed ] && dir=$PWD/.baseline
    [ -d "$dir" ] || continue
    step 0${tree}_c8 140 env PYTHONPATH="$dir:$SITE" bash -c "cd $dir && python3 -m bench.compare_pd $ARGS \
--num-prompts 32 --max-concurrency 8 --output-json $OUT_SAVED/compare_pd_v2lite_c8_$tree.json --log-dir /tmp/cpd_${tree}_c8"
    step 1${tree}_c32 140 env PYTHONPATH="$dir:$SITE" bash -c "cd $dir && python3 -m bench.compare_pd $ARGS \
--num-prompts 64 --max-concurrency 32 --output-json $OUT_SAVED/compare_pd_v2lite_c32_$tree.json --log-dir /tmp/cpd_${tree}_c32"
done
rm -f "$OUT_SAVED"/*_landed.png
OUT=$OUT_SAVED
cat /tmp/serve_logs/*.log >"$OUT/device_serve_v2lite.log"
tail -n 30 /tmp/cpd_*/*/*.log 2>/dev/null | tail -n 200 >"$OUT/server_tails.log"
exit $status
