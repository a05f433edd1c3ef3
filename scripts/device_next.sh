#!/usr/bin/env bash
# The next device call for the open issues, its steps chosen by the card that came (scripts/device_step.sh runs
# them; its header says what each step does). Issue 15's c8 line asks 2x the base tree's 313 tok/s (an H200's):
# the c8 runs, with the base tree beside them, come first on either card.
#   OUT=DIR BUDGET=540 bash scripts/device_next.sh      (STEPS / SWEEP_LIMIT override the choice)
# From the machine here: carry .gpu_bundle, .issue_base and a snapshot .snap (`git archive HEAD`), then
#   mkdir -p $OUT; ln -sfn ../.gpu_bundle .snap/.gpu_bundle; ln -sfn ../.issue_base .snap/.issue_base; cd .snap;
#   OUT=$OUT BUDGET=540 bash scripts/device_next.sh > $OUT/console.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/.."
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# Issue 15's c8 on an H100 (session 41, three calls): this tree under MPS 571.6-591.6 tok/s, with programmatic
# dependent launch 589.7 (the default since), the base tree 296.7-304.2 in the same calls (1.88-1.96x; 1.94x with
# PDL); the prefill capped at 50 % of the SMs 541.7. At 70 % the prefill's first forward came out NaN in both calls
# that tried it: nanprobe finds the first module that goes non-finite. Then c8 (the base tree beside it; on an
# H200, the issue's card) with the defaults against TANDEM_PDL=0, twice on an H100, hostpath (a decode turn's
# host time beside its forward on the GPU: what overlapping the decode loop's host work with the next forward
# could win), the FP8 step with and without PDL, and the GPU tests.
if [[ $card == *H200* ]]; then
    default_steps="nanprobe pdissuebase pdmps pdmps@nopdl hostpath pdmps@run2 fp8vsbf16 fp8vsbf16@nopdl tests"
else
    default_steps="nanprobe pdissuebase pdmps pdmps@nopdl hostpath pdmps@run2 pdmps@nopdl2 fp8vsbf16 tests"
fi
echo "card: ${card:-none}; steps: ${STEPS:-$default_steps}"
PD_ARGS_p70=${PD_ARGS_p70:-"--mps-prefill-sm 70"} PD_ARGS_p50=${PD_ARGS_p50:-"--mps-prefill-sm 50"} \
PD_ENV_nopdl=${PD_ENV_nopdl:-"TANDEM_PDL=0"} PD_ENV_nopdl2=${PD_ENV_nopdl2:-"TANDEM_PDL=0"} \
PD_ENV_fused=${PD_ENV_fused:-"TANDEM_HEAD_MATMUL=triton TANDEM_COMBINE_NORM=1 TANDEM_ROUTER_FUSED=1"} STEPS=${STEPS:-$default_steps} SWEEP_LIMIT=${SWEEP_LIMIT:-200} FP8_SWEEP_ARGS=${FP8_SWEEP_ARGS:-"--sweep --dense"} \
    TESTS_K=${TESTS_K:-"pdl or programmatic or greedy_tokens_equal or split_sums or either_weight or fp8_model or head_matmul"} exec bash scripts/device_step.sh
