"""The masked-layout FP8 expert GEMMs at one or two rows per expert (a decode batch of one or two): W8A16
as a GEMV on the CUDA cores, no tensor cores.

Why: at one token the grouped GEMM's 16-row ``tl.dot`` tile is 1/16 useful, and converting the FP8 weight
tile into the dot's operand layout kept it at ~36 % of ``copy_`` on an H100 (1.68 ms of V2-Lite's FP8 step,
as long as bf16 reading twice the bytes). A GEMV has no operand layout to meet: each thread loads 16
consecutive weight bytes of one row, converts them in registers, scales them by their 128 x 128 block's
scale, and multiplies them into the row(s) of activations; partial sums stay per lane (``[rows, BLOCK_N,
BLOCK_K]``) and are added across the tile once at the end. The next K block's weight is loaded before the
current one is used, so each program keeps two blocks in flight (Triton pipelines only loads that feed a dot).

Same contract as ``kernels.triton_fp8_moe._launch_masked`` (W8A16, no ``active`` grid): gate and up in one
launch with SiLU(gate) * up in the epilogue, an optional EXTRA expert (the layer's shared experts, every row
valid) as grid column ``num_experts``. ``TANDEM_FP8_GEMV=0`` turns it off (bench.decode_step measures both).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GEMV_ENV = "TANDEM_FP8_GEMV"
GEMV_MAX_ROWS = 2  # the [rows, BLOCK_N, BLOCK_K] partial sums: 16 fp32 registers a row per accumulator
BLOCK_N = 16  # 16 rows x 128 bytes: one 16-byte load per thread of 4 warps; 88 programs per V2-Lite expert


def use_gemv(capacity: int, activations_quantized: bool, active: object) -> bool:
    """Whether a masked launch of ``capacity`` rows per expert runs here (``GEMV_ENV``, default on)."""
    mode = os.environ.get(GEMV_ENV, "1")
    if mode not in ("0", "1"):
        raise ValueError(f"{GEMV_ENV}={mode!r}: choose 1 (on, the default) or 0")
    return mode == "1" and not activations_quantized and active is None and 0 < capacity <= GEMV_MAX_ROWS


@triton.jit
def _gemv_k_loop(x_ptrs, w_ptrs, s_ptrs, row_mask, n_mask, k_dim, up_offset, up_scale_offset,
                 NUM_KB: tl.constexpr, GATED: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Gate (or only) and up partial sums ``[ROWS, BLOCK_N]`` over ``NUM_KB`` K blocks. Pointers are 3-D:
    x ``[ROWS, 1, BLOCK_K]``, w ``[1, BLOCK_N, BLOCK_K]``, s ``[1, BLOCK_N, 1]``."""
    offs_k = tl.arange(0, BLOCK_K)[None, None, :]
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    w_mask = n_mask & (offs_k < k_dim)
    w_next = tl.load(w_ptrs, mask=w_mask, other=0.0)
    up_next = w_next
    if GATED:
        up_next = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
    # NUM_KB is a compile-time trip count, as in kernels.triton_fp8_moe (the interpreter's loops).
    for kb in range(0, NUM_KB):
        w = w_next
        up = up_next
        k_left = k_dim - kb * BLOCK_K
        # The next block's weight first: past the last block its mask is all off and nothing is read.
        next_mask = n_mask & (offs_k < k_left - BLOCK_K)
        w_next = tl.load(w_ptrs + (kb + 1) * BLOCK_K, mask=next_mask, other=0.0)
        if GATED:
            up_next = tl.load(w_ptrs + up_offset + (kb + 1) * BLOCK_K, mask=next_mask, other=0.0)
        x = tl.load(x_ptrs + kb * BLOCK_K, mask=row_mask & (offs_k < k_left), other=0.0).to(tl.float32)
        s = tl.load(s_ptrs + kb, mask=n_mask, other=0.0)
        acc += x * (w.to(tl.float32) * s)
        if GATED:
            s_up = tl.load(s_ptrs + up_scale_offset + kb, mask=n_mask, other=0.0)
            acc_up += x * (up.to(tl.float32) * s_up)
    return tl.sum(acc, axis=2), tl.sum(acc_up, axis=2)


@triton.jit
def _fp8_gemv_masked_kernel(
    x_ptr, w_ptr, ws_ptr, out_ptr, counts_ptr, N, K, capacity, up_scale_row,
    stride_xe, stride_xm, stride_we, stride_wn, stride_wse, stride_wsn, stride_oe, stride_om,
    num_experts, x_x_ptr, x_w_ptr, x_ws_ptr, x_out_ptr, x_n, x_k, x_up_scale_row,
    stride_xxm, stride_xwn, stride_xwsn, stride_xom,
    NUM_KB: tl.constexpr, NUM_KB_X: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, GATED: tl.constexpr,
    ZERO_TAIL: tl.constexpr, EXTRA: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    expert = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    count = tl.load(counts_ptr + expert, mask=expert < num_experts, other=0).to(tl.int32)
    x_base = x_ptr + expert * stride_xe
    w_base = w_ptr + expert * stride_we
    ws_base = ws_ptr + expert * stride_wse
    o_base = out_ptr + expert * stride_oe
    n_cols = N
    k_dim = K
    up_row = up_scale_row
    x_stride = stride_xm
    w_stride = stride_wn
    ws_stride = stride_wsn
    o_stride = stride_om
    is_extra = False
    if EXTRA:
        if expert == num_experts:  # the shared experts: their own operands, every row valid
            is_extra = True
            count = tl.zeros_like(count) + capacity  # a tensor either way (capacity 1 is a constant)
            x_base = x_x_ptr
            w_base = x_w_ptr
            ws_base = x_ws_ptr
            o_base = x_out_ptr
            n_cols = x_n
            k_dim = x_k
            up_row = x_up_scale_row
            x_stride = stride_xxm
            w_stride = stride_xwn
            ws_stride = stride_xwsn
            o_stride = stride_xom
    if pid_n * BLOCK_N >= n_cols:
        return
    n_mask = offs_n < n_cols
    store_mask = (rows < capacity)[:, None] & n_mask[None, :]
    o_ptrs = o_base + rows.to(tl.int64)[:, None] * o_stride + offs_n.to(tl.int64)[None, :]
    if count == 0:
        # The final output's rows past the count are defined as zero; the intermediate's are never read.
        if ZERO_TAIL:
            tl.store(o_ptrs, tl.zeros([ROWS, BLOCK_N], dtype=out_ptr.dtype.element_ty), mask=store_mask)
        return
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_base + rows.to(tl.int64)[:, None, None] * x_stride + offs_k[None, None, :]
    w_ptrs = w_base + offs_n.to(tl.int64)[None, :, None] * w_stride + offs_k[None, None, :]
    s_ptrs = ws_base + (offs_n // SCALE_BLOCK_N)[None, :, None] * ws_stride
    row_mask = (rows < count)[:, None, None]  # rows past the count read as zero: their outputs come out zero
    n_mask3 = n_mask[None, :, None]
    up_offset = n_cols * w_stride
    up_scale_offset = up_row * ws_stride
    if is_extra:  # its K (the shared experts' width, for the down projection) has its own trip count
        acc, acc_up = _gemv_k_loop(x_ptrs, w_ptrs, s_ptrs, row_mask, n_mask3, k_dim, up_offset, up_scale_offset,
                                   NUM_KB_X, GATED, ROWS, BLOCK_N, BLOCK_K)
    else:
        acc, acc_up = _gemv_k_loop(x_ptrs, w_ptrs, s_ptrs, row_mask, n_mask3, k_dim, up_offset, up_scale_offset,
                                   NUM_KB, GATED, ROWS, BLOCK_N, BLOCK_K)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


def launch_fp8_gemv_masked(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out: torch.Tensor,
                           counts: torch.Tensor, gated: bool, block_size: tuple[int, int],
                           extra: tuple[torch.Tensor, ...] | None = None) -> None:
    """x ``[E, cap, K]`` in the model dtype (cap <= ``GEMV_MAX_ROWS``), w ``[E, N (x2 gated), K]`` FP8 with
    block scales ``w_s``, out ``[E, cap, N]``; ``extra`` = (activation ``[cap, K']``, FP8 weight, its scales,
    output ``[cap, N']``) runs as expert ``E`` (see ``kernels.triton_fp8_moe._launch_masked``)."""
    num_experts, capacity, k = x.shape
    if x.stride(2) != 1 or w.stride(2) != 1 or w_s.stride(2) != 1:
        raise ValueError("the GEMV's operands must be contiguous in their last dim")
    n = w.shape[1] // 2 if gated else w.shape[1]
    if extra is None:
        x_args: tuple = (num_experts, x, w, w_s, out, n, k, triton.cdiv(n, block_size[0]),
                         x.stride(1), w.stride(1), w_s.stride(1), out.stride(1))
        num_kb_x, tile_n = 1, n
    else:
        xa, xw, xws, xc = extra
        x_n = xw.shape[0] // 2 if gated else xw.shape[0]
        x_args = (num_experts, xa, xw, xws, xc, x_n, xa.shape[1], triton.cdiv(x_n, block_size[0]),
                  xa.stride(0), xw.stride(0), xws.stride(0), xc.stride(0))
        num_kb_x, tile_n = triton.cdiv(xa.shape[1], block_size[1]), max(n, x_n)
    rows = triton.next_power_of_2(capacity)
    grid = (triton.cdiv(tile_n, BLOCK_N), num_experts + (extra is not None))
    _fp8_gemv_masked_kernel[grid](
        x, w, w_s, out, counts, n, k, capacity, triton.cdiv(n, block_size[0]),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1), out.stride(0),
        out.stride(1), *x_args,
        NUM_KB=triton.cdiv(k, block_size[1]), NUM_KB_X=num_kb_x, SCALE_BLOCK_N=block_size[0], GATED=gated,
        ZERO_TAIL=not gated, EXTRA=extra is not None, ROWS=rows, BLOCK_N=BLOCK_N, BLOCK_K=block_size[1],
        num_warps=4, num_stages=1,
    )  # fmt: skip
