#!/usr/bin/env bash
# Packs DeepGEMM's sources for a GPU host without internet: one tarball (default .gpu_carry/deepgemm_src.tar.gz;
# .gpu_carry/ is git-excluded, never commit it) holding DeepGEMM's tree at DEEPGEMM_COMMIT as DeepGEMM/, with
# the include/ folders of its cutlass and fmt submodules, at the commits that tree pins, under
# DeepGEMM/third-party/{cutlass,fmt}/include (all the C++ extension build and the kernels' JIT read of them),
# and DeepGEMM/TANDEM_PINS naming the three commits. scripts/build_deepgemm.sh builds it on the GPU host.
#
# Usage: scripts/make_deepgemm_carry.sh [OUT]
# Environment: DEEPGEMM_COMMIT (default the pin below, as pyproject's `deepgemm` extra), and the sources, each a
#   git URL (fetched at the pinned commit alone, depth 1) or a local repository, bare or not (read in place):
#   DEEPGEMM_GIT (default https://github.com/deepseek-ai/DeepGEMM), CUTLASS_GIT (https://github.com/NVIDIA/cutlass),
#   FMT_GIT (https://github.com/fmtlib/fmt). E.g. with local mirrors:
#   DEEPGEMM_GIT=/work/.mirror/deepseek-ai+DeepGEMM/repo CUTLASS_GIT=/work/.mirror/NVIDIA+cutlass/repo \
#   FMT_GIT=/work/.mirror/fmtlib+fmt/repo scripts/make_deepgemm_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPGEMM_COMMIT="${DEEPGEMM_COMMIT:-54e22612409371d6364144b69086735beb54e98b}"
DEEPGEMM_GIT="${DEEPGEMM_GIT:-https://github.com/deepseek-ai/DeepGEMM}"
CUTLASS_GIT="${CUTLASS_GIT:-https://github.com/NVIDIA/cutlass}"
FMT_GIT="${FMT_GIT:-https://github.com/fmtlib/fmt}"
out="${1:-.gpu_carry/deepgemm_src.tar.gz}"
work="$(mktemp -d "${TMPDIR:-/tmp}/deepgemm-carry.XXXXXX")"
trap 'rm -rf "$work"' EXIT

carry_name=make_deepgemm_carry
source scripts/carry_lib.sh

dg="$(git_dir_with "$DEEPGEMM_GIT" "$DEEPGEMM_COMMIT" deepgemm)"
cutlass_commit="$(submodule_commit "$dg" "$DEEPGEMM_COMMIT" third-party/cutlass)"
fmt_commit="$(submodule_commit "$dg" "$DEEPGEMM_COMMIT" third-party/fmt)"
[ -n "$cutlass_commit" ] && [ -n "$fmt_commit" ] || {
    echo "make_deepgemm_carry: DeepGEMM $DEEPGEMM_COMMIT pins no third-party/cutlass or third-party/fmt" >&2
    exit 2
}
cutlass="$(git_dir_with "$CUTLASS_GIT" "$cutlass_commit" cutlass)"
fmt="$(git_dir_with "$FMT_GIT" "$fmt_commit" fmt)"

stage="$work/stage"
mkdir -p "$stage"
git -C "$dg" archive --format=tar --prefix=DeepGEMM/ "$DEEPGEMM_COMMIT" | tar -x -C "$stage"
# The JIT compiles against include/cute and include/cutlass (symlinked into deep_gemm/include by the build); the
# extension against those and fmt's headers (header-only: FMT_HEADER_ONLY). Nothing else of either repository.
git -C "$cutlass" archive --format=tar --prefix=DeepGEMM/third-party/cutlass/ "$cutlass_commit" include |
    tar -x -C "$stage"
git -C "$fmt" archive --format=tar --prefix=DeepGEMM/third-party/fmt/ "$fmt_commit" include | tar -x -C "$stage"
for need in setup.py csrc/python_api.cpp deep_gemm/__init__.py scripts/generate_pyi.py \
    third-party/cutlass/include/cute third-party/cutlass/include/cutlass third-party/fmt/include/fmt/format.h; do
    [ -e "$stage/DeepGEMM/$need" ] || { echo "make_deepgemm_carry: DeepGEMM/$need missing" >&2; exit 3; }
done
printf 'deepgemm %s %s\ncutlass %s %s\nfmt %s %s\n' "$DEEPGEMM_COMMIT" "$DEEPGEMM_GIT" "$cutlass_commit" \
    "$CUTLASS_GIT" "$fmt_commit" "$FMT_GIT" >"$stage/DeepGEMM/TANDEM_PINS"

pack_tarball "$stage" DeepGEMM "$out"
cat "$stage/DeepGEMM/TANDEM_PINS"
