"""Decode activations as f16 with a power-of-two scale per row and column group, for the FP8 expert launches.

Why: at one token the W8A16 expert launches wait on turning each FP8 weight tile into bf16 (about eleven
instructions per four values), not on its bytes. A weight tile multiplied against f16 activations converts
with the hardware's e4m3x2 -> f16x2 instruction (one per two values): on one H100 a V2-Lite layer's routed
expert launches took 23 us that way (their rows quantized ahead) against W8A16's 37.7
(``tests/fp8_moe_one_token.py --act-probe``, session 47).

Why f16 and not FP8 activations: a bf16 value times a power of two is exactly an f16 value while it stays in
f16's normal range (bf16 has 8 significant bits, f16 11). Each group's scale puts its largest magnitude in
[2^14, 2^15), so every value above 2^-29 of that maximum converts exactly; the products are the W8A16 GEMM's,
and only values too small to move the sums lose bits. The weights stay the only quantized operand.

Switched by ``kernels.f16_groups.F16_DECODE_ENV`` (off until a GPU run has timed it against W8A16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.f16_groups import F16Rows, empty_f16_groups
from kernels.triton_grid import masked_expert
from kernels.triton_pdl import pdl_args, pdl_begin


@triton.jit
def pow2_scale(amax):
    """(s, 1 / s) for per-row maxima ``amax`` >= 0: s a power of two with amax / s in [2^14, 2^15), built from
    the exponent bits (exact; no division). Rows whose maximum is below 2^-112 (zero rows) take s = 2^-126."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(e, 15), 254)
    s = ((e - 14) << 23).to(tl.float32, bitcast=True)
    inv = ((268 - e) << 23).to(tl.float32, bitcast=True)
    return s, inv


@triton.jit
def f16_rows(v):
    """fp32 tile ``[R, G]`` -> (its rows times their 1 / s, ready for an exact f16 cast; s per row)."""
    s, inv = pow2_scale(tl.max(tl.abs(v), axis=1))
    return v * inv[:, None], s


@triton.jit
def f16_groups_of_row(src, q_dst, s_dst, dim, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                      GROUPS_A_LOAD: tl.constexpr):
    """One row of ``dim`` values at ``src`` in f16 groups of GROUP, GROUPS_A_LOAD groups a load (the scatter
    writes each row it copies this way)."""
    for g0 in tl.static_range(0, GROUPS, GROUPS_A_LOAD):
        offs_g = g0 + tl.arange(0, GROUPS_A_LOAD)
        cols = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = (offs_g < GROUPS)[:, None] & (cols < dim)
        q, scale = f16_rows(tl.load(src + cols, mask=mask, other=0.0).to(tl.float32))
        tl.store(q_dst + cols, q.to(tl.float16), mask=mask)
        tl.store(s_dst + offs_g, scale, mask=offs_g < GROUPS)


@triton.jit
def _f16_groups_kernel(x_ptr, xq_ptr, xs_ptr, counts_ptr, active_ptr, h_ptr, hq_ptr, hs_ptr, num_experts, slots,
                       capacity, K, stride_xe, stride_xm, stride_qe, stride_qm, stride_se, stride_sm, stride_hm,
                       stride_hqm, stride_hsm, GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       ACTIVE: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    # program_id(0): an expert (with ACTIVE, a slot of the active-expert list) and its counted rows, or the one
    # past them, where launched: every row of h (the shared experts' input). program_id(1): a block of rows,
    # program_id(2): a column group.
    expert = masked_expert(tl.program_id(0), active_ptr, num_experts, slots, ACTIVE)
    if expert < 0:
        return
    local = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(2) * GROUP + tl.arange(0, GROUP)
    if expert == num_experts:
        rows = local.to(tl.int64)
        row_mask = local < capacity
        src = h_ptr + rows[:, None] * stride_hm
        dst = hq_ptr + rows[:, None] * stride_hqm
        scale_ptrs = hs_ptr + rows * stride_hsm
    else:
        count = tl.load(counts_ptr + expert).to(tl.int32)
        if tl.program_id(1) * BLOCK_ROWS >= count:
            return
        rows = local.to(tl.int64)
        row_mask = (local < count) & (local < capacity)
        src = x_ptr + expert * stride_xe + rows[:, None] * stride_xm
        dst = xq_ptr + expert * stride_qe + rows[:, None] * stride_qm
        scale_ptrs = xs_ptr + expert * stride_se + rows * stride_sm
    mask = row_mask[:, None] & (cols < K)[None, :]
    q, s = f16_rows(tl.load(src + cols[None, :], mask=mask, other=0.0).to(tl.float32))
    tl.store(dst + cols[None, :], q.to(tl.float16), mask=mask)
    tl.store(scale_ptrs + tl.program_id(2), s, mask=row_mask)


def _launch(x: torch.Tensor, counts: torch.Tensor, active: tuple[torch.Tensor, int] | None,
            hidden: torch.Tensor | None, group: int) -> F16Rows:
    experts, capacity, k = x.shape
    groups = triton.cdiv(k, group)
    xq, xs = empty_f16_groups((experts, capacity), k, group, x.device)
    h = hidden if hidden is not None else x[0]  # never read without its column
    hq, hs = empty_f16_groups((h.shape[0],), k, group, x.device)
    block_rows = min(16, triton.next_power_of_2(capacity))
    active_ids, slots = active if active is not None else (counts, experts)
    slots = min(slots, experts)
    grid = (slots + (hidden is not None), triton.cdiv(capacity, block_rows), groups)
    _f16_groups_kernel[grid](
        x, xq, xs, counts, active_ids, h, hq, hs, experts, slots, capacity, k, x.stride(0), x.stride(1),
        xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1), h.stride(0), hq.stride(0), hs.stride(0),
        GROUP=group, BLOCK_ROWS=block_rows, ACTIVE=active is not None, num_warps=4, **pdl_args(x),
    )  # fmt: skip
    return F16Rows(xq, xs, hq, hs)


def f16_groups_active(x: torch.Tensor, counts: torch.Tensor, active: tuple[torch.Tensor, int], hidden: torch.Tensor,
                      group: int) -> F16Rows:
    """One launch: the counted rows of the active experts of the masked layout ``x`` ``[E, capacity, K]`` and
    every row of ``hidden`` ``[capacity, K]`` in f16 groups (``kernels.f16_groups.f16_groups``'s values). Rows
    of ``x`` past their expert's count, and inactive experts', are left unwritten (never read). The scatter
    writes the same where the engine asks it to (``kernels.moe_scatter_rows_active_f16``): this launch serves
    the callers that bring bf16 rows."""
    return _launch(x, counts, active, hidden, group)


def f16_groups_masked(x: torch.Tensor, counts: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's counted rows of ``x`` ``[E, capacity, K]`` in f16 groups, in one launch: (rows, scales)."""
    rows = _launch(x, counts, None, None, group)
    return rows.rows, rows.row_scales
