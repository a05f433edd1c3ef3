"""Where a program of the grouped GEMM kernels works, shared by the bf16 expert GEMMs (``kernels.triton_moe``)
and the FP8 dense and expert GEMMs (``kernels.triton_fp8``, ``kernels.triton_fp8_moe``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in the grouped launch order: GROUP_M row blocks share each
    weight tile while it is hot in L2."""
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m


@triton.jit
def masked_expert(column, active_ptr, num_experts, active_slots, ACTIVE: tl.constexpr):
    """The expert a masked-layout grid column runs (int64), or -1 where the column has none. Without ACTIVE,
    column e is expert e (and column num_experts the EXTRA expert, where launched). With it, column i <
    active_slots runs the i-th active expert (``active_ptr``: their ids, then how many: a column past that
    count has none) and column active_slots is EXTRA's, given the id num_experts."""
    expert = column.to(tl.int64)
    if ACTIVE:
        if expert == active_slots:
            expert = expert * 0 + num_experts
        elif expert >= tl.load(active_ptr + num_experts):
            expert = expert * 0 - 1
        else:
            expert = tl.load(active_ptr + expert).to(tl.int64)
    return expert
