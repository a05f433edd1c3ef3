#!/usr/bin/env bash
# The next device call for the open issues, its steps chosen by the card that came (scripts/device_step.sh runs
# them; its header says what each step does). Issue 15's c8 line (2x the base tree's 313 tok/s, measured on an
# H200) can only be settled on an H200: there the c8 runs come first; on an H100 the FP8 decode sweep does.
#   OUT=DIR BUDGET=540 bash scripts/device_next.sh      (STEPS / SWEEP_LIMIT override the choice)
# From the machine here: carry .gpu_bundle, .issue_base and a snapshot .snap (`git archive HEAD`), then
#   mkdir -p $OUT; ln -sfn ../.gpu_bundle .snap/.gpu_bundle; ln -sfn ../.issue_base .snap/.issue_base; cd .snap;
#   OUT=$OUT BUDGET=540 bash scripts/device_next.sh > $OUT/console.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/.."
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# The first decode-step run of a call once measured the FP8 step at batch 1 0.35 ms slower than later runs with
# the same kernel times (session 41, its p20 too): the defaults run twice, after the PDL run and last.
steps="fp8vsbf16@pdl fp8vsbf16@defaults fp8vsbf16@prefetch fp8vsbf16@pdlprefetch"
if [[ $card == *H200* ]]; then
    default_steps="pdissuebase pdmps $steps ncufp8 tests"
else
    default_steps="$steps fp8vsbf16@defaults2 ncufp8 tests"
fi
echo "card: ${card:-none}; steps: ${STEPS:-$default_steps}"
# Session 41's sweep made "bits", 4 stages for the expert tiles and the in-launch split sums the defaults. This
# call times the decode GEMMs asking L2 for their weight slices first (kernels.triton_prefetch) against the
# defaults, with and without programmatic dependent launch (then before the wait), step by step and (ncufp8,
# after the steps since its winners are exported to the later ones) one layer's launches alone; the tests check
# that the prefetch and PDL keep every bit and the greedy tokens. fp8vsbf16@fused times both steps with W_UV's
# product in Triton (kernels.triton_head_matmul), each MoE layer's weighted sum inside the next residual add +
# RMSNorm (engine.moe.COMBINE_NORM_ENV) and the router's top-k inside its logits' launch (kernels.triton_router):
# the last two were slower in session 40's H100 run (README), so time them again only after changing them.
PD_ENV_pdl=${PD_ENV_pdl:-"TANDEM_PDL=1"} PD_ENV_prefetch=${PD_ENV_prefetch:-"TANDEM_WEIGHT_PREFETCH=1"} \
PD_ENV_pdlprefetch=${PD_ENV_pdlprefetch:-"TANDEM_PDL=1 TANDEM_WEIGHT_PREFETCH=1"} \
PD_ENV_fused=${PD_ENV_fused:-"TANDEM_HEAD_MATMUL=triton TANDEM_COMBINE_NORM=1 TANDEM_ROUTER_FUSED=1"} STEPS=${STEPS:-$default_steps} SWEEP_LIMIT=${SWEEP_LIMIT:-200} FP8_SWEEP_ARGS=${FP8_SWEEP_ARGS:-"--dense"} \
    TESTS_K=${TESTS_K:-"prefetch or pdl or programmatic or greedy_tokens_equal or split_sums or either_weight"} exec bash scripts/device_step.sh
