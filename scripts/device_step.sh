#!/usr/bin/env bash
# On the GPU machine, one call of time-boxed steps, chosen and ordered by STEPS (default: all but landed):
#   prefill    bench.prefill_step --profile: a 4096-token prefill forward against the bf16 matmul rate
#   decode     bench.decode_step --profile: the decode step against its floor, kernels per step
#   landed     the same decode step on the landed tree carried as .baseline (same call, same card)
#   kernels    bench.kernels_gpu --quick: MLA decode at 16 and 128 heads against copy_ and the matmul rate, MoE GEMMs
#   tests      GPU tests of CUDA graphs, fused decode ops and FP8 (TESTS_K narrows them); tests@LABEL: with PD_ENV_LABEL's
#              VAR=VALUE words in their environment
#   flashmla   MLA decode tiles with FlashMLA beside Triton (when a FlashMLA extension is carried, or built by
#              scripts/build_flashmla.sh from .gpu_carry/flashmla_src.tar.gz, never committed; the build starts
#              in the background at once and its flash_mla_dense.so comes back to be carried next time)
#   tunemla    bench.tune_gpu --only mla16: the 16-head paged MLA decode's tiles, warps, stages and every split
#              count around the default (what sets the programs per SM when the KV read is the bound)
#   prefillbig the forward at 4096, 2x4096 and 4x4096 tokens (a prefill batch's size against its rate)
#   prefillfp8 prefill with FP8 weights under TANDEM_FP8_GEMM=auto (DeepGEMM's dense GEMMs from 1024 rows where
#              the deepgemm step built it earlier in the call, else cuBLAS) and again under cublas
#   ncufp8     tests/fp8_moe_one_token.py --sweep --dense (FP8_SWEEP_ARGS replaces the flags, SWEEP_LIMIT the 240 s
#              cap): one layer's masked
#              W8A16 expert launches and its dense attention GEMMs at one token against the copy_ rate over tiles,
#              K blocks an iteration, warps, stages and splits; the winners are exported to the later steps
#              (fp8_decode_tiles.env); NCU=1 then runs the default under Nsight Compute
#   fp8vsbf16  bench.decode_step_fp8: the bf16 step and the FP8 step in one process, FP8 / bf16 per batch size;
#              fp8vsbf16@LABEL: again with PD_ENV_LABEL's VAR=VALUE words in its environment, named *_LABEL
#   decodepdl / fp8vsbf16pdl  decode / fp8vsbf16 with TANDEM_PDL=1 (kernels.triton_pdl: the Triton kernels launched
#              as programmatic dependents), beside decode / fp8vsbf16 in the same call
#   fp8step    the decode step with FP8 weights (W8A16 at decode sizes: TANDEM_FP8_ACT auto)
#   fp8stepact the same with FP8 activations at every size (TANDEM_FP8_ACT=fp8)
#   decodeactive / fp8stepactive   decode / fp8step with TANDEM_MOE_ACTIVE_GRID=1 (the MoE's masked launches
#              over the experts that got rows alone), beside decode / fp8step in the same call
#   pdtests    tests/test_pd_gpu.py: 1P1D on the GPU equals colocated generation (bf16 KV and FP8 KV, NIXL)
#   tunefp8    bench.tune_gpu --only fp8moe,moecompact: tile sweep of the FP8 decode step's masked W8A16 launches,
#              and what the masked layout's empty experts cost the bf16 launch
#   nanprobe   tests/nan_probe.py under an MPS cap of 70 % and 50 % of the SMs: the first module of a 4096-token
#              V2-Lite prefill whose output is not finite (session 41: NaN logits at 70 %, never at 50 % or uncapped;
#              session 42: layer 0's kv_b_proj, a cuBLAS bf16 GEMM of finite inputs, at 92 SMs)
#   nanprobesweep  the prefill's dense GEMMs alone (bf16 against float64) under MPS caps of 50-100 %: which SM
#              shares a one-GPU 1P1D can give its prefill (--mps-prefill-sm)
#   fp8diff    tests/fp8_layer_diff.py: module by module, where the tiny FP8 model on the GPU parts from its
#              CPU reference
#   hostpath   bench.host_path at c8 under MPS (V2-Lite, 4096 in / 100 out): each TTFT part, and a decode turn's
#              forward (CUDA events) beside its host phases (inbox, transfers, schedule, build, sample, outputs)
#   spy        bench.decode_alone (decode worker alone, V2-Lite, 4096 in / 100 out, concurrency 8) under
#              py-spy: where the decode loop's time goes between forwards (collapsed stacks, all processes)
#   dbo        the GPU DBO test (two streams, tokens equal) and bench.dbo_step (a micro-batched forward, on vs off)
#   eplb       bench.eplb on one GPU (one rank's share of V3's experts, Zipf router, EPLB off/on)
#   prefix     bench.compare_prefix_cache on the GPU: multi-turn chat through router + 1P1D (V2-Lite dummy),
#              cache off / prefill cache / + decode reuse (PREFIX_ARGS replaces the workload flags)
#   a2a        MLA-core DP's head exchange on one GPU: the GPU test (ranks sharing the GPU, graph replays with
#              changing splits vs the reference) and bench.dynamic_a2a --shared-gpu (with the ranks-as-streams
#              column); several GPUs: bench.dynamic_a2a --world N by hand
#   gemm       bench.gemm --sweep: each FP8 GEMM backend (ours, cuBLAS's block-scaled) beside bf16 at V3 shapes;
#              gemm2, gemm3, ...: the same again into $OUT/gemmN (run-to-run spread on one card)
#   gemmsweep  bench.gemm --grouped-only --tokens 4096 --sweep: the grouped GEMMs' gated and down launches' tiles
#              swept apart at V3's 4096-token expert shapes, beside bf16 (into gemm_sweep/)
#   deepgemm   DeepGEMM built from .gpu_carry/deepgemm_src.tar.gz (scripts/make_deepgemm_carry.sh; never committed)
#              by scripts/build_deepgemm.sh (DG_JIT_USE_RUNTIME_API=1 in the environment builds its runtime-API
#              kernel loader instead of dlsym'd driver calls), one probe GEMM under DG_JIT_DEBUG (gdb's backtrace
#              if it crashes), then tests/test_fp8_deepgemm_gpu.py (DG_TESTS_K narrows them) and bench.gemm (GEMM_ARGS) with it
#              importable (its "deepgemm" backend beside the others). Its kernels JIT-compile per shape (seconds
#              each) into /tmp/deepgemm/jit_cache; DEEPGEMM_SAVE_JIT=1 sends that cache back as
#              deepgemm_jit_cache.tar.gz, and a carried .gpu_carry/deepgemm_jit_cache.tar.gz starts the next call warm
#   a2amps     bench.dynamic_a2a --shared-gpu under a private MPS daemon (the ranks' kernels run at once)
#   pd         bench.compare_pd 1P1D (PD_SETUPS=1p1d,colocated for both), V2-Lite 4096 in / 100 out, 32 prompts at
#              concurrency 8 (PD_ARGS adds), timeline on (bench.pd_timeline joins it); pd32: 64 prompts at
#              concurrency 32; pd32landed: pd32 on the landed tree carried as .baseline (same call, same card);
#              pdissuebase / pd32issuebase: c8 / c32 on the tree issue 15 was filed against (its 313 tok/s at c8
#              on an H200), carried as .issue_base (`git archive 69f5b33`);
#              pdmps / pd32mps: the same under a private CUDA MPS daemon (MPS_ARGS adds); pdmpsN / pd32mpsN: with
#              the decode instance capped at N % of the SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE); pdmpslow /
#              pd32mpslow: the decode at MPS's below-normal client priority (CUDA_MPS_CLIENT_PRIORITY=1);
#              pd32mps50@big: the same step again with $PD_ARGS_big added (and $PD_ENV_big's VAR=VALUE words in
#              its servers' environment), named *_big
# Carry .gpu_bundle, optionally .baseline and .gpu_carry. Everything written under $OUT comes back packed as
# $OUT/results.tgz (a call returns at most 8 files); the caller's console log stays beside it.
# Usage: OUT=DIR STEPS="prefill decode tests" bash scripts/device_step.sh
# What the open issues still owe, most needed first (a step past BUDGET is cut short, so the order matters).
# Carry .gpu_bundle, .gpu_carry (scripts/make_deepgemm_carry.sh and scripts/make_flashmla_carry.sh write it; a
# flash_mla_dense.so that came back from an earlier call skips FlashMLA's build), .baseline (`git archive
# 01b6185`) and .issue_base (`git archive 69f5b33`, the tree issue 15 was filed against). GPU starts are scarce:
# carry a committed snapshot (`git archive HEAD` into an ignored folder, run from there) so work in progress in
# the checkout never rides along.
#   call 1: scripts/device_next.sh (its steps chosen by the card that came; its header says why)
#   call 2: STEPS="pd32issuebase pd32mps50@big pdmps@p70 hostpath" PD_ARGS_big="--max-prefill-tokens 16384"
#     PD_ARGS_p70="--mps-prefill-sm 70" (c32 on the card of call 1, the prefill capped under MPS, where a decode
#     turn's time goes on the GPU host)
#   A warm machine's idle time counts against the budget: chain the calls, then give it back at once.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/device_step}"
STEPS="${STEPS:-prefill decode tests flashmla fp8step pd}"
BUDGET="${BUDGET:-570}"
mkdir -p "$OUT" /tmp/device_step_logs
source scripts/device_lib.sh
OUT_SAVED=$OUT OUT=/tmp/device_step_logs
start=$(date +%s)
# left CAP: seconds a step may take, at most CAP and at most what is left of BUDGET (20 at least)
left() {
    local l=$((BUDGET - ($(date +%s) - start)))
    l=$((l < $1 ? l : $1))
    echo $((l > 20 ? l : 20))
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/00_env.log"
# A carried FlashMLA extension is used by every step (tests included); a build only when asked for.
[[ " $STEPS " == *" flashmla "* || -f .gpu_carry/flash_mla_dense.so ]] && flashmla_start "$OUT_SAVED" "$OUT"
DS=${DS:-"--device cuda --model-config v2-lite --load-format dummy --batch-sizes 1,8,64 --context 1024"}
for s in $STEPS; do
    # step@LABEL: a pd step again with $PD_ARGS_LABEL added, its results named with _LABEL
    label="" && case $s in *@*) label=${s#*@} s=${s%@*} ;; esac
    label_args=$([ -n "$label" ] && eval "echo \${PD_ARGS_$label:-}")
    label_env=$([ -n "$label" ] && eval "echo \${PD_ENV_$label:-}")  # VAR=VALUE words for that pd step's servers
    case $s in
    prefill) step 01_prefill_step "$(left 120)" python3 -m bench.prefill_step --device cuda --model-config v2-lite \
        --seq-lens 4096,4x1024 --profile --out "$OUT_SAVED/prefill_step_gpu.json" ;;
    prefillbig) step 01_prefill_step_big "$(left 120)" python3 -m bench.prefill_step --device cuda --model-config \
        v2-lite --seq-lens 4096,2x4096,4x4096 --out "$OUT_SAVED/prefill_step_gpu_big.json" ;;
    prefillfp8) step 01_prefill_step_fp8 "$(left 120)" python3 -m bench.prefill_step --device cuda --model-config \
        v2-lite --quantization fp8 --seq-lens 4096,4x1024 --profile --out "$OUT_SAVED/prefill_step_gpu_fp8.json"
        step 01_prefill_step_fp8_cublas "$(left 120)" env TANDEM_FP8_GEMM=cublas python3 -m bench.prefill_step \
            --device cuda --model-config v2-lite --quantization fp8 --seq-lens 4096,4x1024 --profile \
            --out "$OUT_SAVED/prefill_step_gpu_fp8_cublas.json" ;;
    ncufp8) step 08_fp8_moe_one_token "$(left ${SWEEP_LIMIT:-240})" python3 tests/fp8_moe_one_token.py ${FP8_SWEEP_ARGS:---sweep --dense} \
            --best-env "$OUT_SAVED/fp8_decode_tiles.env"
        # The sweep's winners (where they beat the defaults by > 3 %) apply to every later step of the call.
        [ -s "$OUT_SAVED/fp8_decode_tiles.env" ] && cat "$OUT_SAVED/fp8_decode_tiles.env" \
            && source "$OUT_SAVED/fp8_decode_tiles.env"
        [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null && step 08_ncu_fp8_moe "$(left 180)" ncu --section SpeedOfLight \
            --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
            -k regex:_fp8_moe_gemm_kernel -c 4 python3 tests/fp8_moe_one_token.py --iters 2 ;;
    fp8vsbf16) step "06_decode_step_fp8_vs_bf16${label:+_$label}" "$(left 150)" env $label_env python3 -m \
        bench.decode_step_fp8 $DS --profile --out "$OUT_SAVED/decode_step_fp8_vs_bf16_gpu${label:+_$label}.json" ;;
    decode) step 02_decode_step "$(left 90)" env TANDEM_MLA_DECODE=triton python3 -m bench.decode_step $DS --profile \
        --out "$OUT_SAVED/decode_step_gpu.json" ;;
    decodepdl) step 02_decode_step_pdl "$(left 90)" env TANDEM_PDL=1 TANDEM_MLA_DECODE=triton python3 -m \
        bench.decode_step $DS --profile --out "$OUT_SAVED/decode_step_gpu_pdl.json" ;;
    fp8vsbf16pdl) step 06_decode_step_fp8_vs_bf16_pdl "$(left 150)" env TANDEM_PDL=1 python3 -m bench.decode_step_fp8 \
        $DS --profile --out "$OUT_SAVED/decode_step_fp8_vs_bf16_gpu_pdl.json" ;;
    landed) [ -d .baseline ] && step 03_decode_step_landed "$(left 75)" env PYTHONPATH="$PWD/.baseline:$SITE" \
        bash -c "cd .baseline && python3 -m bench.decode_step $DS --out $OUT_SAVED/decode_step_gpu_landed.json" ;;
    kernels) step 04_kernels_gpu "$(left 150)" python3 -m bench.kernels_gpu --quick --out "$OUT_SAVED/kernels_gpu.json" ;;
    tests) step 04_pytest_gpu${label:+_$label} "$(left ${TESTS_LIMIT:-240})" env $label_env python3 -m pytest -q -s -p no:cacheprovider -rf --tb=line \
        -m gpu tests/test_cuda_graph.py tests/test_kernels_decode_fused.py tests/test_fp8_gpu.py tests/test_fp8_gemv_gpu.py \
        tests/test_kernels_gpu.py tests/test_kernels_head_matmul.py tests/test_decode_overlap.py ${TESTS_K:+-k "$TESTS_K"} ;;
    flashmla) flashmla_wait "$(left 240)"
        [ -n "${TANDEM_FLASHMLA_SO:-}" ] && step 05_tune_mla "$(left 150)" python3 -m bench.tune_gpu --quick \
            --only mla16,mla128 --out "$OUT_SAVED/tune_gpu_mla.json" ;;
    tunemla) step 05_tune_mla16 "$(left 180)" python3 -m bench.tune_gpu --only mla16 \
        --out "$OUT_SAVED/tune_gpu_mla16.json" ;;
    nanprobe) step 08_nan_probe_mps70 "$(left 90)" python3 tests/nan_probe.py --mps-percent 70
        step 08_nan_probe_mps50 "$(left 60)" python3 tests/nan_probe.py --mps-percent 50 ;;
    nanprobesweep) step 08_nan_probe_gemm_sweep "$(left 120)" python3 tests/nan_probe.py --gemms \
        --mps-percent 50,55,60,65,70,75,80,85,90,95,100 ;;
    fp8diff) step 08_fp8_layer_diff "$(left 90)" python3 tests/fp8_layer_diff.py --promote-k 32 ;;
    fp8step) step 06_decode_step_fp8 "$(left 90)" python3 -m bench.decode_step $DS --quantization fp8 --profile \
        --out "$OUT_SAVED/decode_step_gpu_fp8.json" ;;
    decodeactive) step 02_decode_step_active "$(left 90)" env TANDEM_MOE_ACTIVE_GRID=1 TANDEM_MLA_DECODE=triton \
        python3 -m bench.decode_step $DS --profile --out "$OUT_SAVED/decode_step_gpu_active.json" ;;
    fp8stepactive) step 06_decode_step_fp8_active "$(left 90)" env TANDEM_MOE_ACTIVE_GRID=1 python3 -m bench.decode_step \
        $DS --quantization fp8 --profile --out "$OUT_SAVED/decode_step_gpu_fp8_active.json" ;;
    pdtests) step 07_pytest_pd_gpu "$(left 240)" env UCX_MODULES="${UCX_MODULES:-^ib}" python3 -m pytest -q -s \
        -p no:cacheprovider -rf --tb=short -m gpu tests/test_pd_gpu.py ;;
    tunefp8) step 09_tune_fp8_moe "$(left 240)" python3 -m bench.tune_gpu --only fp8moe,moecompact \
        --out "$OUT_SAVED/tune_gpu_fp8_moe.json" ;;
    fp8stepact)  # the same with FP8 activations at every size (DeepSeek's recipe), beside fp8step's W8A16 decode
        step 06_decode_step_fp8_act "$(left 90)" env TANDEM_FP8_ACT=fp8 python3 -m bench.decode_step $DS \
        --quantization fp8 --profile --out "$OUT_SAVED/decode_step_gpu_fp8_act.json" ;;
    pd | pd32 | pd32landed | pdissuebase | pd32issuebase | pdmps* | pd32mps*)
        # c8: the issue's setup; c32: 64 prompts; *landed: on .baseline; *issuebase: on .issue_base; after mps,
        # N: the decode capped at N % of the SMs; low / plow: the decode / the prefill at MPS's below-normal
        # client priority (pd32mps50low)
        tree=. mps="" share="" low=""
        case $s in pd32landed) tree=.baseline ;; *issuebase) tree=.issue_base ;; esac
        case $s in *mps*) rest=${s##*mps} share=${rest%%[a-z]*} low=${rest#"$share"} ;; esac
        case $low in "" | low | plow) ;; *) echo "unknown step $s" && status=1 && continue ;; esac
        role=$([ "$low" = plow ] && echo prefill || echo decode)
        # bench.compare_pd runs under MPS by default on CUDA since session 41: the steps without "mps" say --no-mps
        # (the issue's base tree, run with this tree's drivers, had no MPS)
        case $s in *mps*) mps="--mps ${MPS_ARGS:-}${share:+ --mps-decode-sm $share}${low:+ --mps-low-priority $role}" ;; esac
        case $s in
        pd | pdmps* | pdissuebase) name=compare_pd_c8 load="--num-prompts 32 --max-concurrency 8 --cuda-graph-max-bs 16" ;;
        *) name=compare_pd_c32 load="--num-prompts 64 --max-concurrency 32 --cuda-graph-max-bs 32" ;;
        esac
        name=$name${mps:+_mps}${share:+_decode_sm$share}${low:+_${role}_low_priority}${label:+_$label}
        [ "$tree" = .baseline ] && name=${name}_landed
        [ "$tree" = .issue_base ] && name=${name}_issue_base
        # an older tree runs this tree's bench drivers (their flags); its engine and workers stay its own
        [ "$tree" != . ] && [ -d "$tree" ] && cp bench/*.py "$tree/bench/"
        [ -d "$tree" ] && step "07_$name" "$(left 300)" env TANDEM_TIMELINE=1 $label_env PYTHONPATH="$PWD/$tree:$SITE" bash -c \
            "cd $tree && python3 -m bench.compare_pd --device cuda --setups \${PD_SETUPS:-1p1d} ${mps:---no-mps} \
            --model engine/model_configs/deepseek-v2-lite --load-format dummy --input-len 4096 --output-len 100 \
            $load ${PD_ARGS:-} $label_args --output-json $OUT_SAVED/$name.json \
            --log-dir $OUT_SAVED/${name}_logs --disable-tqdm && python3 -m bench.pd_timeline \
            $OUT_SAVED/${name}_logs/1p1d --json $OUT_SAVED/${name}_timeline.json --bench-json $OUT_SAVED/$name.json" ;;
    hostpath)  # c8 under MPS with the decode rank's StepClock: a decode turn's forward (device time) vs host phases
        step 07_host_path "$(left 240)" env UCX_MODULES="${UCX_MODULES:-^ib}" python3 -m bench.host_path \
            --label mps_c8 --device cuda --mps --model engine/model_configs/deepseek-v2-lite --load-format dummy \
            --cuda-graph-max-bs 16 ${PD_ARGS:-} --output-json "$OUT_SAVED/host_path_cuda.json" \
            --log-dir /tmp/device_step_logs/host_path ;;
    spy) step 09_decode_alone_pyspy "$(left 200)" py-spy record --subprocesses --nonblocking --format raw -r 100 \
        -o "$OUT_SAVED/decode_alone_pyspy.txt" -- python3 -m bench.decode_alone --device cuda --load-format dummy \
        --model engine/model_configs/deepseek-v2-lite --input-len 4096 --output-len 100 --num-prompts 32 \
        --max-concurrency 8 --cuda-graph-max-bs 16 --output-json "$OUT_SAVED/decode_alone_v2lite_c8.json" \
        --log-dir /tmp/device_step_logs/decode_alone --disable-tqdm ;;
    dbo) step 10_pytest_dbo "$(left 120)" python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_dbo.py
        step 11_dbo_step "$(left 150)" python3 -m bench.dbo_step --device cuda --model-config v2-lite \
            --load-format dummy --batches 2x512,4x512,8x512,4x1024,8x1024 --decode-batches 64,256 \
            --out "$OUT_SAVED/dbo_step_gpu.json" ;;
    gemm | gemm[0-9])  # gemmN: the same again, into $OUT/gemmN
        dir=$OUT_SAVED && [ "$s" != gemm ] && dir=$OUT_SAVED/$s
        step 16_$s "$(left 240)" python3 -m bench.gemm ${GEMM_ARGS:---sweep} --out-dir "$dir" ;;
    gemmsweep) step 16_gemm_sweep "$(left 300)" python3 -m bench.gemm --grouped-only --tokens 4096 --sweep \
        --out-dir "$OUT_SAVED/gemm_sweep" ;;
    deepgemm)
        if [ ! -f .gpu_carry/deepgemm_src.tar.gz ]; then
            echo "deepgemm: no .gpu_carry/deepgemm_src.tar.gz (scripts/make_deepgemm_carry.sh writes it)" && status=1
            continue
        fi
        rm -f /tmp/deepgemm/env.sh  # only this call's build may be used
        step 17_build_deepgemm "$(left 300)" env DEEPGEMM_DIR=/tmp/deepgemm bash scripts/build_deepgemm.sh \
            .gpu_carry/deepgemm_src.tar.gz
        [ -f /tmp/deepgemm/env.sh ] || continue
        source /tmp/deepgemm/env.sh  # PYTHONPATH (deep_gemm first), CUDA_HOME, DG_JIT_CACHE_DIR: every later step too
        # Which DeepGEMM call crashes and where (2.6.1 on torch 2.11 / CUDA 13 segfaulted in its first GEMM on an
        # H100 unless the compiler's libstdc++ was preloaded): each case in a child, with and without the preload,
        # DeepGEMM's JIT log unbuffered, native frames from scripts/segv_backtrace.c named by addr2line. The GEMM
        # steps after it run only when tandem's own call passed with the preload (they would crash otherwise).
        cc -O1 -g -shared -fPIC -o /tmp/segv_backtrace.so scripts/segv_backtrace.c -ldl || true
        step 17_bisect_deepgemm "$(left 240)" python3 tests/deepgemm_bisect.py --timeout 60 \
            $([ -f /tmp/segv_backtrace.so ] && echo --backtrace-so /tmp/segv_backtrace.so)
        # env.sh preloads the compiler's libstdc++ (what made 2.6.1 run here): the later steps inherit it.
        grep -q "fp8_as_tandem_preload=ok" /tmp/device_step_logs/17_bisect_deepgemm.log 2>/dev/null || continue
        [ "${DEEPGEMM_BUILD_ONLY:-0}" = 1 ] && continue  # built for later steps (prefillfp8) alone
        if [ -f .gpu_carry/deepgemm_jit_cache.tar.gz ]; then
            mkdir -p "$DG_JIT_CACHE_DIR" && tar -xzf .gpu_carry/deepgemm_jit_cache.tar.gz -C "$DG_JIT_CACHE_DIR"
        fi
        step 18_pytest_deepgemm "$(left 300)" python3 -m pytest -q -s -p no:cacheprovider -rs --tb=short \
            tests/test_fp8_deepgemm_gpu.py ${DG_TESTS_K:+-k "$DG_TESTS_K"}
        step 19_gemm_deepgemm "$(left 300)" python3 -m bench.gemm ${GEMM_ARGS:-} --out-dir "$OUT_SAVED"
        if [ "${DEEPGEMM_SAVE_JIT:-0}" = 1 ] && [ -d "$DG_JIT_CACHE_DIR/cache" ]; then
            tar -czf "$OUT_SAVED/deepgemm_jit_cache.tar.gz" -C "$DG_JIT_CACHE_DIR" cache
        fi ;;
    eplb) step 12_eplb "$(left 120)" python3 -m bench.eplb --device cuda --out "$OUT_SAVED/eplb_cuda" ;;
    prefix) step 13_prefix_cache "$(left 330)" env UCX_MODULES="${UCX_MODULES:-^ib}" python3 -m bench.compare_prefix_cache \
        --device cuda --model engine/model_configs/deepseek-v2-lite --load-format dummy --cuda-graph-max-bs 16 \
        ${PREFIX_ARGS:---num-conversations 16 --num-turns 6 --system-prompt-len 2048 --turn-input-len 256 \
        --turn-output-len 64} --output-json "$OUT_SAVED/prefix_cache_cuda.json" \
        --log-dir /tmp/device_step_logs/prefix_cache ;;
    a2a) step 14_pytest_a2a "$(left 150)" python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_dynamic_a2a_gpu.py
        step 15_dynamic_a2a "$(left 150)" python3 -m bench.dynamic_a2a --world 2 --shared-gpu \
            --out "$OUT_SAVED/dynamic_a2a_shared.json" ;;
    a2amps) step 15_dynamic_a2a_mps "$(left 150)" python3 -m bench.dynamic_a2a --world 2 --shared-gpu --mps \
            --out "$OUT_SAVED/dynamic_a2a_shared_mps.json" ;;
    *) echo "unknown step $s" && status=1 ;;
    esac
done
OUT=$OUT_SAVED
cat /tmp/device_step_logs/*.log >"$OUT/device_step.log"
# A device call returns at most 8 files from $OUT: everything but the console goes back as one archive.
(cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name console.log ! -name results.tgz -print0 |
    xargs -0 tar czf results.tgz && find . -mindepth 1 -maxdepth 1 ! -name console.log ! -name results.tgz \
    -exec rm -rf {} +)
exit $status
