"""Triton per-head matmul for the absorbed MLA decode (`kernels.mla.head_matmul`'s GPU twin).

At decode each layer multiplies every head's query by its slice of kv_b_proj twice (``q_nope @ W_UK`` into the
latent, the attention's latent output ``@ W_UV^T`` back out). At a few rows cuBLAS's batched GEMM took 3.4-3.6 us a
call for 2 MiB of weights (V2-Lite, 16 heads; 54 calls, 0.19 ms of a 3.1 ms H100 step at batch 1,
`bench/results/decode_step_fp8_vs_bf16_h100_s38.json`), about 5x the time those bytes take at `copy_`'s rate.
Here one launch splits every head's weight into column blocks, enough programs to cover the SMs, each reading its
block once for all the rows: the weight-read time plus one launch. Past `MAX_ROWS` rows the weights are reused
across rows and cuBLAS's tiles win, so the call goes to the reference.

`TANDEM_HEAD_MATMUL=triton|cublas` (default ``cublas`` until a GPU run times it; read on every call).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import mla
from kernels.backend import device_facts
from kernels.triton_pdl import pdl_args, pdl_begin

HEAD_MATMUL_ENV = "TANDEM_HEAD_MATMUL"
MAX_ROWS = 16  # one 16-row MMA tile: beyond it the weights would be read once per 16 rows


def head_matmul_kernel_on() -> bool:
    mode = os.environ.get(HEAD_MATMUL_ENV, "cublas")
    if mode not in ("triton", "cublas"):
        raise ValueError(f"{HEAD_MATMUL_ENV}={mode!r}: expected triton or cublas")
    return mode == "triton"


@triton.jit
def _head_matmul_kernel(x_ptr, w_ptr, out_ptr, rows, k_dim, n_dim, stride_xb, stride_xh, stride_wh, stride_wk,
                        stride_wn, stride_ob, stride_oh, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    head = tl.program_id(0).to(tl.int64)  # heads vary fastest: programs side by side read one row block of x
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask, n_mask = offs_b < rows, cols < n_dim
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_dim
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + head * stride_xh + ks[None, :],
                    mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + head * stride_wh + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + offs_b[:, None] * stride_ob + head * stride_oh + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])


def _block_n(heads: int, n_dim: int, device: torch.device) -> int:
    """Columns a program: the widest of 16-64 that still gives every SM a program."""
    sms = device_facts(device.index or 0)[1] if device.type == "cuda" else 132
    block = 64
    while block > 16 and heads * triton.cdiv(n_dim, block) < sms:
        block //= 2
    return block


def head_matmul_triton(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.mla.head_matmul`: x ``[B, H, K]`` (unit last stride), w ``[H, K, N]`` (any strides) ->
    ``[B, H, N]`` (into ``out`` when given, unit last stride)."""
    mla.check_head_matmul(x, w, out)
    rows, heads, k_dim = x.shape
    n_dim = w.shape[2]
    if rows > MAX_ROWS or not head_matmul_kernel_on():
        return mla.head_matmul(x, w, out)
    if out is None:
        out = torch.empty(rows, heads, n_dim, dtype=x.dtype, device=x.device)
    if rows == 0 or heads == 0:
        return out
    block_n = _block_n(heads, n_dim, x.device)
    grid = (heads, triton.cdiv(n_dim, block_n), triton.cdiv(rows, MAX_ROWS))
    _head_matmul_kernel[grid](
        x, w, out, rows, k_dim, n_dim, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1), BLOCK_B=MAX_ROWS, BLOCK_K=min(128, max(16, triton.next_power_of_2(k_dim))),
        BLOCK_N=block_n, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2,
        **pdl_args(x))
    return out


__all__ = ["HEAD_MATMUL_ENV", "MAX_ROWS", "head_matmul_triton"]
