"""A decode MoE layer's FP8 expert GEMMs as GEMVs, for a few rows an expert (W8A16, the masked layout).

The tiled masked launches (``kernels.triton_fp8_moe``) stream each expert's weight through a 4-stage pipeline of
16 x 32 x 128 tiles, the one token padded to the MMA's 16 rows. At one token they took 36.9 us a V2-Lite layer
where the bytes take 23.5 at ``copy_``'s rate (session 41). Here each program owns ``BLOCK_N`` whole output
columns of one expert, as ``kernels.triton_fp8_gemv`` does for a dense projection:

- Its weight slice (gate and up rows for the first launch) is loaded at once, the multiply-adds run on the CUDA
  cores in fp32 (the bf16 activation times the exactly converted weight, scaled per 128-wide K block), and the
  same loaded weights serve each of the expert's rows (``ROWS``, the masked layout's capacity, at most
  ``GEMV_MAX_ROWS``).
- The down launch finds its expert in the list of active experts and its weight slice *before* its PDL wait: the
  list and the counts were written by the scatter two launches back, which had finished before the gate/up
  launch it waits on could start (they are read past L1, ``.cg``). So the down weights stream while the gate/up
  launch still runs. The gate/up launch reads the list its predecessor wrote, so it waits first.

Same contract as the tiled launches: the routed output ``[E, capacity, D]`` with the rows past each active
expert's count zeroed (inactive experts' rows left unwritten), and the shared experts as one more expert of
every row (the EXTRA column).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import env_flag
from kernels.fp8 import BLOCK, BlockSize
from kernels.triton_fp8 import decode_tile_override, w8a16_bits, w8a16_tile
from kernels.triton_fp8_gemv import _chunk_dot, _rest_of_k, _weight_chunk
from kernels.triton_pdl import pdl_args

# "1": the decode MoE's FP8 experts run as these GEMVs where they apply (``moe_gemv_applies``); "0" (the default
# until a GPU run times them beside the tiled launches): the tiled launches.
GEMV_ENV = "TANDEM_FP8_MOE_GEMV"
GEMV_MAX_ROWS = 4
# A tile set by hand: "BLOCK_N,WARPS,CHUNK_KB" for both launches.
GEMV_TILE_ENV = "TANDEM_FP8_MOE_GEMV_TILE"


@dataclass(frozen=True)
class MoeGemvConfig:
    block_n: int
    num_warps: int
    chunk_kb: int  # K blocks loaded at once (a power of two); the first chunk before the down launch's wait


def moe_gemv_config(k_blocks: int) -> MoeGemvConfig:
    """4 columns a program (V2-Lite's gate/up at one token: 2,816 programs of 16 KB), 4 warps, a chunk covering
    K where that stays within 16 KB of weight a program, else the largest power of two that does."""
    tile = decode_tile_override(GEMV_TILE_ENV)
    if tile is not None:
        if len(tile) != 3:
            raise ValueError(f"{GEMV_TILE_ENV}: expected BLOCK_N,WARPS,CHUNK_KB, got {tile}")
        return MoeGemvConfig(*tile)
    chunk = min(triton.next_power_of_2(max(k_blocks, 1)), 16384 // (4 * 2 * BLOCK))
    return MoeGemvConfig(block_n=4, num_warps=4, chunk_kb=chunk)


def moe_gemv_applies(x: torch.Tensor) -> bool:
    """Whether the masked batch ``[E, capacity, D]`` runs as GEMVs: ``GEMV_ENV`` on, capacity within
    ``GEMV_MAX_ROWS``, CUDA or the interpreter."""
    return env_flag(GEMV_ENV) and 0 < x.shape[1] <= GEMV_MAX_ROWS


@triton.jit
def _expert_of(column, active_ptr, num_experts, active_slots):
    """``kernels.triton_grid.masked_expert`` over the active list, read from L2 (``.cg``): the expert of grid
    column ``column`` (``num_experts`` for the EXTRA column ``active_slots``), or -1."""
    expert = column.to(tl.int64)
    if expert == active_slots:
        expert = expert * 0 + num_experts
    elif expert >= tl.load(active_ptr + num_experts, cache_modifier=".cg"):
        expert = expert * 0 - 1
    else:
        expert = tl.load(active_ptr + expert, cache_modifier=".cg").to(tl.int64)
    return expert


@triton.jit
def _expert_rows(w0, s0, u0, su0, x_base, w_base, ws_base, out_base, cols, up_cols, scale_rows, up_scale_rows,
                 offs_n, n_mask, count, capacity, k_dim, stride_xm, stride_wn, stride_wsn, stride_om,
                 NUM_KB: tl.constexpr, GATED: tl.constexpr, ZERO_TAIL: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_K: tl.constexpr, CHUNK_KB: tl.constexpr, BITS: tl.constexpr):
    """Each of the expert's ``ROWS`` rows against the program's columns: chunk 0 (``w0``/``s0``, with GATED the
    up rows ``u0``/``su0``) already loaded, the rest of K loaded per row (from L2 after the first)."""
    like_x = tl.zeros([1], dtype=x_base.dtype.element_ty)
    w0 = w8a16_tile(w0, like_x, BITS)
    if GATED:
        u0 = w8a16_tile(u0, like_x, BITS)
    for r in tl.static_range(ROWS):
        x_row = x_base + r * stride_xm
        if r < count:
            acc = _chunk_dot(w0, s0, x_row, 0, k_dim, CHUNK_KB, BLOCK_K)
            acc += _rest_of_k(w_base, ws_base, cols, scale_rows, n_mask, x_row, k_dim, stride_wn, stride_wsn, like_x,
                              NUM_KB, CHUNK_KB, BLOCK_K, BITS)
            if GATED:
                acc_up = _chunk_dot(u0, su0, x_row, 0, k_dim, CHUNK_KB, BLOCK_K)
                acc_up += _rest_of_k(w_base, ws_base, up_cols, up_scale_rows, n_mask, x_row, k_dim, stride_wn,
                                     stride_wsn, like_x, NUM_KB, CHUNK_KB, BLOCK_K, BITS)
                acc = acc * tl.sigmoid(acc) * acc_up  # the tiled launches' epilogue
            tl.store(out_base + r * stride_om + offs_n, acc.to(out_base.dtype.element_ty), mask=n_mask)
        elif ZERO_TAIL:
            if r < capacity:  # the masked layout's rows past the count are zero in the final output
                tl.store(out_base + r * stride_om + offs_n, tl.zeros_like(offs_n).to(out_base.dtype.element_ty),
                         mask=n_mask)


@triton.jit
def _fp8_moe_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, out_ptr, counts_ptr, active_ptr, N, K, capacity, up_scale_row, num_experts,
    active_slots, stride_xe, stride_xm, stride_we, stride_wn, stride_wse, stride_wsn, stride_oe, stride_om,
    x_x_ptr, x_w_ptr, x_ws_ptr, x_out_ptr, x_n, x_k, x_up_scale_row, stride_xxm, stride_xwn, stride_xwsn,
    stride_xom,
    NUM_KB: tl.constexpr, NUM_KB_X: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, GATED: tl.constexpr,
    ZERO_TAIL: tl.constexpr, EARLY: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, CHUNK_KB: tl.constexpr, BITS: tl.constexpr, PDL: tl.constexpr,
):
    # EARLY (the down launch): expert, count and the first weight chunk read before the PDL wait (module
    # docstring); otherwise everything after it.
    if PDL and not EARLY:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    expert = _expert_of(tl.program_id(1), active_ptr, num_experts, active_slots)
    is_extra = expert == num_experts
    n_cols = tl.where(is_extra, x_n, N)
    if (expert >= 0) & (tl.program_id(0) * BLOCK_N < n_cols):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_cols
        # The EXTRA column's operands or the expert's, chosen by value (a branch could not assign them: Triton
        # makes an argument equal to 1 a constant, and both branches must give one type).
        routed = tl.where(is_extra, 0, expert)
        count = tl.where(is_extra, capacity, tl.load(counts_ptr + routed, cache_modifier=".cg").to(tl.int32))
        k_dim = tl.where(is_extra, x_k, K)
        x_base = tl.where(is_extra, x_x_ptr, x_ptr + routed * stride_xe)
        w_base = tl.where(is_extra, x_w_ptr, w_ptr + routed * stride_we)
        ws_base = tl.where(is_extra, x_ws_ptr, ws_ptr + routed * stride_wse)
        out_base = tl.where(is_extra, x_out_ptr, out_ptr + routed * stride_oe)
        s_xm = tl.where(is_extra, stride_xxm, stride_xm)
        s_wn = tl.where(is_extra, stride_xwn, stride_wn)
        s_wsn = tl.where(is_extra, stride_xwsn, stride_wsn)
        s_om = tl.where(is_extra, stride_xom, stride_om)
        cols = offs_n.to(tl.int64)
        up_cols = cols + n_cols  # w13 holds the gate rows, then the up rows
        scale_rows = (offs_n // SCALE_BLOCK_N).to(tl.int64)
        up_scale_rows = scale_rows + tl.where(is_extra, x_up_scale_row, up_scale_row)
        w0, s0 = _weight_chunk(w_base, ws_base, cols, scale_rows, n_mask, 0, k_dim, s_wn, s_wsn, CHUNK_KB, BLOCK_K)
        u0, su0 = w0, s0
        if GATED:
            u0, su0 = _weight_chunk(w_base, ws_base, up_cols, up_scale_rows, n_mask, 0, k_dim, s_wn, s_wsn,
                                    CHUNK_KB, BLOCK_K)
        if PDL and EARLY:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if is_extra:  # its K (the shared experts' width, for the down projection) has its own trip count
            _expert_rows(w0, s0, u0, su0, x_base, w_base, ws_base, out_base, cols, up_cols, scale_rows,
                         up_scale_rows, offs_n, n_mask, count, capacity, k_dim, s_xm, s_wn, s_wsn, s_om,
                         NUM_KB_X, GATED, False, ROWS, BLOCK_K, CHUNK_KB, BITS)
        else:
            _expert_rows(w0, s0, u0, su0, x_base, w_base, ws_base, out_base, cols, up_cols, scale_rows,
                         up_scale_rows, offs_n, n_mask, count, capacity, k_dim, s_xm, s_wn, s_wsn, s_om,
                         NUM_KB, GATED, ZERO_TAIL, ROWS, BLOCK_K, CHUNK_KB, BITS)


def _launch(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out: torch.Tensor, counts: torch.Tensor,
            active: tuple[torch.Tensor, int], extra: tuple[torch.Tensor, ...], gated: bool, early: bool,
            block_size: BlockSize) -> None:
    """One launch over the active experts' columns and the EXTRA one: x ``[E, cap, K]``, out ``[E, cap, N]``;
    ``extra`` = (activation ``[cap, K']``, FP8 weight ``[N' (x2 gated), K']``, its scales, output ``[cap, N']``)."""
    n = w.shape[1] // 2 if gated else w.shape[1]
    xa, xw, xws, xc = extra
    x_n = xw.shape[0] // 2 if gated else xw.shape[0]
    num_kb, num_kb_x = triton.cdiv(w.shape[2], block_size[1]), triton.cdiv(xa.shape[1], block_size[1])
    cfg = moe_gemv_config(min(num_kb, num_kb_x))
    active_list, slots = active[0], min(active[1], x.shape[0])
    grid = (triton.cdiv(max(n, x_n), cfg.block_n), slots + 1)
    _fp8_moe_gemv_kernel[grid](
        x, w, w_s, out, counts, active_list, n, w.shape[2], x.shape[1], triton.cdiv(n, block_size[0]), x.shape[0],
        slots, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1), out.stride(0),
        out.stride(1),
        xa, xw, xws, xc, x_n, xa.shape[1], triton.cdiv(x_n, block_size[0]), xa.stride(0), xw.stride(0),
        xws.stride(0), xc.stride(0),
        NUM_KB=num_kb, NUM_KB_X=num_kb_x, SCALE_BLOCK_N=block_size[0], GATED=gated, ZERO_TAIL=not gated,
        EARLY=early, ROWS=x.shape[1], BLOCK_N=cfg.block_n, BLOCK_K=block_size[1], CHUNK_KB=cfg.chunk_kb,
        BITS=w8a16_bits(x), num_warps=cfg.num_warps, num_stages=1, **pdl_args(x),
    )  # fmt: skip


def fp8_moe_gemv_masked_shared(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                               w2: torch.Tensor, w2_scale: torch.Tensor, hidden: torch.Tensor,
                               shared_gate_up: torch.Tensor, shared_gate_up_scale: torch.Tensor,
                               shared_down: torch.Tensor, shared_down_scale: torch.Tensor,
                               active: tuple[torch.Tensor, int],
                               block_size: BlockSize = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.triton_fp8_moe.fp8_moe_forward_masked_shared_triton``'s contract over the active experts (the
    caller checked the shapes and ``moe_gemv_applies``): (routed ``[E, cap, D]``, shared ``[cap, D]``)."""
    num_experts, capacity, _ = x.shape
    inter = torch.empty((num_experts, capacity, w2.shape[2]), dtype=x.dtype, device=x.device)
    shared_inter = torch.empty((capacity, shared_down.shape[1]), dtype=x.dtype, device=x.device)
    _launch(x, w13, w13_scale, inter, counts, active, (hidden, shared_gate_up, shared_gate_up_scale, shared_inter),
            True, False, block_size)
    out = torch.empty_like(x)
    shared_out = torch.empty_like(hidden)
    _launch(inter, w2, w2_scale, out, counts, active, (shared_inter, shared_down, shared_down_scale, shared_out),
            False, True, block_size)
    return out, shared_out
