#!/usr/bin/env bash
# Builds DeepGEMM's C++ extension (deep_gemm._C) on the GPU host from the tarball scripts/make_deepgemm_carry.sh
# writes, as DeepGEMM's develop.sh does (cutlass's include/cute and include/cutlass linked into
# deep_gemm/include, `python setup.py build`, the built _C copied next to deep_gemm/__init__.py), touching no
# network and no git. Its kernels are JIT-compiled at run time by nvcc against deep_gemm/include.
#
# Usage: scripts/build_deepgemm.sh [TARBALL]     (default .gpu_carry/deepgemm_src.tar.gz)
# Writes DEEPGEMM_DIR (default /tmp/deepgemm; a fixed path on purpose: DeepGEMM's JIT cache keys hold its include
# path, so a carried cache only hits at the same place):
#   DeepGEMM/          the unpacked tree, built; build.log the build's output
#   site/deep_gemm     a link to DeepGEMM/deep_gemm: site/ is what goes on PYTHONPATH (not the tree, whose
#                      scripts/ and tests/ folders would shadow others)
#   env.sh             `source` it: PYTHONPATH, CUDA_HOME, DG_JIT_CACHE_DIR (DEEPGEMM_DIR/jit_cache unless set),
#                      LD_PRELOAD of the compiler's libstdc++ (without it 2.6.1 segfaulted in its first GEMM)
# and prints the PYTHONPATH line. Exits non-zero with the compiler's tail when the build or the import fails.
# Environment: PYTHON (default python3), CUDA_HOME (else nvcc's location), MAX_JOBS, DEEPGEMM_DIR, DG_JIT_CACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
src="${1:-.gpu_carry/deepgemm_src.tar.gz}"
dest="${DEEPGEMM_DIR:-/tmp/deepgemm}"
start=$(date +%s)
build_name=build_deepgemm
source scripts/build_lib.sh
unpack_carry "$src" "$dest" DeepGEMM make_deepgemm_carry.sh
rm -rf "$dest/site" "$dest/shims" "$dest/env.sh" "$dest/env.sh.tmp"
for need in setup.py csrc/python_api.cpp deep_gemm/__init__.py third-party/cutlass/include/cute \
    third-party/fmt/include/fmt/format.h; do
    [ -e "$tree/$need" ] || { echo "build_deepgemm: $src lacks DeepGEMM/$need" >&2; exit 2; }
done
[ -f "$tree/TANDEM_PINS" ] && sed 's/^/build_deepgemm: pinned /' "$tree/TANDEM_PINS"

cuda_root="$(cuda_root)"
nvcc="$cuda_root/bin/nvcc"
# setup.py links cudart and nvrtc from CUDA_HOME/lib64 (and adds include/cccl, CUDA 13's libcu++ place itself)
cuda_lib="$cuda_root/lib64"
[ -e "$cuda_lib/libnvrtc.so" ] || cuda_lib="$(dirname "$(find "$cuda_root" -name 'libnvrtc.so' 2>/dev/null | head -1)")"
[ -e "$cuda_lib/libnvrtc.so" ] || { echo "build_deepgemm: no libnvrtc.so under $cuda_root" >&2; exit 3; }
echo "build_deepgemm: nvcc $nvcc ($("$nvcc" --version | tail -1)), CUDA libraries $cuda_lib"

# develop.sh's links: the JIT passes -I deep_gemm/include and includes <cute/...> and <cutlass/...> from there.
ln -sfn "$tree/third-party/cutlass/include/cutlass" "$tree/deep_gemm/include/cutlass"
ln -sfn "$tree/third-party/cutlass/include/cute" "$tree/deep_gemm/include/cute"

# setup.py imports, at its top: torch, packaging.version, wheel.bdist_wheel (only for a bdist_wheel command) and
# scripts.generate_pyi (type stubs). Where one is missing here, a stand-in goes on the build's PYTHONPATH
# (alone on it, so no other `scripts` package can shadow DeepGEMM's).
shims="$dest/shims"
mkdir -p "$shims"
probe() { (cd "$tree" && PYTHONPATH="$shims" "$PYTHON" -c "import $1" >/dev/null 2>&1); }
probe torch || { echo "build_deepgemm: $PYTHON cannot import torch" >&2; exit 3; }
if ! probe packaging.version; then
    mkdir -p "$shims/packaging"
    : >"$shims/packaging/__init__.py"
    cat >"$shims/packaging/version.py" <<'EOF'
try:  # torch ships a copy of packaging
    from torch._vendor.packaging.version import Version, parse  # noqa: F401
except ImportError:
    from setuptools._vendor.packaging.version import Version, parse  # noqa: F401
EOF
    echo "build_deepgemm: packaging missing: setup.py gets torch's vendored copy"
fi
if ! probe wheel.bdist_wheel; then
    mkdir -p "$shims/wheel"
    : >"$shims/wheel/__init__.py"
    cat >"$shims/wheel/bdist_wheel.py" <<'EOF'
try:  # setuptools >= 70.1 carries bdist_wheel; `setup.py build` never runs it
    from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401
except ImportError:
    from setuptools import Command

    class bdist_wheel(Command):  # noqa: N801 - the name setup.py imports
        user_options: list = []

        def initialize_options(self) -> None: ...

        def finalize_options(self) -> None: ...

        def run(self) -> None:
            raise SystemExit("no wheel package here: build with `setup.py build`")
EOF
    echo "build_deepgemm: wheel.bdist_wheel missing: setup.py gets a stand-in"
fi
if ! probe scripts.generate_pyi; then
    mkdir -p "$shims/scripts"
    printf 'def generate_pyi_file(name, root, output_dir):\n    pass  # type stubs only\n' \
        >"$shims/scripts/generate_pyi.py"
    echo "build_deepgemm: scripts.generate_pyi does not import: no type stubs"
fi

"$PYTHON" -c 'import torch; print(f"build_deepgemm: torch {torch.__version__}, CUDA {torch.version.cuda}")'
# DG_USE_LOCAL_VERSION=0: the version is __init__'s, no `git status` (the tree is not a repository). The rpath
# lets deep_gemm._C find libnvrtc where the toolkit keeps it without changing LD_LIBRARY_PATH for torch.
if ! (cd "$tree" && env PYTHONPATH="$shims" DG_USE_LOCAL_VERSION=0 DG_SKIP_CUDA_BUILD=0 DG_FORCE_BUILD=1 \
    CUDA_HOME="$cuda_root" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,-rpath,$cuda_lib" "$PYTHON" setup.py build >"$dest/build.log" 2>&1); then
    echo "build_deepgemm: setup.py build failed; the last lines of $dest/build.log:" >&2
    tail -n 60 "$dest/build.log" >&2
    exit 4
fi
so="$(find "$tree/build" -name '_C*.so' -type f | head -1)"
[ -n "$so" ] || { echo "build_deepgemm: the build made no _C*.so" >&2; tail -n 30 "$dest/build.log" >&2; exit 4; }
cp "$so" "$tree/deep_gemm/"
mkdir -p "$dest/site"
ln -sfn "$tree/deep_gemm" "$dest/site/deep_gemm"

# The extension carries parts of the libstdc++ of the compiler that built it (std::ostream's inserters): in a
# process that had loaded an older libstdc++ first, DeepGEMM 2.6.1 built by GCC 13.3 on the torch 2.11 / CUDA 13
# image segfaulted in its first GEMM, inserting a long into a stream; with the compiler's own libstdc++ preloaded
# it ran (tests/deepgemm_bisect.py on an H100). So env.sh preloads it.
libstdcxx="$(${CXX:-c++} -print-file-name=libstdc++.so.6 2>/dev/null || true)"
case "$libstdcxx" in /*) libstdcxx="$(realpath "$libstdcxx")" ;; *) libstdcxx="" ;; esac
cat >"$dest/env.sh.tmp" <<EOF
# Written by scripts/build_deepgemm.sh: source it to import the DeepGEMM built in $dest.
export PYTHONPATH="$dest/site\${PYTHONPATH:+:\$PYTHONPATH}"
export CUDA_HOME="\${CUDA_HOME:-$cuda_root}"
export DG_JIT_CACHE_DIR="\${DG_JIT_CACHE_DIR:-$dest/jit_cache}"
EOF
if [ -n "$libstdcxx" ]; then
    echo "export LD_PRELOAD=\"$libstdcxx\${LD_PRELOAD:+ \$LD_PRELOAD}\"" >>"$dest/env.sh.tmp"
    echo "build_deepgemm: env.sh preloads the compiler's libstdc++ ($libstdcxx)"
fi
# The import runs deep_gemm._C.init (library root, CUDA home); outside this checkout, so nothing else shadows it.
if ! (source "$dest/env.sh.tmp" && cd / && "$PYTHON" -c \
    'import deep_gemm; print(f"build_deepgemm: imported deep_gemm {deep_gemm.__version__} from {deep_gemm.__file__}")' \
    >"$dest/import.log" 2>&1); then
    echo "build_deepgemm: built, but deep_gemm does not import:" >&2
    tail -n 30 "$dest/import.log" >&2
    exit 5
fi
mv "$dest/env.sh.tmp" "$dest/env.sh"  # only a build that imports leaves an env.sh to source
cat "$dest/import.log"
echo "build_deepgemm: package $dest/site/deep_gemm (-> $tree/deep_gemm); built in $(($(date +%s) - start)) s"
echo "build_deepgemm: source $dest/env.sh, or:"
echo "export PYTHONPATH=\"$dest/site\${PYTHONPATH:+:\$PYTHONPATH}\" CUDA_HOME=\"$cuda_root\" DG_JIT_CACHE_DIR=\"$dest/jit_cache\"${libstdcxx:+ LD_PRELOAD=\"$libstdcxx\"}"
