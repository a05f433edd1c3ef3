# Sourced by the device scripts (scripts/device_*.sh), after they set OUT and cd to the repository root.
# Installs only what the GPU image lacks, from .whl_small (orjson, msgspec, pyzmq wheels) when present,
# and defines `step`, which runs one check time-boxed and tee'd to $OUT, remembering a failure in $status.
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if ! python3 -c "import orjson, msgspec, zmq" 2>/dev/null && ls .whl_small/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_small/*.whl \
        && export PYTHONPATH="$PWD:/tmp/site"
fi
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
