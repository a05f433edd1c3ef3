#!/usr/bin/env bash
# Packs FlashMLA's sources for a GPU host without internet: one tarball (default .gpu_carry/flashmla_src.tar.gz;
# .gpu_carry/ is git-excluded, never commit it) holding FlashMLA's csrc/ at FLASHMLA_COMMIT as FlashMLA/csrc, with
# the include/ and tools/util/include/ folders of the cutlass submodule that tree pins under FlashMLA/csrc/cutlass,
# and FlashMLA/TANDEM_PINS naming both commits. scripts/build_flashmla.sh builds its sm90 dense decode from it
# (kernels/flashmla_decode.py loads the result through TANDEM_FLASHMLA_SO).
#
# Usage: scripts/make_flashmla_carry.sh [OUT]
# Environment: FLASHMLA_COMMIT (default the pin below), and the sources, each a git URL (fetched at the pinned
#   commit alone, depth 1) or a local repository, bare or not (read in place): FLASHMLA_GIT (default
#   https://github.com/deepseek-ai/FlashMLA), CUTLASS_GIT (https://github.com/NVIDIA/cutlass). E.g. with mirrors:
#   FLASHMLA_GIT=/work/.mirror/deepseek-ai+FlashMLA/repo CUTLASS_GIT=/work/.mirror/NVIDIA+cutlass/repo \
#   scripts/make_flashmla_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FLASHMLA_COMMIT="${FLASHMLA_COMMIT:-9241ae3ef9bac614dd25e45e507e089f888280e0}"
FLASHMLA_GIT="${FLASHMLA_GIT:-https://github.com/deepseek-ai/FlashMLA}"
CUTLASS_GIT="${CUTLASS_GIT:-https://github.com/NVIDIA/cutlass}"
out="${1:-.gpu_carry/flashmla_src.tar.gz}"
work="$(mktemp -d "${TMPDIR:-/tmp}/flashmla-carry.XXXXXX")"
trap 'rm -rf "$work"' EXIT

carry_name=make_flashmla_carry
source scripts/carry_lib.sh

fm="$(git_dir_with "$FLASHMLA_GIT" "$FLASHMLA_COMMIT" flashmla)"
cutlass_commit="$(submodule_commit "$fm" "$FLASHMLA_COMMIT" csrc/cutlass)"
[ -n "$cutlass_commit" ] || { echo "$carry_name: FlashMLA $FLASHMLA_COMMIT pins no csrc/cutlass" >&2; exit 2; }
cutlass="$(git_dir_with "$CUTLASS_GIT" "$cutlass_commit" cutlass)"

stage="$work/stage"
mkdir -p "$stage"
git -C "$fm" archive --format=tar --prefix=FlashMLA/ "$FLASHMLA_COMMIT" csrc LICENSE | tar -x -C "$stage"
# The kernels include <cute/...>, <cutlass/...> and cutlass's util headers; nothing else of cutlass.
git -C "$cutlass" archive --format=tar --prefix=FlashMLA/csrc/cutlass/ "$cutlass_commit" include tools/util/include |
    tar -x -C "$stage"
for need in csrc/api/dense_decode.h csrc/sm90/decode/dense/instantiations/bf16.cu csrc/smxx/decode/combine/combine.cu \
    csrc/smxx/decode/get_decoding_sched_meta/get_decoding_sched_meta.cu csrc/kerutils/include/kerutils/kerutils.cuh \
    csrc/cutlass/include/cute csrc/cutlass/tools/util/include/cutlass/util; do
    [ -e "$stage/FlashMLA/$need" ] || { echo "$carry_name: FlashMLA/$need missing" >&2; exit 3; }
done
printf 'flashmla %s %s\ncutlass %s %s\n' "$FLASHMLA_COMMIT" "$FLASHMLA_GIT" "$cutlass_commit" "$CUTLASS_GIT" \
    >"$stage/FlashMLA/TANDEM_PINS"

pack_tarball "$stage" FlashMLA "$out"
cat "$stage/FlashMLA/TANDEM_PINS"
