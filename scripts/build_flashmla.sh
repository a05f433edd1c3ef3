#!/usr/bin/env bash
# Builds FlashMLA's sm90 dense MLA decode alone as the extension module `flash_mla_dense` on the GPU host, from
# the tarball scripts/make_flashmla_carry.sh writes, touching no network and no git: a two-line binding of its
# dense_decode_fwd plus the three sources that kernel needs (the bf16 split-KV kernel, the scheduling metadata
# and the split combine), compiled with FlashMLA's own nvcc flags for sm_90a. kernels/flashmla_decode.py loads
# it from TANDEM_FLASHMLA_SO.
#
# Usage: scripts/build_flashmla.sh [TARBALL] [OUT_SO]
#   (defaults .gpu_carry/flashmla_src.tar.gz and $FLASHMLA_DIR/flash_mla_dense.so)
# Environment: PYTHON (default python3), FLASHMLA_DIR (scratch, default /tmp/flashmla), CUDA_HOME (else nvcc's
# location), NVCC_THREADS. Prints the TANDEM_FLASHMLA_SO line; exits non-zero with the compiler's tail when the
# build or the import fails. The three kernel sources compile with CUDA 13.0's nvcc for sm_90a as flagged here
# (checked off the GPU host: 1 min 51 s for the split-KV kernel on two cores); the whole build has yet to run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
src="${1:-.gpu_carry/flashmla_src.tar.gz}"
dest="${FLASHMLA_DIR:-/tmp/flashmla}"
out="${2:-$dest/flash_mla_dense.so}"
start=$(date +%s)
build_name=build_flashmla
source scripts/build_lib.sh
unpack_carry "$src" "$dest" FlashMLA make_flashmla_carry.sh
rm -rf "$dest/build"
[ -f "$tree/TANDEM_PINS" ] && sed 's/^/build_flashmla: pinned /' "$tree/TANDEM_PINS"
CUDA_HOME="$(cuda_root)"
export CUDA_HOME
nvcc="$CUDA_HOME/bin/nvcc"

mkdir -p "$dest/build"
cat >"$dest/build/binding.cpp" <<'CPP'
// The dense decode of FlashMLA's api.cpp alone (its other entry points pull in sm100 and sparse kernels).
#include <pybind11/pybind11.h>

#include "api/dense_decode.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("dense_decode_fwd", &dense_attn_decode_interface);
}
CPP
cat >"$dest/build/setup.py" <<'PY'
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

csrc = os.path.join(os.environ["FLASHMLA_TREE"], "csrc")
# CUDA 13 keeps libcu++ (cuda/std/...) under include/cccl: nvcc finds it, the host compiler of binding.cpp not.
cccl = [p for p in [os.path.join(os.environ["CUDA_HOME"], "include", "cccl")] if os.path.isdir(p)]
# FlashMLA's setup.py flags for its sm90 kernels, without the ptxas reports; fp16 left out (bf16 is what runs).
nvcc = ["-O3", "-std=c++20", "-DNDEBUG", "-D_USE_MATH_DEFINES", "-Wno-deprecated-declarations",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "--use_fast_math", "-DFLASH_MLA_DISABLE_FP16", "-gencode", "arch=compute_90a,code=sm_90a",
        "--threads", os.environ.get("NVCC_THREADS", "8")]
setup(
    name="flash_mla_dense",
    ext_modules=[CUDAExtension(
        name="flash_mla_dense",
        sources=["binding.cpp",
                 os.path.join(csrc, "sm90/decode/dense/instantiations/bf16.cu"),
                 os.path.join(csrc, "smxx/decode/get_decoding_sched_meta/get_decoding_sched_meta.cu"),
                 os.path.join(csrc, "smxx/decode/combine/combine.cu")],
        include_dirs=[csrc, os.path.join(csrc, "kerutils/include"), os.path.join(csrc, "sm90"),
                      os.path.join(csrc, "cutlass/include"), os.path.join(csrc, "cutlass/tools/util/include"), *cccl],
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-DNDEBUG", "-Wno-deprecated-declarations",
                                    "-DFLASH_MLA_DISABLE_FP16"], "nvcc": nvcc},
    )],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
PY
"$PYTHON" -c 'import torch; print(f"build_flashmla: torch {torch.__version__}, CUDA {torch.version.cuda}")'
echo "build_flashmla: nvcc $nvcc ($("$nvcc" --version | tail -1))"
if ! (cd "$dest/build" && FLASHMLA_TREE="$tree" MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py build_ext \
    --inplace >"$dest/build.log" 2>&1); then
    echo "build_flashmla: the build failed; the last lines of $dest/build.log:" >&2
    tail -n 60 "$dest/build.log" >&2
    exit 4
fi
so="$(find "$dest/build" -maxdepth 1 -name 'flash_mla_dense*.so' | head -1)"
[ -n "$so" ] || { echo "build_flashmla: the build made no flash_mla_dense*.so" >&2; exit 4; }
mkdir -p "$(dirname "$out")"
cp "$so" "$out"
# Loaded the way kernels/flashmla_decode.py loads it, from outside this checkout.
if ! (cd / && "$PYTHON" -c "
import importlib.machinery, importlib.util, sys, torch
loader = importlib.machinery.ExtensionFileLoader('flash_mla_dense', sys.argv[1])
module = importlib.util.module_from_spec(importlib.util.spec_from_file_location('flash_mla_dense', sys.argv[1], loader=loader))
loader.exec_module(module)
assert hasattr(module, 'dense_decode_fwd')" "$out" >"$dest/import.log" 2>&1); then
    echo "build_flashmla: built, but $out does not load:" >&2
    tail -n 30 "$dest/import.log" >&2
    exit 5
fi
echo "build_flashmla: $out built in $(($(date +%s) - start)) s"
echo "export TANDEM_FLASHMLA_SO=$out"
