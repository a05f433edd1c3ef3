"""Where a program of the grouped GEMM kernels works, shared by the bf16 expert GEMMs (``kernels.triton_moe``)
and the FP8 dense and expert GEMMs (``kernels.triton_fp8``, ``kernels.triton_fp8_moe``)."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.backend import env_flag

# The masked launches' shared experts (their EXTRA column, the widest work of the grid: a V2-Lite layer's two
# shared experts are 2816 gate/up columns where a routed one has 1408) scheduled first instead of last: the
# longest work first leaves the last wave the short tiles, and the shared weights are read before the routed
# ones stream through L2 (where kernels.l2_prefetch put them). Same tiles, same bits.
SHARED_FIRST_ENV = "TANDEM_MOE_SHARED_FIRST"


def extra_mode(extra: bool) -> int:
    """The grouped kernels' EXTRA argument: 0 without an extra expert, 1 its column last, 2 first
    (``SHARED_FIRST_ENV``)."""
    if not extra:
        return 0
    return 2 if env_flag(SHARED_FIRST_ENV) else 1


@triton.jit
def grid_column(EXTRA: tl.constexpr):
    """The masked-layout column (``masked_expert``'s) this program runs: its own, or with EXTRA 2 the columns
    turned by one, so that the grid's first column runs the extra expert's (the last)."""
    column = tl.program_id(1)
    if EXTRA == 2:
        columns = tl.num_programs(1)
        column = (column + columns - 1) % columns
    return column


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
