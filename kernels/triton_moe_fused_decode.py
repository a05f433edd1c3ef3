"""A decode MoE layer's two expert GEMMs (gate/up, then down) in one launch, routed and shared experts alike.

At one token a layer's expert GEMMs stream 66 MiB of FP8 weights (V2-Lite: six routed experts and the shared
ones) in two launches of ~20 us each, and each launch pays its own ramp, tail and launch gap: graph-timed on an
H100 they took 36.9 us where the bytes take 22.9 at ``copy_``'s rate (README, the FP8 decode step). Here one
grid holds both: its first programs are the gate/up tiles, the rest the down tiles. A down program waits for
the gate/up tiles of its (expert, row block) to be stored, then runs exactly the down launch's tile, so the
result is bit for bit the two launches' (same tiles, same K order, the intermediate rounded to the activation
dtype in memory between them), while the down tiles of the experts done first stream their weights under the
gate/up tail of the others and the launch boundary is gone.

Why the wait cannot deadlock: a grid's programs start in the order of their index, and every gate/up program
has a lower index than every down program, so by the time a down program waits, every gate/up program has
started; none of them waits on anything. (Triton's CPU interpreter runs programs one after another in that
order, so there the waits are always already satisfied.) The counters follow ``kernels.triton_last_program``'s
protocol: a gate/up program arrives after a block barrier with a release; a down program spins with acquire
loads; the last down program of an (expert, row block) sets both of its counters back to 0 for the next launch
(a CUDA graph replays the same counters).

Weights are FP8 with 128 x 128 block scales (W8A16: the tile converted to the activation dtype, as
``kernels.triton_fp8_moe``'s decode launches) or in the activation dtype (``kernels.triton_moe``'s masked
launches); the masked layout, its grid of active experts (``kernels.active_experts``) and the shared experts
as one more expert of every row (EXTRA) only: what a decode step's MoE runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import env_choice
from kernels.f16_groups import F16Rows, empty_f16_groups
from kernels.triton_f16_groups import f16_rows
from kernels.triton_fp8 import _round_to_bf16, w8a16_bits, w8a16_tile
from kernels.triton_grid import masked_expert
from kernels.triton_last_program import arrive_last, launch_counters, reset_counter
from kernels.triton_pdl import pdl_args, pdl_begin

# "auto" (the default), "1" or "0": the decode MoE in one launch at AUTO_ROWS tokens an expert, wherever it
# applies, or never. One H100, the V2-Lite step's graph replays with two launches and with one, two pairs of runs
# in one call (bench/results/decode_step_fp8_vs_bf16_{two,onelaunch}{,2}_call2_h100_s44.json) and a third at
# batch 1 / 8 in another (_call1_): one launch was faster at batch 2 and 4 in every pair (FP8 3-10 %, bf16 1-6 %),
# at 8 in five of six comparisons (up to 5 %), within 3 % either way at 16, and split at 1 for FP8 (+4, +2
# and -1 %).
FUSED_DECODE_ENV = "TANDEM_MOE_FUSED_DECODE"
AUTO_ROWS = (2, 8)


@triton.jit
def _tile(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, row_mask, n_mask, k_dim, up_rows, up_scale_rows, NUM_KB: tl.constexpr,
          GATED: tl.constexpr, FP8: tl.constexpr, BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
          A_FROM_L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          F16: tl.constexpr, KB_PER_SCALE: tl.constexpr):
    """One output tile over ``NUM_KB`` K blocks: the gate (or only) accumulator and the up one, in the order
    and arithmetic of ``kernels.triton_fp8_moe._fp8_k_loop`` (FP8, W8A16 or, with F16, f16 activations with
    their scales at ``as_ptrs``, ``KB_PER_SCALE`` K blocks a weight scale) or ``kernels.triton_moe._moe_gemm_kernel``.
    ``up_rows`` / ``up_scale_rows``: the offsets of the up half's weight rows and scale rows. ``A_FROM_L2``: the
    activation tile (and its scales) was written by other programs of this launch, so it is read past L1
    (``.cg``)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, NUM_KB):
        k_mask = offs_k < k_dim - kb * BLOCK_K
        if A_FROM_L2:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0, cache_modifier=".cg")
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if F16:
            if A_FROM_L2:
                a_s = tl.load(as_ptrs + kb, mask=row_mask, other=0.0, cache_modifier=".cg")
            else:
                a_s = tl.load(as_ptrs + kb, mask=row_mask, other=0.0)
        if FP8:
            b_s = tl.load(bs_ptrs + kb // KB_PER_SCALE, mask=n_mask, other=0.0)
            if F16:
                acc += tl.dot(a, b.to(tl.float16)) * a_s[:, None] * b_s[None, :]
            else:
                acc += tl.dot(a, w8a16_tile(b, a, BITS), input_precision=DOT_PRECISION) * b_s[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + up_rows, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8:
                bs_up = tl.load(bs_ptrs + up_scale_rows + kb // KB_PER_SCALE, mask=n_mask, other=0.0)
                if F16:
                    acc_up += tl.dot(a, b_up.to(tl.float16)) * a_s[:, None] * bs_up[None, :]
                else:
                    acc_up += tl.dot(a, w8a16_tile(b_up, a, BITS), input_precision=DOT_PRECISION) * bs_up[None, :]
            else:
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc, acc_up


@triton.jit
def _either(shared, routed, shared_value):
    """A routed expert's operand or the shared experts'."""
    value = routed
    if shared:
        value = shared_value
    return value


@triton.jit
def _pick(gate_up, shared, gate_up_routed, gate_up_shared, down_routed, down_shared):
    """One of a program's four operand choices: by phase (gate/up or down), then routed expert or shared."""
    value = down_routed
    if gate_up:
        value = gate_up_routed
        if shared:
            value = gate_up_shared
    elif shared:
        value = down_shared
    return value


@triton.jit
def _moe_fused_decode_kernel(
    x_ptr, w13_ptr, s13_ptr, inter_ptr, w2_ptr, s2_ptr, out_ptr, counts_ptr, active_ptr, sync_ptr,
    h_ptr, sw13_ptr, ss13_ptr, sinter_ptr, sw2_ptr, ss2_ptr, sout_ptr,
    num_experts, slots, capacity, D, INTER, SI,
    stride_xe, stride_xm, stride_w13e, stride_w13n, stride_s13e, stride_s13n,
    stride_ie, stride_im, stride_w2e, stride_w2n, stride_s2e, stride_s2n, stride_oe, stride_om,
    stride_hm, stride_sw13n, stride_ss13n, stride_sim, stride_sw2n, stride_ss2n, stride_som,
    xs_ptr, is_ptr, hs_ptr, sis_ptr, stride_xse, stride_xsm, stride_ise, stride_ism, stride_hsm, stride_sism,
    NUM_KB_D: tl.constexpr, NUM_KB_I: tl.constexpr, NUM_KB_SI: tl.constexpr, TILES_1: tl.constexpr,
    TILES_2: tl.constexpr, M_BLOCKS: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, FP8: tl.constexpr,
    BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, F16: tl.constexpr, DOWN_K: tl.constexpr, PDL: tl.constexpr,
):
    # F16 (FP8 weights only): x and h are f16 with a scale per row and BLOCK_K columns (xs, hs); the gate/up
    # tiles write the intermediates in f16 with a scale per row and tile (is, sis), and the down tiles walk K in
    # those tiles (DOWN_K = BLOCK_N columns a step; NUM_KB_I / NUM_KB_SI count them), as the two launches of
    # kernels.triton_fp8_moe do on f16 activations.
    pdl_begin(PDL)
    # Programs [0, first_down) are gate/up tiles, the rest down tiles; each ordered column (expert) first, then
    # row block, then column tile, so the experts listed first finish their gate/up first.
    first_down = (slots + 1) * M_BLOCKS * TILES_1
    pid = tl.program_id(0)
    gate_up = pid < first_down
    r = tl.where(gate_up, pid, pid - first_down)
    tiles = tl.where(gate_up, TILES_1, TILES_2)
    column = r // (M_BLOCKS * tiles)
    pid_m = (r // tiles) % M_BLOCKS
    pid_n = r % tiles
    expert = masked_expert(column, active_ptr, num_experts, slots, True)
    if expert < 0:  # a column past the active experts
        return
    shared = expert == num_experts
    count = tl.load(counts_ptr + expert, mask=expert < num_experts, other=0).to(tl.int32)
    if shared:
        count = tl.zeros_like(count) + capacity
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols = offs_n.to(tl.int64)
    rows = offs_m.to(tl.int64)
    row_mask = offs_m < count
    # Two counters an (expert column, row block): gate/up tiles stored, down tiles done.
    sync = sync_ptr + (column * M_BLOCKS + pid_m) * 2
    # This program's operands: gate/up reads the rows (x, or the hidden rows for the shared experts) and writes
    # the intermediate; down reads that and writes the output.
    a_base = _pick(gate_up, shared, x_ptr + expert * stride_xe, h_ptr, inter_ptr + expert * stride_ie, sinter_ptr)
    a_stride = _pick(gate_up, shared, stride_xm, stride_hm, stride_im, stride_sim)
    b_base = _pick(gate_up, shared, w13_ptr + expert * stride_w13e, sw13_ptr, w2_ptr + expert * stride_w2e, sw2_ptr)
    b_stride = _pick(gate_up, shared, stride_w13n, stride_sw13n, stride_w2n, stride_sw2n)
    bs_base = _pick(gate_up, shared, s13_ptr + expert * stride_s13e, ss13_ptr, s2_ptr + expert * stride_s2e, ss2_ptr)
    bs_stride = _pick(gate_up, shared, stride_s13n, stride_ss13n, stride_s2n, stride_ss2n)
    c_stride = _pick(gate_up, shared, stride_im, stride_sim, stride_om, stride_som)
    width = _pick(gate_up, shared, INTER, SI, INTER, SI)  # the intermediate's: gate/up's N, down's K
    # The activation scales (F16): tensors, not the constants Triton makes of integer arguments equal to 1.
    zero = tl.zeros([], tl.int32)
    as_base = _pick(gate_up, shared, xs_ptr + expert * stride_xse, hs_ptr, is_ptr + expert * stride_ise, sis_ptr)
    as_stride = _pick(gate_up, shared, stride_xsm + zero, stride_hsm + zero, stride_ism + zero, stride_sism + zero)
    if gate_up:
        if pid_n * BLOCK_N >= width or pid_m * BLOCK_M >= count:
            return  # past this expert's width or rows: no tile, no arrival (the down side counts the same way)
        n_mask = offs_n < width
        mid_base = _either(shared, inter_ptr + expert * stride_ie, sinter_ptr)  # f16 with F16: not the output's type
        acc, acc_up = _tile(a_base + rows[:, None] * a_stride + offs_k[None, :], as_base + rows * as_stride,
                            b_base + cols[None, :] * b_stride + offs_k[:, None],
                            bs_base + (offs_n // SCALE_BLOCK_N) * bs_stride, row_mask, n_mask, D,
                            width * b_stride, tl.cdiv(width, SCALE_BLOCK_N) * bs_stride, NUM_KB_D, True, FP8,
                            BITS, DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K, F16, 1)
        acc = acc * tl.sigmoid(acc) * acc_up
        if F16:  # rounded to bf16 first: the two launches' intermediate (kernels.triton_fp8_moe)
            q, scale = f16_rows(tl.where(n_mask[None, :], _round_to_bf16(acc), 0.0))
            tl.store(mid_base + rows[:, None] * c_stride + cols[None, :], q.to(tl.float16),
                     mask=row_mask[:, None] & n_mask[None, :])
            # The down phase's activation scales are this phase's output scales.
            cs_base = _either(shared, is_ptr + expert * stride_ise, sis_ptr)
            cs_stride = _either(shared, stride_ism + zero, stride_sism + zero)
            tl.store(cs_base + rows * cs_stride + pid_n, scale, mask=row_mask)
        else:
            tl.store(mid_base + rows[:, None] * c_stride + cols[None, :], acc.to(mid_base.dtype.element_ty),
                     mask=row_mask[:, None] & n_mask[None, :])
        tl.debug_barrier()  # every thread's stores before the one release
        tl.atomic_add(sync, 1, sem="release", scope="gpu")
    else:
        n_mask = offs_n < D
        out_base = _either(shared, out_ptr + expert * stride_oe, sout_ptr)
        store_mask = (offs_m < capacity)[:, None] & n_mask[None, :]
        if pid_m * BLOCK_M >= count:
            # No rows here: the output's rows past the count are zero (the masked layout's contract), and no
            # gate/up tile of this row block ran, so nothing to wait for.
            tl.store(out_base + rows[:, None] * c_stride + cols[None, :],
                     tl.zeros([BLOCK_M, BLOCK_N], dtype=out_base.dtype.element_ty), mask=store_mask)
            return
        stored = tl.cdiv(width, BLOCK_N)  # the gate/up tiles of this row block (its width is this K)
        while tl.atomic_add(sync, 0, sem="acquire", scope="gpu") < stored:
            pass
        tl.debug_barrier()
        offs_kd = tl.arange(0, DOWN_K)
        a_ptrs = a_base + rows[:, None] * a_stride + offs_kd[None, :]
        as_ptrs = as_base + rows * as_stride
        b_ptrs = b_base + cols[None, :] * b_stride + offs_kd[:, None]
        bs_ptrs = bs_base + (offs_n // SCALE_BLOCK_N) * bs_stride
        if shared:
            acc, _ = _tile(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, row_mask, n_mask, width, 0, 0, NUM_KB_SI, False, FP8,
                           BITS, DOT_PRECISION, True, BLOCK_M, BLOCK_N, DOWN_K, F16, BLOCK_K // DOWN_K)
        else:
            acc, _ = _tile(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, row_mask, n_mask, width, 0, 0, NUM_KB_I, False, FP8,
                           BITS, DOT_PRECISION, True, BLOCK_M, BLOCK_N, DOWN_K, F16, BLOCK_K // DOWN_K)
        tl.store(out_base + rows[:, None] * c_stride + cols[None, :], acc.to(out_base.dtype.element_ty),
                 mask=store_mask)
        if arrive_last(sync + 1, TILES_2):
            reset_counter(sync)
            reset_counter(sync + 1)


def fused_decode_applies(x: torch.Tensor, block_m: int, kb_step: int = 1) -> bool:
    """Whether ``moe_fused_decode`` takes this masked batch ``[E, capacity, D]``: one row block an expert
    (decode: the waits are per row block, and more of them would hold more programs waiting), one K block an
    iteration, and ``FUSED_DECODE_ENV`` says so (``auto``: capacity within ``AUTO_ROWS``)."""
    mode = env_choice(FUSED_DECODE_ENV, ("auto", "0", "1"), "auto")
    if mode == "0" or x.shape[1] > block_m or kb_step != 1:
        return False
    return mode == "1" or AUTO_ROWS[0] <= x.shape[1] <= AUTO_ROWS[1]


def moe_fused_decode(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     hidden: torch.Tensor, shared_gate_up: torch.Tensor, shared_down: torch.Tensor,
                     active: tuple[torch.Tensor, int], block: tuple[int, int, int], num_warps: int, num_stages: int,
                     precision: str | None,
                     scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     scale_block_n: int = 128, f16: F16Rows | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(routed ``[E, cap, D]``, shared ``[cap, D]``): the masked MoE over the active experts with the shared
    experts as one more, in one launch; None where no counters can be had (a first launch inside a CUDA-graph
    capture: the caller then launches twice). The routed rows of inactive experts are left unwritten, as the
    two launches leave them. ``block`` = (BLOCK_M, BLOCK_N, BLOCK_K) of both phases, ``precision`` ``tl.dot``'s
    input precision, each as the caller's two launches take them; ``scales`` = (w13's,
    w2's, the shared gate/up's, the shared down's) block scales where the weights are FP8 (W8A16, or with
    ``f16`` f16 activations: x and hidden in f16 groups of ``block``'s K, ``kernels.f16_groups``). None as well
    where an operand's last dim is not contiguous."""
    num_experts, capacity, dim = x.shape
    inter_dim, shared_inter = w2.shape[2], shared_down.shape[1]
    if any(t.stride(-1) != 1 for t in (x, w13, w2, hidden, shared_gate_up, shared_down, *(scales or ()))):
        return None  # the kernel steps K (and a scale row) one element at a time
    block_m, block_n, block_k = block
    slots = min(active[1], num_experts)
    m_blocks = triton.cdiv(capacity, block_m)
    sync = launch_counters(x.device, (slots + 1) * m_blocks * 2)
    if sync is None:
        return None
    fp8 = scales is not None
    use_f16 = fp8 and f16 is not None
    out = torch.empty_like(x)
    sout = torch.empty_like(hidden)
    s13, s2, ss13, ss2 = scales if fp8 else (w13, w2, shared_gate_up, shared_down)  # never read without FP8
    tiles_1 = triton.cdiv(max(inter_dim, shared_inter), block_n)
    tiles_2 = triton.cdiv(dim, block_n)
    down_k = block_n if use_f16 else block_k
    if use_f16:
        assert f16 is not None and block_k % block_n == 0
        a, xs, h, hs = f16
        inter, is_ = empty_f16_groups((num_experts, capacity), inter_dim, block_n, x.device)
        sinter, sis = empty_f16_groups((capacity,), shared_inter, block_n, x.device)
    else:
        a, h, xs, hs, is_, sis = x, hidden, s13, s13, s13, s13  # the scales are never read without f16
        inter = torch.empty((num_experts, capacity, inter_dim), dtype=x.dtype, device=x.device)
        sinter = torch.empty((capacity, shared_inter), dtype=x.dtype, device=x.device)
    grid = ((slots + 1) * m_blocks * (tiles_1 + tiles_2),)
    _moe_fused_decode_kernel[grid](
        a, w13, s13, inter, w2, s2, out, counts, active[0], sync,
        h, shared_gate_up, ss13, sinter, shared_down, ss2, sout,
        num_experts, slots, capacity, dim, inter_dim, shared_inter,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        inter.stride(0), inter.stride(1), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        out.stride(0), out.stride(1),
        h.stride(0), shared_gate_up.stride(0), ss13.stride(0), sinter.stride(0), shared_down.stride(0),
        ss2.stride(0), sout.stride(0),
        xs, is_, hs, sis, xs.stride(0), xs.stride(1), is_.stride(0), is_.stride(1), hs.stride(0), sis.stride(0),
        NUM_KB_D=triton.cdiv(dim, block_k), NUM_KB_I=triton.cdiv(inter_dim, down_k),
        NUM_KB_SI=triton.cdiv(shared_inter, down_k), TILES_1=tiles_1, TILES_2=tiles_2, M_BLOCKS=m_blocks,
        SCALE_BLOCK_N=scale_block_n, FP8=fp8, BITS=fp8 and not use_f16 and w8a16_bits(x),
        DOT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, F16=use_f16, DOWN_K=down_k, num_warps=num_warps,
        num_stages=num_stages, **pdl_args(x),
    )  # fmt: skip
    return out, sout
