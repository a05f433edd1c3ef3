# Sourced by the device scripts (scripts/device_*.sh), after they set OUT and cd to the repository root.
# Installs only what the GPU image lacks, into /tmp/site, from whichever of these was carried:
#   .whl_small/*.whl or .gpu_bundle/*.whl   orjson, msgspec, pyzmq wheels (and py-spy, for profiles)
#   .gpu_bundle/nixl_site.tar.gz            NIXL (nixl + nixl_cu13 with the UCX plugin only: the full wheels
#                                           are 58 MB, over what a device call carries next to anything else)
#   .gpu_bundle/mooncake_engine_cuda13.tar.gz  Mooncake's transfer engine from the cuda13 wheel (engine.so and
#                                           the libraries it loads) and the Debian libibverbs/libmlx5/libnuma/
#                                           libcurl it links, used only where the image lacks them
# and defines `step`, which runs one check time-boxed and tee'd to $OUT, remembering a failure in $status.
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
SITE=/tmp/site
mkdir -p "$SITE"
if ! python3 -c "import orjson, msgspec, zmq" 2>/dev/null; then
    wheels=$(ls .whl_small/*.whl .gpu_bundle/*.whl 2>/dev/null)
    [ -n "$wheels" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $wheels
fi
if ! command -v py-spy >/dev/null; then
    wheel=$(ls .gpu_bundle/py_spy-*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel"
    export PATH="$SITE/bin:$PATH"
fi
if ! python3 -c "import nixl" 2>/dev/null && [ -f .gpu_bundle/nixl_site.tar.gz ]; then
    tar -C "$SITE" -xzf .gpu_bundle/nixl_site.tar.gz
fi
if ! python3 -c "import mooncake.engine" 2>/dev/null && [ -f .gpu_bundle/mooncake_engine_cuda13.tar.gz ]; then
    mkdir -p /tmp/mooncake_bundle && tar -C /tmp/mooncake_bundle -xzf .gpu_bundle/mooncake_engine_cuda13.tar.gz
    cp -r /tmp/mooncake_bundle/site/. "$SITE/"
    # System libraries last on the path: the image's own win where it has them. libcudart.so.13 comes
    # with torch's CUDA wheels.
    cudart=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null)
    cudart_dir=$(find "${cudart:-/nonexistent}" -name 'libcudart.so.13*' -printf '%h\n' 2>/dev/null | head -1)
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}${cudart_dir:+$cudart_dir:}/tmp/mooncake_bundle/syslibs"
fi
export PYTHONPATH="$PWD:$SITE"
status=0
step() {  # step NAME SECONDS CMD...: run CMD time-boxed, tee'd to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: rc $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}
# FlashMLA, only where one was carried (.gpu_carry/ is never committed): flashmla_start SAVE_DIR LOG_DIR uses a
# carried .so, or builds one in the background from .gpu_carry/flashmla_src.tar.gz (scripts/make_flashmla_carry.sh
# writes it; scripts/build_flashmla.sh builds it); flashmla_wait SECONDS waits for that build and exports
# TANDEM_FLASHMLA_SO when it produced SAVE_DIR/flash_mla_dense.so (which then comes back for the next call to carry).
flashmla_start() {
    flashmla_save=$1 flashmla_log=$2/00_build_flashmla.log
    if [ -f .gpu_carry/flash_mla_dense.so ]; then
        export TANDEM_FLASHMLA_SO=$PWD/.gpu_carry/flash_mla_dense.so
    elif [ -f .gpu_carry/flashmla_src.tar.gz ]; then
        (bash scripts/build_flashmla.sh .gpu_carry/flashmla_src.tar.gz "$flashmla_save/flash_mla_dense.so" \
            >"$flashmla_log" 2>&1; echo "rc $?" >>"$flashmla_log") &
        flashmla_pid=$!
    fi
}
flashmla_wait() {
    [ -n "${flashmla_pid:-}" ] || return 0
    timeout "$1" tail --pid="$flashmla_pid" -f /dev/null
    tail -5 "$flashmla_log"
    [ -f "$flashmla_save/flash_mla_dense.so" ] && export TANDEM_FLASHMLA_SO=$flashmla_save/flash_mla_dense.so
    return 0
}
