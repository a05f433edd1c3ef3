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
# Issue 15's c8 on an H100 (session 42): the base tree 304.2 / 313.4 tok/s in two calls; this tree under MPS
# 576.8 / 584.9 (call 1), and with the overlapped decode (engine.decode_overlap, on by default on CUDA since)
# 590.6 / 594.7 against 563.5 with --disable-overlap-schedule (call 2): the decode turn's GPU idle 0.84 -> 0.02 ms.
# Next: c8 again beside the base (a third overlapped sample and one without), then c32 with the overlap, at the
# setup that gave 2.14 / 2.18x its base in session 36 (the decode at 50 % of the SMs, 16384-token prefill
# forwards), with and without the overlap, the GPU tests (sampled rows overlapped too), and which MPS shares
# the prefill's GEMMs survive (70 % gave NaN from cuBLAS): a prefill cap between 50 % (slower) and none is untried.
default_steps="pdissuebase pdmps pdmps@noovl pdmps@run2 pd32issuebase pd32mps50@big pd32mps50@noovlbig tests nanprobesweep"
echo "card: ${card:-none}; steps: ${STEPS:-$default_steps}"
PD_ARGS_p70=${PD_ARGS_p70:-"--mps-prefill-sm 70"} PD_ARGS_p50=${PD_ARGS_p50:-"--mps-prefill-sm 50"} \
PD_ENV_nopdl=${PD_ENV_nopdl:-"TANDEM_PDL=0"} PD_ARGS_noovl=${PD_ARGS_noovl:-"--disable-overlap-schedule"} \
PD_ARGS_noovl2=${PD_ARGS_noovl2:-"--disable-overlap-schedule"} PD_ARGS_noturn=${PD_ARGS_noturn:-"--no-prefill-turn"} PD_ARGS_big=${PD_ARGS_big:-"--max-prefill-tokens 16384"} \
PD_ARGS_noovlbig=${PD_ARGS_noovlbig:-"--max-prefill-tokens 16384 --disable-overlap-schedule"} \
PD_ENV_fused=${PD_ENV_fused:-"TANDEM_HEAD_MATMUL=triton TANDEM_COMBINE_NORM=1 TANDEM_ROUTER_FUSED=1"} STEPS=${STEPS:-$default_steps} SWEEP_LIMIT=${SWEEP_LIMIT:-200} FP8_SWEEP_ARGS=${FP8_SWEEP_ARGS:-"--sweep --dense"} \
    TESTS_K=${TESTS_K:-"overlap or greedy_tokens_equal"} exec bash scripts/device_step.sh
