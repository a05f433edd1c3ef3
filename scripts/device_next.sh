#!/usr/bin/env bash
# The next device call for the open issues, its steps chosen by the card that came (scripts/device_step.sh runs
# them; its header says what each step does). Issue 15's c8 line asks 2x the base tree's 313 tok/s (an H200's);
# on an H100 the base gives 311 and this tree 589-592 (1.90x): the c8 runs come first on either card.
#   OUT=DIR BUDGET=540 bash scripts/device_next.sh      (STEPS / SWEEP_LIMIT override the choice)
# From the machine here: carry .gpu_bundle, .issue_base and a snapshot .snap (`git archive HEAD`), then
#   mkdir -p $OUT; ln -sfn ../.gpu_bundle .snap/.gpu_bundle; ln -sfn ../.issue_base .snap/.issue_base; cd .snap;
#   OUT=$OUT BUDGET=540 bash scripts/device_next.sh > $OUT/console.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/.."
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# Issue 15's c8: on an H100 the decode's ITL is 7.3-8 ms while no prefill runs and 10.5-11.5 while one does
# (session 41, compare_pd_v2lite_c8_mps_h100_s41.json's requests): the prefill capped at 70 / 50 % of the SMs under
# MPS (never run yet) trades a slower prefill for a faster decode beside it; pdmps is their baseline in the same
# call. Then the FP8 step with and without PDL (its one-token launches gained 2 % with it in session 41; the first
# decode-step run of a call once read the FP8 step at batch 1 0.3 ms slower with the same kernel times, so it runs
# after the serving steps).
if [[ $card == *H200* ]]; then
    default_steps="pdissuebase pdmps pdmps@p70 pdmps@run2 fp8vsbf16 fp8vsbf16@pdl tests"
else
    default_steps="pdmps pdmps@p70 pdmps@p50 fp8vsbf16 fp8vsbf16@pdl tests"
fi
echo "card: ${card:-none}; steps: ${STEPS:-$default_steps}"
PD_ARGS_p70=${PD_ARGS_p70:-"--mps-prefill-sm 70"} PD_ARGS_p50=${PD_ARGS_p50:-"--mps-prefill-sm 50"} \
PD_ENV_pdl=${PD_ENV_pdl:-"TANDEM_PDL=1"} \
PD_ENV_fused=${PD_ENV_fused:-"TANDEM_HEAD_MATMUL=triton TANDEM_COMBINE_NORM=1 TANDEM_ROUTER_FUSED=1"} STEPS=${STEPS:-$default_steps} SWEEP_LIMIT=${SWEEP_LIMIT:-200} FP8_SWEEP_ARGS=${FP8_SWEEP_ARGS:-"--sweep --dense"} \
    TESTS_K=${TESTS_K:-"pdl or programmatic or greedy_tokens_equal or split_sums or either_weight or fp8_model"} exec bash scripts/device_step.sh
