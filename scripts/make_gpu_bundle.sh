#!/usr/bin/env bash
# Builds .gpu_bundle/ and .gpu_slim/ (git-ignored; the slim one without Mooncake), what the device scripts carry
# to the GPU machine and
# scripts/device_lib.sh installs into /tmp/site there (x86_64, CPython 3.12, torch CUDA 13, no network):
#   *.whl                        orjson, msgspec, pyzmq (cp312 manylinux wheels, installed --no-deps)
#   nixl_site.tar.gz             nixl (meta) + nixl_cu13 unpacked as a site dir, trimmed to the UCX backend
#   mooncake_engine_cuda13.tar.gz  site/: mooncake.engine from mooncake-transfer-engine-cuda13 and the
#                                libraries it loads; syslibs/: Debian bookworm libibverbs, librdmacm, libnuma,
#                                libmlx5 and libcurl (with libcurl's own Debian dependencies) for images lacking them
# Needs network here (pip download, apt-get download), readelf, dpkg-deb. Downloads are cached in
# $GPU_BUNDLE_CACHE (default /tmp/tandem_gpu_bundle_cache); the bundle is rebuilt from scratch each run.
# SKIP_MOONCAKE=1 leaves Mooncake out. If python3.12 is on PATH (or $PY312), NIXL and Mooncake are also
# imported with it from the trimmed trees as a load check (numpy for that is fetched into the cache only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUNDLE=$ROOT/.gpu_bundle
CACHE=${GPU_BUNDLE_CACHE:-/tmp/tandem_gpu_bundle_cache}
MAX_MB=40

SMALL_WHEELS=(orjson==3.13.0 msgspec==0.23.0 pyzmq==27.3.0 py-spy==0.4.3)  # py-spy: profiles on the GPU host
NIXL_PINS=(nixl==1.5.1 nixl-cu13==1.5.1)        # nixl 1.5.2 wants nixl-cu13==1.5.2, not published
MOONCAKE_PIN=mooncake-transfer-engine-cuda13==0.3.14
# UCX transport modules kept (tcp, shm, self are inside libuct/libucs): cma, cuda (cuda_copy + cuda_ipc),
# ucm_cuda. Dropped: ib* (need libibverbs/libmlx5; ibverbs providers can crash UCX at exit), perftest.
UCX_KEEP=(libuct_cma libuct_cuda libucm_cuda)
# Debian bookworm packages for syslibs/: the sonames engine.so links, and libcurl4's dependency closure.
DEB_PKGS=(libibverbs1 librdmacm1 libnuma1 ibverbs-providers libnl-3-200 libnl-route-3-200 libcurl4
          libbrotli1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2
          libidn2-0 libunistring2 libldap-2.5-0 libsasl2-2 libgnutls30 libnettle8 libhogweed6 libgmp10
          libp11-kit0 libtasn1-6 libffi8 libnghttp2-14 libpsl5 librtmp1 libssh2-1 libssl3 libzstd1 zlib1g)
# Provided by any glibc/CUDA image (and torch's CUDA wheels for libcudart): never bundled.
BASE_SONAMES="libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libresolv.so.2 ld-linux-x86-64.so.2
libstdc++.so.6 libgcc_s.so.1 libcuda.so.1 libnvidia-ml.so.1 libcudart.so.13"
# What the closure checks accept from the image: the above, plus OpenSSL 3 and zlib, which nixl_cu13's
# libnixl.so links (through its bundled grpc and etcd-cpp-api) and its wheel does not bundle either.
# (syslibs/ carries Debian's copies of those too, as libcurl needs them; device_lib.sh puts syslibs/ on
# LD_LIBRARY_PATH only when it unpacks Mooncake.)
SYSTEM_SONAMES="$BASE_SONAMES libssl.so.3 libcrypto.so.3 libz.so.1"

die() { echo "make_gpu_bundle: ERROR: $*" >&2; exit 1; }
for tool in readelf dpkg-deb python3; do command -v "$tool" >/dev/null || die "$tool not found"; done
mkdir -p "$CACHE/wheels" "$CACHE/debs"
WORK=$(mktemp -d /tmp/make_gpu_bundle.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
NEW=$WORK/bundle
mkdir -p "$NEW"

pip_dl() {  # pip_dl DIR SPEC...: cp312 manylinux x86_64 wheels, no deps (reuses files already in DIR)
    local dir=$1
    shift
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
wheel_of() {  # wheel_of NAME VERSION: the cached wheel file (dies if absent)
    local f n=${1//-/_}  # wheel files spell a distribution's dashes as underscores
    f=$(ls "$CACHE/wheels/$n-$2-"*.whl 2>/dev/null | head -1)
    [ -n "$f" ] || die "no wheel $1 $2 in $CACHE/wheels (download failed?)"
    echo "$f"
}

# The ELF helper: DT_NEEDED closure through DT_RPATH/DT_RUNPATH ($ORIGIN), and pruning.
cat >"$WORK/elf.py" <<'PY'
"""closure ROOTDIR SYSTEM_SONAMES ROOT...: print the bundled files the roots need (recursively, resolved
through their RPATH/RUNPATH and EXTRA dirs); fail on a soname found neither there nor in SYSTEM_SONAMES."""
import os, re, subprocess, sys

def dyn(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    paths = []
    for p in re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library r(?:un)?path: \[(.+?)\]", out):
        paths += [d.replace("$ORIGIN", os.path.dirname(path)).replace("${ORIGIN}", os.path.dirname(path))
                  for d in p.split(":") if d]
    return needed, paths

def soname(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\(SONAME\)\s+Library soname: \[(.+?)\]", out)
    return m.group(1) if m else None

def main():
    root, system, extra = sys.argv[1], set(sys.argv[2].split()), sys.argv[3].split(":") if sys.argv[3] else []
    todo = [os.path.realpath(p) for p in sys.argv[4:]]
    seen, system_used, extra_used, missing = set(), set(), set(), []
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        needed, rpath = dyn(f)
        for lib in needed:
            hit = next((os.path.join(d, lib) for d in rpath if os.path.exists(os.path.join(d, lib))), None)
            if hit and os.path.realpath(hit).startswith(os.path.realpath(root) + os.sep):
                todo.append(os.path.realpath(hit))
            elif lib in system:
                system_used.add(lib)
            elif any(os.path.exists(os.path.join(d, lib)) for d in extra):
                extra_used.add(lib)  # shipped separately (syslibs/), its own closure checked there
            else:
                missing.append(f"{os.path.relpath(f, root)} needs {lib}")
    # A soname that its RPATH cannot find but that an object already in the closure provides is what the
    # loader reuses at run time (a plugin whose RPATH misses libnixl_common.so, dlopen'ed by libnixl.so
    # after that is loaded).
    provided = {os.path.basename(f) for f in seen} | {soname(f) for f in seen}
    missing = [m for m in missing if m.rsplit(" needs ", 1)[1] not in provided]
    if missing:
        sys.exit("unresolved DT_NEEDED:\n  " + "\n  ".join(missing))
    for f in sorted(seen):
        print(os.path.relpath(f, root))
    print("  expected on the GPU image: " + " ".join(sorted(system_used)), file=sys.stderr)
    if extra_used:
        print("  from syslibs/: " + " ".join(sorted(extra_used)), file=sys.stderr)

main()
PY
closure() {  # closure ROOTDIR EXTRA_DIRS ROOT...
    local root=$1 extra=$2
    shift 2
    python3 "$WORK/elf.py" "$root" "$SYSTEM_SONAMES" "$extra" "$@"
}
prune_libs() {  # prune_libs KEEPLIST DIR...: delete shared objects under DIRs not listed (relative paths)
    local keep=$1 f
    shift
    find "$@" -type f \( -name '*.so' -o -name '*.so.*' \) | while read -r f; do
        grep -qxF "$f" "$keep" || rm -f "$f"
    done
}

echo "== downloading (cache $CACHE)"
pip_dl "$CACHE/wheels" "${SMALL_WHEELS[@]}" "${NIXL_PINS[@]}"
[ "${SKIP_MOONCAKE:-0}" = 1 ] || pip_dl "$CACHE/wheels" "$MOONCAKE_PIN"

# 1. small wheels
for spec in "${SMALL_WHEELS[@]}"; do
    cp "$(wheel_of "${spec%%==*}" "${spec#*==}")" "$NEW/"
done

# 2. NIXL
echo "== NIXL: unpacking and trimming to the UCX backend"
NX=$WORK/nixl_site
mkdir -p "$NX"
python3 -m zipfile -e "$(wheel_of nixl 1.5.1)" "$NX"
python3 -m zipfile -e "$(wheel_of nixl_cu13 1.5.1)" "$NX"
(
    cd "$NX"
    [ -f nixl/__init__.py ] && [ -f nixl_cu13/__init__.py ] && [ -f .nixl_cu13.mesonpy.libs/libnixl.so ] \
        || die "unexpected nixl wheel layout"
    # EP extensions (90 MB), scripts, headers; the meta's nixl_ep (imports the dropped nixl_ep_cu13).
    rm -rf nixl_ep nixl_ep_cu13 nixl_cu13.scripts nixl_cu13-*.data
    # Plugins: libnixl.so loads them from plugins/ next to itself (checked: without
    # .nixl_cu13.mesonpy.libs/plugins/libplugin_UCX.so there are "No plugins available"); the copies in
    # nixl_cu13.libs/nixl are not read unless NIXL_PLUGIN_DIR points there. Keep only the UCX backend:
    # no other backend, telemetry exporter or trace plugin.
    rm -rf nixl_cu13.libs/nixl
    find .nixl_cu13.mesonpy.libs/plugins -type f ! -name libplugin_UCX.so -delete
    [ -f .nixl_cu13.mesonpy.libs/plugins/libplugin_UCX.so ] || die "UCX plugin missing from nixl_cu13"
    rm -f nixl_cu13-*.dist-info/RECORD  # it lists the dropped files
    keep=(-false)
    for m in "${UCX_KEEP[@]}"; do keep+=(-o -name "$m.*"); done
    find nixl_cu13.libs/ucx -type f ! \( "${keep[@]}" \) -delete
    for m in "${UCX_KEEP[@]}"; do ls nixl_cu13.libs/ucx/"$m".so.* >/dev/null || die "UCX module $m missing"; done
    # Everything the roots link, recursively; all other bundled libraries go.
    closure "$NX" "" nixl_cu13/*.so .nixl_cu13.mesonpy.libs/plugins/*.so \
        nixl_cu13.libs/ucx/*.so.* >"$WORK/nixl_keep"
    prune_libs "$WORK/nixl_keep" .nixl_cu13.mesonpy.libs nixl_cu13.libs
    closure "$NX" "" nixl_cu13/*.so .nixl_cu13.mesonpy.libs/plugins/*.so \
        nixl_cu13.libs/ucx/*.so.* >/dev/null   # re-check after pruning
    find . -name __pycache__ -prune -exec rm -rf {} +
)
tar -C "$NX" -czf "$NEW/nixl_site.tar.gz" .

# 3. Mooncake
if [ "${SKIP_MOONCAKE:-0}" = 1 ]; then
    echo "== Mooncake: skipped (SKIP_MOONCAKE=1); the bundle carries no mooncake_engine_cuda13.tar.gz"
else
    echo "== Mooncake: unpacking the transfer engine"
    MC=$WORK/mooncake
    mkdir -p "$MC/wheel" "$MC/site/mooncake" "$MC/syslibs"
    python3 -m zipfile -e "$(wheel_of mooncake_transfer_engine_cuda13 0.3.14)" "$MC/wheel"
    [ -f "$MC/wheel/mooncake/engine.so" ] || die "mooncake wheel has no mooncake/engine.so"
    # engine.so links libibverbs/libnuma/libmlx5/libcurl from the system: resolve those against syslibs.
    echo "== Mooncake: Debian syslibs (${DEB_PKGS[*]})"
    (
        cd "$CACHE/debs"
        missing=()
        for p in "${DEB_PKGS[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
        if [ ${#missing[@]} -gt 0 ]; then apt-get download "${missing[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true; fi
        for p in "${DEB_PKGS[@]}"; do
            deb=$(ls "${p}"_*.deb 2>/dev/null | head -1)
            [ -n "$deb" ] || die "apt-get download $p failed"
            dpkg-deb -x "$deb" "$WORK/debroot"
        done
    )
    DEBLIB=$WORK/debroot/usr/lib/x86_64-linux-gnu
    if [ -d "$WORK/debroot/lib/x86_64-linux-gnu" ]; then cp -a "$WORK/debroot/lib/x86_64-linux-gnu/." "$DEBLIB/"; fi
    # syslibs: the DT_NEEDED closure (by soname) of engine.so's non-bundled libraries, minus the system set.
    python3 - "$DEBLIB" "$MC/syslibs" "$BASE_SONAMES" <<'PY'
import os, re, shutil, subprocess, sys
src, dst, system = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
def needed(p):
    out = subprocess.run(["readelf", "-d", p], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
todo, done = ["libibverbs.so.1", "librdmacm.so.1", "libnuma.so.1", "libmlx5.so.1", "libcurl.so.4"], set()
while todo:
    so = todo.pop()
    if so in done or so in system:
        continue
    p = os.path.join(src, so)
    if not os.path.exists(p):
        sys.exit(f"syslibs: {so} is in none of the Debian packages downloaded (add its package to DEB_PKGS)")
    done.add(so)
    shutil.copy2(os.path.realpath(p), os.path.join(dst, so))  # the soname, as a plain file
    todo += needed(p)
print("syslibs: " + " ".join(sorted(done)))
PY
    (
        cd "$MC/wheel"
        # engine.so, nvlink_allocator.so (cudaMalloc hooks for the NVLink transport, dlopen'ed by users)
        # and what they link; plus the package's own lazy __init__ and the stub.
        closure "$MC/wheel" "$MC/syslibs" mooncake/engine.so mooncake/nvlink_allocator.so >"$WORK/mc_keep"
        while read -r f; do
            mkdir -p "$MC/site/$(dirname "$f")"
            cp -a "$f" "$MC/site/$f"
        done <"$WORK/mc_keep"
        cp -a mooncake/__init__.py mooncake/engine.pyi mooncake/py.typed "$MC/site/mooncake/"
        cp -a mooncake_transfer_engine_cuda13-*.dist-info "$MC/site/"
        rm -f "$MC/site/"mooncake_transfer_engine_cuda13-*.dist-info/RECORD  # lists the dropped files
    )
    rm -rf "$MC/wheel"
    # Static re-check on the trimmed tree, against syslibs.
    (cd "$MC/site" && closure "$MC/site" "$MC/syslibs" mooncake/engine.so >/dev/null)
    tar -C "$MC" -czf "$NEW/mooncake_engine_cuda13.tar.gz" site syslibs
fi

# 4. Optional load check with a local CPython 3.12 (the cp312 extensions cannot load in another Python).
PY312=${PY312:-$(ls /root/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | tail -1 || true)}
PY312=${PY312:-$(command -v python3.12 || true)}
if [ -n "$PY312" ] && "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "== load check with $PY312"
    T=$WORK/check
    mkdir -p "$T/site" "$CACHE/check"
    pip_dl "$CACHE/check" numpy
    "$PY312" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$T/site" \
        "$NEW"/*.whl "$(ls "$CACHE"/check/numpy-*.whl | head -1)" 2>&1 | grep -v "^WARNING" || true
    tar -C "$T/site" -xzf "$NEW/nixl_site.tar.gz"
    (cd "$T" && PYTHONPATH="$T/site" "$PY312" - <<'PY') || die "NIXL load check failed"
import numpy as np, orjson, msgspec, zmq
from nixl._api import nixl_agent, nixl_agent_config
a = nixl_agent("a", nixl_agent_config(backends=["UCX"]))
b = nixl_agent("b", nixl_agent_config(backends=["UCX"]))
assert "UCX" in a.backends, a.backends
src, dst = np.arange(4096, dtype=np.uint8), np.zeros(4096, dtype=np.uint8)
s_desc, d_desc = (src.ctypes.data, src.nbytes, 0), (dst.ctypes.data, dst.nbytes, 0)
a.register_memory(a.get_reg_descs([s_desc + ("",)], "DRAM"))
b.register_memory(b.get_reg_descs([d_desc + ("",)], "DRAM"))
assert a.add_remote_agent(b.get_agent_metadata()) == b"b" or True
x = a.initialize_xfer("WRITE", a.get_xfer_descs([s_desc], "DRAM"), b.get_xfer_descs([d_desc], "DRAM"), "b", b"done")
state = a.transfer(x)
while state != "DONE":
    assert state != "ERR", state
    state = a.check_xfer_state(x)
assert (dst == src).all()
print("NIXL UCX DRAM write ok; plugins:", a.get_plugin_list())
PY
    if [ -f "$NEW/mooncake_engine_cuda13.tar.gz" ]; then
        mkdir -p "$T/mc" && tar -C "$T/mc" -xzf "$NEW/mooncake_engine_cuda13.tar.gz"
        # No CUDA driver here: an empty libcuda.so.1 (when gcc is around) gets the loader past it, so that
        # only CUDA's own symbols or libraries may be what is missing.
        ld_path=$T/mc/syslibs
        if command -v gcc >/dev/null; then
            mkdir -p "$T/stub" && echo 'void tandem_stub(void) {}' >"$T/stub/s.c"
            gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$T/stub/libcuda.so.1" "$T/stub/s.c" && ld_path=$T/stub:$ld_path
        fi
        cudart=$(ldconfig -p | awk '/libcudart.so.13 /{print $NF; exit}')
        [ -z "$cudart" ] || ld_path=$(dirname "$cudart"):$ld_path
        if out=$(cd "$T" && LD_LIBRARY_PATH="$ld_path" PYTHONPATH="$T/mc/site" "$PY312" -c \
            "from mooncake import engine; print('mooncake.engine ok:', engine.TransferEngine)" 2>&1); then
            echo "$out"
        elif grep -q "libcuda.so.1\|libcudart.so.13\|undefined symbol: cu" <<<"$out"; then
            echo "mooncake.engine: only CUDA libraries missing here (expected without a GPU): $out"
        else
            die "Mooncake load check failed: $out"
        fi
    fi
else
    echo "== no python3.12 here: load check skipped (the static DT_NEEDED checks passed)"
fi

# 5. Swap in and report.
rm -rf "$BUNDLE"
mv "$NEW" "$BUNDLE"
echo "== $BUNDLE"
(cd "$BUNDLE" && ls -l --block-size=K | tail -n +2 | awk '{printf "  %8s  %s\n", $5, $9}')
total_kb=$(du -sk "$BUNDLE" | cut -f1)
echo "total: $((total_kb / 1024)) MB (${total_kb} KB)"
[ "$total_kb" -lt $((MAX_MB * 1024)) ] || die "bundle is over ${MAX_MB} MB"

# 6. The slim carry (.gpu_slim/): the wheels and NIXL without Mooncake. The tracked tree and the full bundle
# together pass the 64 MiB a device call carries; the decode-step, kernel and GPU-test steps need no Mooncake
# (scripts/device_next.sh links .gpu_slim as .gpu_bundle on the GPU host).
SLIM=$ROOT/.gpu_slim
rm -rf "$SLIM" && mkdir -p "$SLIM"
cp "$BUNDLE"/*.whl "$BUNDLE"/nixl_site.tar.gz "$SLIM"/
echo "== $SLIM: $(( $(du -sk "$SLIM" | cut -f1) / 1024 )) MB (no Mooncake)"
