# Sourced by scripts/make_*_carry.sh, which pack public sources for a GPU host without internet. Needs $work (a
# scratch directory) and $carry_name (for messages).
# git_dir_with SOURCE COMMIT NAME: prints a git directory that holds COMMIT (SOURCE itself when it is a local
# repository, else a bare repository in $work with COMMIT fetched from the URL, shallow).
git_dir_with() {
    local src=$1 commit=$2 name=$3 dir
    if [ -d "$src" ]; then
        dir="$(git -C "$src" rev-parse --absolute-git-dir)"
    else
        dir="$work/$name.git"
        git init -q --bare "$dir"
        git -C "$dir" fetch -q --depth 1 "$src" "$commit"
    fi
    git -C "$dir" cat-file -e "$commit^{commit}" 2>/dev/null || {
        echo "$carry_name: $src has no commit $commit" >&2
        exit 2
    }
    echo "$dir"
}

# submodule_commit GIT_DIR COMMIT PATH: the commit a gitlink of the tree pins
submodule_commit() {
    git -C "$1" ls-tree "$2" "$3" | awk '$2 == "commit" { print $3 }'
}

# pack_tarball STAGE TOP OUT: STAGE/TOP as OUT, the same bytes for the same commits (sorted names, fixed times
# and owners, no gzip timestamp), and a line saying what it holds.
pack_tarball() {
    local stage=$1 top=$2 out=$3 files
    mkdir -p "$(dirname "$out")"
    tar -C "$stage" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "$top" | gzip -9n >"$out.tmp"
    mv "$out.tmp" "$out"
    files=$(tar -tzf "$out" | grep -vc '/$')
    echo "$carry_name: $out: $(du -h "$out" | cut -f1) ($(stat -c %s "$out") bytes, $files files;" \
        "unpacked $(du -sh "$stage/$top" | cut -f1))"
}
