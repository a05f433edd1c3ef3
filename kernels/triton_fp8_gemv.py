"""A one-row dense FP8 projection as a GEMV: whole output columns a program, no split of K.

At one row (a batch-1 decode step) a dense FP8 projection (V2-Lite's fused q + kv_a, 7.5 MB; o_proj, 4.2 MB)
is a chain of latencies rather than a stream of bytes: the tiled kernel (``kernels.triton_fp8``) splits K to cover the SMs,
so each output tile waits on its weight loads, on the stores of its fp32 partials, on an atomic and on the last
split's reads of the partials. Session 45 measured that chain: with their weights already in L2 those GEMMs took
only 7-11 % less. This kernel takes the other route:

- One program owns ``BLOCK_N`` whole output columns of one row, over all of K: no split, no partials, no
  reduction launch or counter.
- Its first ``CHUNK_KB`` K blocks of weight (and their block scales) are loaded *before* the programmatic
  dependent launch's wait (``kernels.triton_pdl``), so they may stream while the kernel ahead still runs. That
  is the one exception to ``pdl_begin``'s rule (no memory access before the wait), safe because no kernel of a
  decode step writes a dense weight. Measured, it is worth at most 0.2 us of the 1.7-1.9 us a launch saved: the
  gain is the chain taken out.
- After the wait only the activation row (a few KB, the same for every program, from L2) and the multiply-adds
  remain: fp32 products of the bf16 activation and the weight converted exactly (``w8a16_tile``), summed per
  128-wide K block and scaled by that block's scale, as the tiled W8A16 kernel applies it.

Rows are a grid dimension (each row's programs read the same weight slice, the first from DRAM, the others from
L2), but each converts the weight again: at 4 rows that lost to the tiled kernel, so one row alone runs here
(``gemv_max_rows``). Measured against the tiled kernel beside ``GEMV_ENV``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import env_flag
from kernels.fp8 import BLOCK, BlockSize
from kernels.triton_fp8 import decode_tile_override, w8a16_bits, w8a16_tile
from kernels.triton_pdl import pdl_args

# Whether one-row dense FP8 projections run as this GEMV ("1", the default) or as the tiled split-K kernel ("0").
# One H100 (session 46, bench/results/fp8_one_token_gemv_sweep_call1_h100_s46.log, graph-timed at one row):
# V2-Lite's fused q + kv_a 5.8 -> 3.9-4.0 us, o_proj 4.4 -> 2.7 us; in the decode step's serial profile the
# 54 dense launches took 268 us where the tiled ones took 341. At 4 rows the same step's GEMVs took 520 us
# against 346 (each row's programs convert the weight again), so only one row takes it. The whole step at batch 1,
# twice each in one call (session 47, decode_step_fp8_vs_bf16_{gemv,tiled}{,2}_call1_h100_s47.json): FP8 2.520 /
# 2.551 ms against 2.615 / 2.631 tiled.
GEMV_ENV = "TANDEM_FP8_DENSE_GEMV"
GEMV_MAX_ROWS = 1
# A tile set by hand: "BLOCK_N,WARPS,CHUNK_KB" (tests/fp8_moe_one_token.py --dense --gemv-sweep sweeps them).
GEMV_TILE_ENV = "TANDEM_FP8_GEMV_TILE"
# Bytes of weight a program loads at once by default, the first chunk before the PDL wait (the rest of K
# streams after it).
PRELOAD_BYTES = 16384


def gemv_max_rows() -> int:
    """Rows up to which ``fp8_linear_triton`` runs W8A16 projections as this GEMV (0: never; ``GEMV_ENV``)."""
    return GEMV_MAX_ROWS if env_flag(GEMV_ENV, default=True) else 0


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    num_warps: int
    chunk_kb: int  # K blocks loaded at once; the first chunk before the PDL wait


def gemv_config(k_blocks: int, block_k: int) -> GemvConfig:
    """4 columns a program, 4 warps, a chunk of the most K blocks (a power of two, Triton's tiles being powers of
    two) within ``PRELOAD_BYTES``: the fastest over both V2-Lite projections of the sweep above (4 / 8 / 16
    columns, 2 / 4 / 8 warps, 4 / 8 / 16 K blocks; 4 columns with 8 or 16 K blocks 6.7 us for the pair, the
    earlier choice of 8 columns for q + kv_a 7.2)."""
    tile = decode_tile_override(GEMV_TILE_ENV)
    if tile is not None:
        if len(tile) != 3:
            raise ValueError(f"{GEMV_TILE_ENV}: expected BLOCK_N,WARPS,CHUNK_KB, got {tile}")
        return GemvConfig(block_n=tile[0], num_warps=tile[1], chunk_kb=max(1, min(tile[2], k_blocks)))
    block_n = 4
    chunk = 1
    while chunk * 2 <= k_blocks and block_n * chunk * 2 * block_k <= PRELOAD_BYTES:
        chunk *= 2
    return GemvConfig(block_n=block_n, num_warps=4, chunk_kb=chunk)


@triton.jit
def _weight_chunk(w_ptr, ws_ptr, cols, scale_rows, n_mask, kb0, K, stride_wn, stride_wsn, CHUNK_KB: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """K blocks ``kb0 ..`` of the program's columns: the FP8 weights ``[BLOCK_N, CHUNK_KB, BLOCK_K]`` and their
    scales ``[BLOCK_N, CHUNK_KB]`` (blocks past K load zeros)."""
    offs_kb = kb0 + tl.arange(0, CHUNK_KB)
    offs_k = offs_kb[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    k_mask = offs_k < K
    w = tl.load(w_ptr + cols[:, None, None] * stride_wn + offs_k[None, :, :],
                mask=n_mask[:, None, None] & k_mask[None, :, :], other=0.0)
    s = tl.load(ws_ptr + scale_rows[:, None] * stride_wsn + offs_kb[None, :],
                mask=n_mask[:, None] & (offs_kb * BLOCK_K < K)[None, :], other=0.0)
    return w, s


@triton.jit
def _chunk_dot(w, s, x_ptr, kb0, K, CHUNK_KB: tl.constexpr, BLOCK_K: tl.constexpr):
    """One chunk's contribution to the program's ``[BLOCK_N]`` outputs: per K block, the fp32 sum of the
    activation times the weight (already in the activation's dtype: exact), times the block's scale."""
    offs_k = (kb0 + tl.arange(0, CHUNK_KB))[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
    wx = w.to(tl.float32) * x.to(tl.float32)[None, :, :]
    return tl.sum(tl.sum(wx, axis=2) * s, axis=1)


@triton.jit
def _rest_of_k(w_ptr, ws_ptr, cols, scale_rows, n_mask, x_row, K, stride_wn, stride_wsn, like_x, NUM_KB: tl.constexpr,
               CHUNK_KB: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr):
    """The chunks of K after the first (loaded here, after the wait), summed as ``_chunk_dot`` sums one."""
    acc = tl.zeros([cols.shape[0]], dtype=tl.float32)
    # Compile-time trip count (the interpreter cannot loop to a runtime bound under numpy 2).
    for c in range(1, (NUM_KB + CHUNK_KB - 1) // CHUNK_KB):
        w, s = _weight_chunk(w_ptr, ws_ptr, cols, scale_rows, n_mask, c * CHUNK_KB, K, stride_wn, stride_wsn,
                             CHUNK_KB, BLOCK_K)
        acc += _chunk_dot(w8a16_tile(w, like_x, BITS), s, x_row, c * CHUNK_KB, K, CHUNK_KB, BLOCK_K)
    return acc


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_wsn, stride_om,
                     NUM_KB: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_KB: tl.constexpr, BITS: tl.constexpr,
                     PDL: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1).to(tl.int64)
    n_mask = offs_n < N
    cols = offs_n.to(tl.int64)
    scale_rows = (offs_n // SCALE_BLOCK_N).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    like_x = tl.zeros([1], dtype=x_ptr.dtype.element_ty)  # the activation's dtype, for the weight conversion
    # The first chunk loaded before the wait (module docstring: no kernel of the step writes a dense weight). Its
    # conversion is written here too, but the compiler places it by its use, after the wait (sm90 SASS).
    w, s = _weight_chunk(w_ptr, ws_ptr, cols, scale_rows, n_mask, 0, K, stride_wn, stride_wsn, CHUNK_KB, BLOCK_K)
    w = w8a16_tile(w, like_x, BITS)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = _chunk_dot(w, s, x_row, 0, K, CHUNK_KB, BLOCK_K)
    acc += _rest_of_k(w_ptr, ws_ptr, cols, scale_rows, n_mask, x_row, K, stride_wn, stride_wsn, like_x, NUM_KB,
                      CHUNK_KB, BLOCK_K, BITS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def fp8_gemv_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    block_size: BlockSize = (BLOCK, BLOCK), config: GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(weight [N, K]).T (+ bias)`` in x's dtype, W8A16, for a few rows (``gemv_max_rows``).
    ``x``, ``weight`` and ``weight_scale`` contiguous in their last dim (else ValueError; ``kernels.triton_fp8``
    checks the shapes)."""
    if any(t.stride(-1) != 1 for t in (x, weight, weight_scale)):
        raise ValueError("the GEMV's activation, weight and scales must be contiguous in their last dim")
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    k_blocks = triton.cdiv(k, block_size[1])
    cfg = config or gemv_config(k_blocks, block_size[1])
    _fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), m)](
        x, weight, weight_scale, bias if bias is not None else out, out, n, k, x.stride(0), weight.stride(0),
        weight_scale.stride(0), out.stride(0),
        NUM_KB=k_blocks, SCALE_BLOCK_N=block_size[0], HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
        BLOCK_K=block_size[1], CHUNK_KB=cfg.chunk_kb, BITS=w8a16_bits(x), num_warps=cfg.num_warps, num_stages=1,
        **pdl_args(x),
    )  # fmt: skip
    return out
