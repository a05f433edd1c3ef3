#!/usr/bin/env bash
# The README's main job on its embedded default: a tiny random-weight DeepSeek-V3 model on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR="${TANDEM_DEMO_MODEL:-runs/tiny-v3}"
[ -f "$MODEL_DIR/config.json" ] || python3 -m engine.tiny_model --out "$MODEL_DIR"
python3 -m engine.generate --model "$MODEL_DIR" --max-new-tokens 24 \
    --prompt "Prefill and decode" --prompt "disaggregated serving of MLA models"
