#!/usr/bin/env bash
# On the GPU machine (the device `run` tool, or any CUDA box), issue 8's final checks, in order, each
# time-boxed and guarded so one failure does not stop the rest; every log and JSON goes to $OUT:
#   1. GPU tests: CUDA-graph decode + Triton kernels (pytest -m gpu)
#   2. bench.decode_step: CUDA graphs vs eager on the V2-Lite-shaped dummy model in bf16
#   3. greedy tokens of the tiny float32 model: engine.generate on CPU and GPU, and LLM with graphs on GPU
# Installs only what the image lacks, from .whl_small (orjson, msgspec, pyzmq wheels) when present.
# Usage: OUT=DIR bash scripts/device_final.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device}"
mkdir -p "$OUT"
source scripts/device_lib.sh  # wheels the image lacks, and step()

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

step pytest_gpu 80 python3 -m pytest -v -p no:cacheprovider -rs --durations=8 -m gpu -x \
    tests/test_cuda_graph.py tests/test_kernels_gpu.py

step bench_decode_step 85 python3 -m bench.decode_step --device cuda --load-format dummy --model-config v2-lite \
    --batch-sizes 1,8,64 --context 1024 --out "$OUT/decode_step_gpu.json"
[ -f "$OUT/decode_step_gpu.json" ] && cp "$OUT/decode_step_gpu.json" bench/results/decode_step_gpu.json

TINY=/tmp/tandem_tiny_v3
PROMPTS='[[5, 17, 90, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 7, 7, 7, 7, 7], [300, 2, 9, 11]]'
python3 -m engine.tiny_model --out "$TINY" --variant v3 --seed 3 >/dev/null 2>&1 || status=1
for dev in cpu cuda; do
    step "generate_$dev" 25 python3 -m engine.generate --model "$TINY" --device "$dev" --dtype float32 \
        --prompt-token-ids "$PROMPTS" --max-new-tokens 24 --ignore-eos --page-size 16 --num-pages 64 --json
done
step generate_cuda_graphs 40 python3 - "$TINY" "$PROMPTS" "$OUT" <<'EOF'
import json, sys
from pathlib import Path

from engine.llm import LLM
from engine.sampling import SamplingParams

model_dir, prompts, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
tokens = {}
for name, device, max_bs in (("cpu", "cpu", 0), ("cuda_eager", "cuda", 0), ("cuda_graphs", "cuda", 4)):
    llm = LLM(model_dir, device=device, dtype="float32", page_size=16, num_pages=64, cuda_graph_max_bs=max_bs)
    tokens[name] = [o.token_ids for o in llm.generate(prompts, params)]
    runner = llm.graph_runner
    llm.close()
    print(name, tokens[name], f"(static steps {runner.static_steps})" if runner else "")
same = {k: v == tokens["cpu"] for k, v in tokens.items()}
print("same greedy tokens as CPU:", same)
(out / "greedy_tokens.json").write_text(json.dumps({"tokens": tokens, "same_as_cpu": same}, indent=1) + "\n")
sys.exit(0 if all(same.values()) else 1)
EOF
exit $status
