"""The launch of ``kernels.l2_prefetch``'s plans: ``cp.async.bulk.prefetch.L2`` per chunk, before the PDL wait."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.l2_prefetch import PrefetchPlan
from kernels.triton_pdl import pdl_args, pdl_begin

LANES = 32  # chunks a program issues (one warp, a chunk a lane)


@triton.jit
def _l2_prefetch_kernel(addr_ptr, size_ptr, count, LANES: tl.constexpr, PDL: tl.constexpr):
    # The plan is read before the wait on the kernel ahead: no kernel writes it (see the module's docstring).
    offs = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = offs < count
    addr = tl.load(addr_ptr + offs, mask=live, other=0)
    size = tl.load(size_ptr + offs, mask=live, other=0)
    tl.inline_asm_elementwise(
        "{ .reg .pred live; .reg .u64 ga; setp.ne.s32 live, $2, 0; cvta.to.global.u64 ga, $1; "
        "@live cp.async.bulk.prefetch.L2.global [ga], $2; mov.b32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    pdl_begin(PDL)


def l2_prefetch(plan: PrefetchPlan) -> None:
    """One launch asking L2 for ``plan``'s chunks (on the current stream; see the module's docstring)."""
    count = plan.addresses.numel()
    _l2_prefetch_kernel[(triton.cdiv(count, LANES),)](plan.addresses, plan.sizes, count, LANES=LANES, num_warps=1,
                                                      **pdl_args(plan.addresses))
