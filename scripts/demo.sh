#!/usr/bin/env bash
# The README's main job on its embedded default: router + 1 prefill + 1 decode worker (NIXL) on a tiny
# random-weight DeepSeek-V3 on CPU; a few streamed requests, their outputs, TTFT/ITL, clean shutdown.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/launch_1p1d.sh "$@"
