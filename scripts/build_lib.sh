# Sourced by scripts/build_*.sh, which build a carried source tarball on the GPU host (no network, no git).
# Needs $build_name (for messages).
# unpack_carry SRC DEST TOP MAKER: unpacks tarball SRC (written by scripts/MAKER) into DEST, replacing DEST/TOP;
# sets dest (DEST, absolute) and tree (DEST/TOP).
unpack_carry() {
    local src=$1 top=$3 maker=$4
    [ -f "$src" ] || { echo "$build_name: no $src (scripts/$maker writes it)" >&2; exit 2; }
    mkdir -p "$2"
    dest="$(cd "$2" && pwd)"
    tree="$dest/$top"
    rm -rf "$tree"
    tar -xzf "$src" -C "$dest"
}

# cuda_root: prints the CUDA toolkit holding nvcc (CUDA_HOME's, else the one on PATH), symlinks resolved;
# exits where there is none.
cuda_root() {
    local nvcc="${CUDA_HOME:+$CUDA_HOME/bin/nvcc}"
    [ -n "$nvcc" ] && [ -x "$nvcc" ] || nvcc="$(command -v nvcc || true)"
    [ -n "$nvcc" ] || { echo "$build_name: nvcc not found (set CUDA_HOME)" >&2; exit 3; }
    dirname "$(dirname "$(readlink -f "$nvcc")")"
}
