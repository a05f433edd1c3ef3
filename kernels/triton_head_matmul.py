"""Triton per-head matmul for the absorbed MLA decode (`kernels.mla.head_matmul`'s GPU twin).

At decode each layer multiplies every head's query by its slice of kv_b_proj twice (``q_nope @ W_UK`` into the
latent, the attention's latent output ``@ W_UV^T`` back out). At a few rows cuBLAS's batched GEMM took 3.4-3.6 us a
call for 2 MiB of weights (V2-Lite, 16 heads; 54 calls, 0.19 ms of a 3.1 ms H100 step at batch 1,
`bench/results/decode_step_fp8_vs_bf16_h100_s38.json`), about 5x the time those bytes take at `copy_`'s rate.
Here one launch splits every head's weight into column blocks, enough programs to cover the SMs, each reading its
block once for all the rows: the weight-read time plus one launch. Past `MAX_ROWS` rows the weights are reused
across rows and cuBLAS's tiles win, so the call goes to the reference.

`mla_decode_prep_q_latent_triton` runs the first product in one launch with the decode prep (the latent's norm
and RoPE written into the pool, q_pe's RoPE): independent work, one launch a layer fewer. On one H100 (V2-Lite,
batch 1 / 8, graph-timed profiles, `bench/results/decode_step_fp8_vs_bf16{,_fused}_h100_s40.json`) it took 110 /
108 us a step where the prep's launches and cuBLAS's W_UK products took 69 + 97 / 72 + 98: on by default
(`TANDEM_PREP_Q_LATENT=0` turns it off).

`TANDEM_HEAD_MATMUL=triton|cublas`: the standalone product (W_UV's) in Triton or cuBLAS (default ``cublas``: not
yet timed alone; read on every call). A launch that also merged the attention's splits before W_UV (the reduce
launch folded in) was tried and dropped: 28 us a call where the reduce and cuBLAS's product took 2.7 + 3.3
(its 16 splits' loads ran one after another in every program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import mla
from kernels.backend import device_facts, env_choice, env_flag
from kernels.triton_decode_fused import mla_decode_prep_runs, mla_decode_prep_token, mla_decode_prep_triton
from kernels.triton_pdl import pdl_args, pdl_begin

HEAD_MATMUL_ENV = "TANDEM_HEAD_MATMUL"
PREP_Q_LATENT_ENV = "TANDEM_PREP_Q_LATENT"
MAX_ROWS = 16  # one 16-row MMA tile: beyond it the weights would be read once per 16 rows


def head_matmul_kernel_on() -> bool:
    return env_choice(HEAD_MATMUL_ENV, ("triton", "cublas"), "cublas") == "triton"


@triton.jit
def _head_matmul_kernel(x_ptr, w_ptr, out_ptr, rows, k_dim, n_dim, stride_xb, stride_xh, stride_wh, stride_wk,
                        stride_wn, stride_ob, stride_oh, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    # heads vary fastest: programs side by side read one row block of x
    _head_matmul_block(x_ptr, w_ptr, out_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2),
                       rows, k_dim, n_dim, stride_xb, stride_xh, stride_wh, stride_wk, stride_wn, stride_ob,
                       stride_oh, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)


@triton.jit
def _head_matmul_block(x_ptr, w_ptr, out_ptr, head, column_block, row_block, rows, k_dim, n_dim, stride_xb,
                       stride_xh, stride_wh, stride_wk, stride_wn, stride_ob, stride_oh, BLOCK_B: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    cols = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
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


@triton.jit
def _prep_and_q_latent_kernel(
    w_ptr, lat_ptr, rows, k_dim, n_dim, stride_wh, stride_wk, stride_wn, stride_lb, stride_lh,
    q_ptr, kv_a_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr, pages_ptr, slots_ptr, pe_ptr,
    stride_qt, stride_qh, stride_kt, stride_cp, stride_cs, stride_pt, stride_ph, num_heads, lora, eps,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVE: tl.constexpr, PDL: tl.constexpr,
):
    """Two independent steps of a decode layer in one launch: columns 0..H-1 of the grid run ``q_nope @ W_UK``
    (q_nope: q's first k_dim columns), column H the decode prep of the row block's tokens (its programs split
    them), so neither waits for the other's launch."""
    pdl_begin(PDL)
    head = tl.program_id(0)
    if head < num_heads:
        _head_matmul_block(q_ptr, w_ptr, lat_ptr, head.to(tl.int64), tl.program_id(1), tl.program_id(2), rows,
                           k_dim, n_dim, stride_qt, stride_qh, stride_wh, stride_wk, stride_wn, stride_lb,
                           stride_lh, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)
    else:
        per = tl.cdiv(BLOCK_B, tl.num_programs(1))
        for i in range(per):
            in_block = tl.program_id(1) * per + i
            t = tl.program_id(2) * BLOCK_B + in_block
            if (in_block < BLOCK_B) & (t < rows):
                mla_decode_prep_token(t.to(tl.int64), q_ptr, kv_a_ptr, cos_ptr, sin_ptr, nw_ptr, cache_ptr,
                                      pages_ptr, slots_ptr, pe_ptr, stride_qt, stride_qh, stride_kt, stride_cp,
                                      stride_cs, stride_pt, stride_ph, num_heads, lora, k_dim, eps, HALF, BLOCK_R,
                                      BLOCK_H, INTERLEAVE)


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


def mla_decode_prep_q_latent_triton(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                    norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor,
                                    write_pages: torch.Tensor, write_slots: torch.Tensor, nope_dim: int,
                                    interleave: bool, kv_scale: float, w_uk: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.decode_fused.mla_decode_prep_q_latent`: at up to `MAX_ROWS` tokens one launch
    (`_prep_and_q_latent_kernel`; `PREP_Q_LATENT_ENV`=0 turns it off); otherwise the prep's launch and the
    product's."""
    rows, heads, _ = q.shape
    q_nope = q[..., :nope_dim]
    fused = (0 < rows <= MAX_ROWS and heads > 0 and env_flag(PREP_Q_LATENT_ENV, default=True)
             and w_uk.dtype == q.dtype and mla_decode_prep_runs(q, kv_a, cos, sin, norm_weight, kv_cache, nope_dim))
    if not fused:
        q_pe = mla_decode_prep_triton(q, kv_a, cos, sin, norm_weight, eps, kv_cache, write_pages, write_slots,
                                      nope_dim, interleave, kv_scale)
        return q_pe, head_matmul_triton(q_nope, w_uk)
    mla.check_head_matmul(q_nope, w_uk, None)
    lora, rope, n_dim = norm_weight.shape[0], q.shape[2] - nope_dim, w_uk.shape[2]
    q_pe = torch.empty((rows, heads, rope), dtype=q.dtype, device=q.device)
    latent = torch.empty((rows, heads, n_dim), dtype=q.dtype, device=q.device)
    block_n = _block_n(heads, n_dim, q.device)
    grid = (heads + 1, triton.cdiv(n_dim, block_n), triton.cdiv(rows, MAX_ROWS))
    _prep_and_q_latent_kernel[grid](
        w_uk, latent, rows, nope_dim, n_dim, w_uk.stride(0), w_uk.stride(1), w_uk.stride(2), latent.stride(0),
        latent.stride(1), q, kv_a, cos, sin, norm_weight, kv_cache, write_pages, write_slots, q_pe, q.stride(0),
        q.stride(1), kv_a.stride(0), kv_cache.stride(0), kv_cache.stride(1), q_pe.stride(0), q_pe.stride(1), heads,
        lora, eps, BLOCK_B=MAX_ROWS, BLOCK_K=min(128, max(16, triton.next_power_of_2(nope_dim))), BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HALF=rope // 2,
        BLOCK_R=triton.next_power_of_2(lora), BLOCK_H=triton.next_power_of_2(heads), INTERLEAVE=interleave,
        num_warps=4, num_stages=2, **pdl_args(q),
    )  # fmt: skip
    return q_pe, latent


__all__ = ["HEAD_MATMUL_ENV", "MAX_ROWS", "PREP_Q_LATENT_ENV", "head_matmul_triton", "mla_decode_prep_q_latent_triton"]
