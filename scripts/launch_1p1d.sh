#!/usr/bin/env bash
# The 1P1D system on this machine: router + one prefill worker + one decode worker on the embedded tiny
# DeepSeek-V3 (random weights, CPU). Starts them, waits for /health, streams a few requests through the
# router, prints their outputs with the measured TTFT and ITL, then shuts everything down.
#
#   scripts/launch_1p1d.sh                      # NIXL, tiny model, 4 requests
#   TANDEM_TRANSFER_BACKEND=mooncake scripts/launch_1p1d.sh
#
# Settings (environment): TANDEM_MODEL (checkpoint dir; default runs/tiny-v3, written on first use),
# TANDEM_TRANSFER_BACKEND (nixl | mooncake), TANDEM_DEVICE (cpu | cuda), TANDEM_NUM_REQUESTS,
# TANDEM_MAX_TOKENS, TANDEM_ROUTER_PORT / TANDEM_PREFILL_PORT / TANDEM_DECODE_PORT / TANDEM_BOOTSTRAP_PORT,
# TANDEM_LOG_DIR (each server's log; default runs/launch_1p1d), TANDEM_KEEP_UP=1 (serve until Ctrl-C),
# TANDEM_MPS (auto | 1 | 0): under CUDA both workers share one GPU, and `auto` (default) runs them under a
# private CUDA MPS daemon where nvidia-cuda-mps-control is installed (their kernels then run side by side instead
# of time-slicing the GPU: 831 against 462 output tok/s at concurrency 32 on one H100, README "Serving"); 1
# requires it, 0 goes without. TANDEM_DECODE_SM_PERCENT (1-100; under MPS) caps the decode worker's share of
# the SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE): 50 gave 908 against 840-866 output tok/s at concurrency 32 on one
# H100, the same at concurrency 8 (README "Serving"); but cuBLAS computed wrong GEMMs under caps of 55-90 % on an
# H100 (README "Serving", session 43): a cap is for timing experiments, this script warns when one is set, and a
# capped worker refuses to start where its GEMMs come out wrong (engine.mps_cap_check).
# TANDEM_MAX_PREFILL_TOKENS: the prefill worker's tokens per forward (its --max-prefill-tokens; default 8192):
# 16384 gave 952-970 against 895-911 at concurrency 32 beside the decode at 50 %, the same at concurrency 8.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR="${TANDEM_MODEL:-runs/tiny-v3}"
BACKEND="${TANDEM_TRANSFER_BACKEND:-nixl}"
DEVICE="${TANDEM_DEVICE:-cpu}"
NUM_REQUESTS="${TANDEM_NUM_REQUESTS:-4}"
MAX_TOKENS="${TANDEM_MAX_TOKENS:-32}"
ROUTER_PORT="${TANDEM_ROUTER_PORT:-8000}"
PREFILL_PORT="${TANDEM_PREFILL_PORT:-30000}"
DECODE_PORT="${TANDEM_DECODE_PORT:-30001}"
BOOTSTRAP_PORT="${TANDEM_BOOTSTRAP_PORT:-8998}"
LOG_DIR="${TANDEM_LOG_DIR:-runs/launch_1p1d}"
MPS="${TANDEM_MPS:-auto}"
case "$MPS" in auto | 0 | 1) ;; *) echo "TANDEM_MPS must be auto, 1 or 0, got '$MPS'" >&2; exit 2 ;; esac
DECODE_SM="${TANDEM_DECODE_SM_PERCENT:-}"
case "$DECODE_SM" in "" | [1-9] | [1-9][0-9] | 100) ;;
*) echo "TANDEM_DECODE_SM_PERCENT must be 1-100, got '$DECODE_SM'" >&2; exit 2 ;;
esac
[[ -n "$DECODE_SM" && "$DECODE_SM" != 100 ]] &&
    echo "warning: an MPS SM cap of $DECODE_SM % - cuBLAS has computed wrong GEMMs under such caps" >&2
MAX_PREFILL="${TANDEM_MAX_PREFILL_TOKENS:-}"
[[ -z "$MAX_PREFILL" || "$MAX_PREFILL" =~ ^[1-9][0-9]*$ ]] ||
    { echo "TANDEM_MAX_PREFILL_TOKENS must be a positive integer, got '$MAX_PREFILL'" >&2; exit 2; }
START_TIMEOUT_S=300

# No RDMA NIC here: UCX over TCP loopback (its IB module can crash at exit otherwise, TRANSPORTS.md).
export UCX_MODULES="${UCX_MODULES:-^ib}"
if [ "$DEVICE" = cpu ]; then
    export UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"
    # Both workers share this machine's cores: one torch thread each avoids OpenMP spin-waiting.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
mkdir -p "$LOG_DIR"
[ -f "$MODEL_DIR/config.json" ] || python3 -m engine.tiny_model --out "$MODEL_DIR"

PIDS=()
MPS_DIR=""  # set while a private MPS daemon of this script runs
shutdown() {
    trap - EXIT INT TERM
    # Each server leads its own process group (setsid), so its rank processes get the signal too.
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.2
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "$MPS_DIR" ] && { echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true; }
    echo "stopped router, prefill and decode (logs in $LOG_DIR)"
}
trap shutdown EXIT INT TERM

if [ "$DEVICE" = cuda ] && [ "$MPS" != 0 ]; then
    if [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] || [ -e /tmp/nvidia-mps/control ]; then
        # One MPS server per GPU: where a daemon is already set up, the workers join it.
        echo "prefill and decode join the MPS daemon already running (${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps})"
    elif command -v nvidia-cuda-mps-control >/dev/null; then
        # Its own pipe and log directories: no system-wide daemon is touched, and the workers find this one.
        dir="$(cd "$LOG_DIR" && pwd)/mps"
        mkdir -p "$dir/pipe" "$dir/log"
        export CUDA_MPS_PIPE_DIRECTORY="$dir/pipe" CUDA_MPS_LOG_DIRECTORY="$dir/log"
        nvidia-cuda-mps-control -d
        MPS_DIR=$dir
        sleep 0.5  # the daemon creates its control pipe in the background
        echo "prefill and decode share the GPU under a private MPS daemon ($MPS_DIR; TANDEM_MPS=0: without)"
    elif [ "$MPS" = 1 ]; then
        echo "TANDEM_MPS=1 but nvidia-cuda-mps-control is not on PATH" >&2
        exit 1
    fi
fi

start() {  # name, then the command; its output goes to $LOG_DIR/name.log
    local name="$1"
    shift
    setsid "$@" >"$LOG_DIR/$name.log" 2>&1 &
    PIDS+=("$!")
}

wait_healthy() {  # name url pid
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until curl -sf -o /dev/null "$2/health"; do
        if ! kill -0 "$3" 2>/dev/null; then
            echo "$1 exited during start-up; last lines of $LOG_DIR/$1.log:" >&2
            tail -n 30 "$LOG_DIR/$1.log" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$1 not healthy after ${START_TIMEOUT_S}s; see $LOG_DIR/$1.log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "$1 ready at $2 after ${SECONDS}s"
}

COMMON=(--model "$MODEL_DIR" --host 127.0.0.1 --device "$DEVICE" --transfer-backend "$BACKEND"
        --page-size 16 --max-total-tokens 16384 --log-level warning)
start prefill python3 -m prefill_worker "${COMMON[@]}" --port "$PREFILL_PORT" --bootstrap-port "$BOOTSTRAP_PORT" \
    ${MAX_PREFILL:+--max-prefill-tokens "$MAX_PREFILL"}
DECODE_ENV=()  # the decode worker's SM cap, read by the MPS client in its process alone
[ -n "$DECODE_SM" ] && DECODE_ENV=(env CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="$DECODE_SM")
start decode "${DECODE_ENV[@]}" python3 -m decode_worker "${COMMON[@]}" --port "$DECODE_PORT"
wait_healthy prefill "http://127.0.0.1:$PREFILL_PORT" "${PIDS[0]}"
wait_healthy decode "http://127.0.0.1:$DECODE_PORT" "${PIDS[1]}"
start router python3 -m router --host 127.0.0.1 --port "$ROUTER_PORT" \
    --prefill "http://127.0.0.1:$PREFILL_PORT" "$BOOTSTRAP_PORT" --decode "http://127.0.0.1:$DECODE_PORT" \
    --log-level warning
wait_healthy router "http://127.0.0.1:$ROUTER_PORT" "${PIDS[2]}"

python3 - "http://127.0.0.1:$ROUTER_PORT" "$NUM_REQUESTS" "$MAX_TOKENS" <<'EOF'
"""Streams requests through the router at once; prints each output, its TTFT and ITL, then a summary.

ITL of a request: (last token's arrival - first token's) / (tokens - 1); events that reach the client in
one read share a timestamp, so single gaps say little. One warm-up request first (the decode side's
first look-up of the prefill instance and the transfer engines' first connection are not steady state).
"""
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request

url, num_requests, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
topics = ["Prefill and decode", "disaggregated serving of MLA models", "KV pages cross the network",
          "a router pairs two workers", "latent attention keeps the cache small", "experts in parallel"]
# Prompts of 10 to ~200 tokens (the tiny model's context is 512).
prompts = [f"{topics[i % len(topics)]} #{i}: " + "tell me more " * (4 * (i % 5)) for i in range(num_requests)]
results = [None] * num_requests


def run(i: int) -> None:
    body = {"text": prompts[i], "stream": True,
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start, stamps, last = time.perf_counter(), [], None
    try:
        response = urllib.request.urlopen(request, timeout=300)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"request {i}: {exc.code} {exc.read().decode(errors='replace')}") from None
    with response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            new = len(event["output_ids"]) - (len(last["output_ids"]) if last else 0)
            stamps += [time.perf_counter() - start] * max(new, 0)
            last = event
    results[i] = (last, stamps)


run(0)  # warm-up
threads = [threading.Thread(target=run, args=(i,)) for i in range(num_requests)]
began = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - began
if any(r is None for r in results):
    sys.exit("some requests failed (see the traceback above)")
ttfts, itls = [], []
for i, (event, stamps) in enumerate(results):
    ttfts.append(stamps[0])
    itl = "-"
    if len(stamps) > 1:
        itls.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        itl = f"{1000 * itls[-1]:.1f} ms"
    print(f"[{i}] prompt {event['meta_info']['prompt_tokens']} tokens -> {len(stamps)} tokens, "
          f"TTFT {1000 * stamps[0]:.0f} ms, ITL {itl}\n    {event['text']!r}")
tokens = sum(len(s) for _, s in results)
print(f"{num_requests} requests, {tokens} tokens in {wall:.2f} s ({tokens / wall:.1f} tok/s); "
      f"TTFT mean {1000 * statistics.mean(ttfts):.0f} ms, p50 {1000 * statistics.median(ttfts):.0f} ms; "
      + (f"ITL mean {1000 * statistics.mean(itls):.1f} ms, p50 {1000 * statistics.median(itls):.1f} ms"
         if itls else "ITL -"))
EOF

if [ "${TANDEM_KEEP_UP:-0}" = 1 ]; then
    echo "serving on http://127.0.0.1:$ROUTER_PORT (Ctrl-C stops everything)"
    wait "${PIDS[@]}"
fi
