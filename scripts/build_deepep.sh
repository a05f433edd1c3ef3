#!/usr/bin/env bash
# Builds and installs DeepEP V1 (deep_ep.Buffer, NVSHMEM) at the pinned commit against the torch, CUDA
# and pip NVSHMEM (nvidia-nvshmem-cu12 / -cu13) already installed; see docs/deepep.md.
#
# Usage: scripts/build_deepep.sh [SOURCE]
#   SOURCE: a DeepEP checkout directory, or a tar archive of one (`git archive 567632d > deepep.tar`);
#           none: `git clone https://github.com/deepseek-ai/DeepEP` at the pinned commit (needs internet).
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST (default 9.0),
#   NVSHMEM_DIR (only for a non-pip NVSHMEM), CUDA_HOME (else nvcc's location is used).
# The source is built in a temporary copy (setup.py is edited there, never in SOURCE) that is removed after.
set -euo pipefail
DEEPEP_COMMIT=567632dd59810d77b3cc05553df953cc0f779799
PYTHON="${PYTHON:-python3}"
src="${1:-}"
start=$(date +%s)
work="$(mktemp -d "${TMPDIR:-/tmp}/deepep-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tree="$work/DeepEP"

if [ -z "$src" ]; then
    git clone -q https://github.com/deepseek-ai/DeepEP "$tree"
    git -C "$tree" checkout -q "$DEEPEP_COMMIT"
elif [ -d "$src" ]; then
    cp -r "$src" "$tree"
elif [ -f "$src" ]; then
    mkdir -p "$tree" && tar -xf "$src" -C "$tree"
else
    echo "build_deepep: no such source: $src" >&2
    exit 2
fi
[ -f "$tree/setup.py" ] && [ -f "$tree/deep_ep/buffer.py" ] || {
    echo "build_deepep: $src is not a DeepEP V1 tree (setup.py and deep_ep/buffer.py expected)" >&2
    exit 2
}

# NVSHMEM: setup.py finds the pip wheel (python module nvidia.nvshmem) by itself; say so up front
# instead of letting it build without internode/low-latency kernels.
if [ -z "${NVSHMEM_DIR:-}" ]; then
    if ! nvshmem_dir="$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("nvidia.nvshmem").submodule_search_locations[0])' 2>/dev/null)"; then
        echo "build_deepep: NVSHMEM not found: pip install nvidia-nvshmem-cu13 (or -cu12), or set NVSHMEM_DIR" >&2
        exit 3
    fi
    echo "build_deepep: NVSHMEM from pip: $nvshmem_dir"
fi

# CUDA 13 moved libcu++ (cuda/std/...) under include/cccl; DeepEP 567632d does not add that directory.
nvcc="${CUDA_HOME:+$CUDA_HOME/bin/nvcc}"
[ -n "$nvcc" ] && [ -x "$nvcc" ] || nvcc="$(command -v nvcc || true)"
[ -n "$nvcc" ] || { echo "build_deepep: nvcc not found (set CUDA_HOME)" >&2; exit 3; }
cuda_root="$(dirname "$(dirname "$(readlink -f "$nvcc")")")"
cccl=""
for dir in "$cuda_root/include/cccl" "$cuda_root"/targets/*/include/cccl; do
    [ -d "$dir" ] && { cccl="$dir"; break; }
done
if [ -n "$cccl" ]; then
    echo "build_deepep: adding $cccl to the include path"
    sed -i "s|include_dirs = \['csrc/'\]|include_dirs = ['csrc/', '$cccl']|" "$tree/setup.py"
    grep -q "$cccl" "$tree/setup.py" || { echo "build_deepep: could not patch setup.py's include_dirs" >&2; exit 4; }
else
    echo "build_deepep: no include/cccl next to $nvcc (fine before CUDA 13)"
fi

"$PYTHON" -c 'import torch; print(f"build_deepep: torch {torch.__version__}, CUDA {torch.version.cuda}")'
"$nvcc" --version | tail -1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# --no-build-isolation: setup.py imports torch, which an isolated build environment lacks.
(cd "$tree" && "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index .)
(cd "$work" && "$PYTHON" -c 'import deep_ep, deep_ep_cpp; print("build_deepep: imported", deep_ep.__file__, "sm90:", deep_ep.Buffer.is_sm90_compiled())')
echo "build_deepep: built and installed in $(($(date +%s) - start)) s"
