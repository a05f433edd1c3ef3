#!/usr/bin/env bash
# The next device call for the open issues, its steps chosen by the card that came (scripts/device_step.sh runs
# them; its header says what each step does). Issue 15's c8 line asks 2x the base tree's 313 tok/s (an H200's):
# the c8 runs, with the base tree beside them, come first on either card.
#   OUT=DIR BUDGET=540 bash scripts/device_next.sh      (STEPS / SWEEP_LIMIT override the choice)
# From the machine here: carry .gpu_slim (below; and .issue_base, `git archive 69f5b33`, for the steps that run
# issue 15's base tree) and run from the repository root, the tree itself being what the call copies.
set -uo pipefail
cd "$(dirname "$0")/.."
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# Issue 15's c8 (session 43): the base tree 307.8 (H100) / 328.4 (H200) tok/s; this tree under MPS 598.8 (H100,
# 1.95x; with the decode at MPS's low client priority 600.5, and with 16384-token prefill forwards 610.6) and
# 691.6 on the H200 (2.11x its same-call base). Taking turns (the decode paused while a prefill forward ran)
# lost on the H200 (597-649) and was dropped. c32 beside its base: 991 / 437 (H100, decode capped at 50 %, which
# cuBLAS computes wrong GEMMs under) and 1093 / 492 (H200, uncapped, 16384-token prefill forwards).
# Call 3 (H200): c8 702.7 / 687.6 against 331.1 (2.12 / 2.08x); c32 at the issue's --cuda-graph-max-bs 16 929.5
# against 357.9 (2.60x), at 32 on both 925.6 against 480.1 (1.93x): issue 15's lines hold on its card.
# Session 44, issue 16: the decode MoE's two expert launches as one (kernels.triton_moe_fused_decode).
# Carry .gpu_slim, linked as .gpu_bundle on the GPU host: the bundle's wheels and NIXL without Mooncake
# (scripts/make_gpu_bundle.sh writes it beside .gpu_bundle), as the tree and the full bundle passed the 64 MiB a
# call carries. The call's command, from the repository root:
#   mkdir -p $OUT; rm -rf .gpu_bundle; ln -s .gpu_slim .gpu_bundle; OUT=$OUT BUDGET=540 bash scripts/device_next.sh \
#     > $OUT/console.log 2>&1
# Call 1 (H100): one launch took one layer's FP8 experts 40.4 us against 37.6 for two (bf16 56.6 against 58.4);
# the cap sweep found wrong GEMMs at 55-85 %. Call 2 (H100), two A/B pairs at batch 1-16: one launch faster at 2-8
# tokens (now the default there: TANDEM_MOE_FUSED_DECODE=auto), split at 1. Next: the GPU tests with that default
# (greedy tokens, graphs, the one-launch bits), then serving c8 beside the landed tree (decode runs at batch ~8).
# Session 45 (H100, calls 3-7): the GPU tests under that default passed (graphs, greedy tokens, FP8 greedy, NIXL
# 1P1D); each layer's dense weights prefetched into L2 and the shared experts' column scheduled first gained
# nothing (reverted); serving c8 under MPS ran ~1 % behind with one launch in three pairs. fp8vsbf16's --profile
# now adds a profile of graphs without PDL (graph_profile_serial), the one its GEMM / rest split reads.
# Labels used: PD_ENV_two="TANDEM_MOE_FUSED_DECODE=0"; DS with --batch-sizes 1,8 for quick pairs.
# Session 46 (H100, call 1): the one-row dense GEMV beat the tiled split-K GEMMs (10.2 -> 6.7 us for a layer's pair,
# 341 -> 268 us a step), now the default; the experts as GEMVs lost and were dropped. Its A/B:
#   PD_ENV_tiled="TANDEM_FP8_DENSE_GEMV=0" STEPS="fp8vsbf16 fp8vsbf16@tiled" (tests@LABEL takes a label's env too),
#   FP8_SWEEP_ARGS="--iters 20 --dense-only --gemv-sweep" STEPS=ncufp8 for the GEMV's tiles.
# Session 47 (H100, calls 1-2): with the GEMV FP8 2.520 / 2.551 ms against 2.615 / 2.631 tiled at batch 1 (0.84-0.85x
# bf16); --act-probe found the one-token expert launches waiting on the W8A16 weight conversion (37.7 us W8A16,
# 23.0 on rows quantized ahead). Quantizing the row inside every program of the expert launches gave it back (36.3;
# 52.0 against 36.2 with the shared experts) and was dropped (commit cbf6386). The probe's export applies to the later
# steps of a call: an A/B of a switch it also sets must come before ncufp8 or run without it.
# Session 48: f16 activations for the two decode expert launches (kernels.triton_f16_groups, TANDEM_FP8_DECODE_F16):
# the weight tile converts with the hardware's e4m3x2 -> f16x2 and the row's f16 form is exact. Its step A/B first
# (before ncufp8, whose export would set the switch for both arms), then the probe, then the GPU tests with it on.
# Batch 1 and 16 run the two launches, 8 the one-launch kernel: f16 in both since session 48.
# Session 48 had no machine (eleven calls found none, then loans were paused): this is the next call as it stands.
default_steps="fp8vsbf16 fp8vsbf16@f16 ncufp8 tests@f16"
echo "card: ${card:-none}; steps: ${STEPS:-$default_steps}"
PD_ARGS_p70=${PD_ARGS_p70:-"--mps-prefill-sm 70"} PD_ARGS_p50=${PD_ARGS_p50:-"--mps-prefill-sm 50"} \
PD_ENV_nopdl=${PD_ENV_nopdl:-"TANDEM_PDL=0"} PD_ARGS_noovl=${PD_ARGS_noovl:-"--disable-overlap-schedule"} \
PD_ARGS_noovl2=${PD_ARGS_noovl2:-"--disable-overlap-schedule"} PD_ARGS_g16=${PD_ARGS_g16:-"--cuda-graph-max-bs 16"} PD_ARGS_big=${PD_ARGS_big:-"--max-prefill-tokens 16384"} \
PD_ARGS_noovlbig=${PD_ARGS_noovlbig:-"--max-prefill-tokens 16384 --disable-overlap-schedule"} \
PD_ENV_onelaunch=${PD_ENV_onelaunch:-"TANDEM_MOE_FUSED_DECODE=1"} PD_ENV_onelaunch2=${PD_ENV_onelaunch2:-"TANDEM_MOE_FUSED_DECODE=1"} PD_ENV_two=${PD_ENV_two:-"TANDEM_MOE_FUSED_DECODE=0"} PD_ENV_two2=${PD_ENV_two2:-"TANDEM_MOE_FUSED_DECODE=0"} \
PD_ENV_tiled=${PD_ENV_tiled:-"TANDEM_FP8_DENSE_GEMV=0"} PD_ENV_tiled2=${PD_ENV_tiled2:-"TANDEM_FP8_DENSE_GEMV=0"} \
PD_ENV_gemv2=${PD_ENV_gemv2:-"TANDEM_FP8_DENSE_GEMV=1"} PD_ENV_f16=${PD_ENV_f16:-"TANDEM_FP8_DECODE_F16=1"} PD_ENV_f16b=${PD_ENV_f16b:-"TANDEM_FP8_DECODE_F16=1"} PD_ENV_w8a16b=${PD_ENV_w8a16b:-"TANDEM_FP8_DECODE_F16=0"} \
    DS=${DS:-"--device cuda --model-config v2-lite --load-format dummy --batch-sizes 1,8,16 --context 1024"} PD_ENV_fused=${PD_ENV_fused:-"TANDEM_HEAD_MATMUL=triton TANDEM_COMBINE_NORM=1 TANDEM_ROUTER_FUSED=1"} STEPS=${STEPS:-$default_steps} SWEEP_LIMIT=${SWEEP_LIMIT:-200} FP8_SWEEP_ARGS=${FP8_SWEEP_ARGS:-"--iters 20 --act-probe"} \
    TESTS_K=${TESTS_K:-"greedy_tokens_equal or one_launch or masked_moe_with_shared or graph or gemv or keeps_the_dequantized or f16_activation"} exec bash scripts/device_step.sh
