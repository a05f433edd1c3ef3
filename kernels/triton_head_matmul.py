"""Triton per-head matmul for the absorbed MLA decode (`kernels.mla.head_matmul`'s GPU twin).

At decode each layer multiplies every head's query by its slice of kv_b_proj twice (``q_nope @ W_UK`` into the
latent, the attention's latent output ``@ W_UV^T`` back out). At a few rows cuBLAS's batched GEMM took 3.4-3.6 us a
call for 2 MiB of weights (V2-Lite, 16 heads; 54 calls, 0.19 ms of a 3.1 ms H100 step at batch 1,
`bench/results/decode_step_fp8_vs_bf16_h100_s38.json`), about 5x the time those bytes take at `copy_`'s rate.
Here one launch splits every head's weight into column blocks, enough programs to cover the SMs, each reading its
block once for all the rows: the weight-read time plus one launch. Past `MAX_ROWS` rows the weights are reused
across rows and cuBLAS's tiles win, so the call goes to the reference.

`mla_decode_attention_up_triton` runs the attention's split launch, then merges the splits (the attention's own
reduce launch, `kernels.triton_mla_decode`) inside the W_UV product's launch, as each program's rows of x: one
launch a layer fewer.

`mla_decode_prep_q_latent_triton` runs the first product in one launch with the decode prep (the latent's norm
and RoPE written into the pool, q_pe's RoPE): independent work, one launch a layer fewer.

`TANDEM_HEAD_MATMUL=triton|cublas` (default ``cublas`` until a GPU run times it; read on every call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import mla
from kernels.backend import device_facts, env_choice
from kernels.flashmla_decode import flashmla_runs
from kernels.triton_decode_fused import mla_decode_prep_runs, mla_decode_prep_token, mla_decode_prep_triton
from kernels.triton_mla_decode import (
    mla_decode_attention_triton,
    mla_decode_split_partials,
    validate_decode_inputs,
)
from kernels.triton_pdl import pdl_args, pdl_begin

HEAD_MATMUL_ENV = "TANDEM_HEAD_MATMUL"
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


@triton.jit
def _merged_splits(mid_ptr, lse_ptr, offs_b, b_mask, head, ks, k_mask, stride_mb, stride_mh, stride_ms, stride_lb,
                   stride_lh, NUM_SPLITS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows offs_b, columns ks of the attention's output for one head: its splits merged by their base-2
    log-sum-exp, in `_mla_decode_reduce_kernel`'s order (float32, not yet rounded)."""
    m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(lse_ptr + offs_b * stride_lb + head * stride_lh + s, mask=b_mask, other=float("-inf"))
        part = tl.load(mid_ptr + offs_b[:, None] * stride_mb + head * stride_mh + s * stride_ms + ks[None, :],
                       mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        m_new = tl.maximum(m, lse)
        safe_m = tl.where(m_new == float("-inf"), 0.0, m_new)  # every split so far empty: no -inf - -inf NaN
        alpha = tl.exp2(m - safe_m)
        w = tl.exp2(lse - safe_m)
        acc = acc * alpha[:, None] + part * w[:, None]
        denom = denom * alpha + w
        m = m_new
    return tl.where(denom[:, None] > 0.0, acc / tl.where(denom > 0.0, denom, 1.0)[:, None], 0.0)


@triton.jit
def _merge_head_matmul_kernel(mid_ptr, lse_ptr, w_ptr, out_ptr, rows, k_dim, n_dim, stride_mb, stride_mh, stride_ms,
                              stride_lb, stride_lh, stride_wh, stride_wk, stride_wn, stride_ob, stride_oh,
                              NUM_SPLITS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    head = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask, n_mask = offs_b < rows, cols < n_dim
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_dim
        merged = _merged_splits(mid_ptr, lse_ptr, offs_b, b_mask, head, ks, k_mask, stride_mb, stride_mh, stride_ms,
                                stride_lb, stride_lh, NUM_SPLITS, BLOCK_B, BLOCK_K)
        x = merged.to(w_ptr.dtype.element_ty)  # the attention's output in its dtype, as the reduce stores it
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


def mla_decode_attention_up_triton(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                                   page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float, w_up: torch.Tensor,
                                   out: torch.Tensor | None = None, kv_scale: float = 1.0) -> torch.Tensor:
    """`kernels.mla.mla_decode_attention_up`: at up to `MAX_ROWS` rows with the kernel on, the attention's split
    launch and then one launch that merges the splits and multiplies by ``w_up``; otherwise the two ops' GPU
    paths one after the other."""
    validate_decode_inputs(q_latent, q_rope, kv_cache, page_table, seq_lens)
    rows, heads, rank = q_latent.shape
    fused = (0 < rows <= MAX_ROWS and heads > 0 and head_matmul_kernel_on()
             and not flashmla_runs(q_latent, kv_cache, kv_scale))
    if not fused:
        latent = mla_decode_attention_triton(q_latent, q_rope, kv_cache, page_table, seq_lens, scale,
                                             kv_scale=kv_scale)
        return head_matmul_triton(latent, w_up, out)
    if w_up.shape[:2] != (heads, rank) or w_up.dtype != q_latent.dtype:
        raise ValueError(f"w_up must be {q_latent.dtype} [H={heads}, R={rank}, v], got {w_up.dtype} "
                         f"{tuple(w_up.shape)}")
    n_dim = w_up.shape[2]
    mla.check_head_matmul(q_latent, w_up, out)
    if out is None:
        out = torch.empty(rows, heads, n_dim, dtype=q_latent.dtype, device=q_latent.device)
    mid, lse = mla_decode_split_partials(q_latent, q_rope, kv_cache, page_table, seq_lens, scale, None, kv_scale)
    block_n = _block_n(heads, n_dim, q_latent.device)
    grid = (heads, triton.cdiv(n_dim, block_n), triton.cdiv(rows, MAX_ROWS))
    _merge_head_matmul_kernel[grid](
        mid, lse, w_up, out, rows, rank, n_dim, mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0),
        lse.stride(1), w_up.stride(0), w_up.stride(1), w_up.stride(2), out.stride(0), out.stride(1),
        NUM_SPLITS=lse.shape[2], BLOCK_B=MAX_ROWS, BLOCK_K=min(128, max(16, triton.next_power_of_2(rank))),
        BLOCK_N=block_n, PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32", num_warps=4,
        num_stages=1, **pdl_args(q_latent))  # pipelined, every split's partial was staged: 132 KB of shared a program
    return out


def mla_decode_prep_q_latent_triton(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                    norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor,
                                    write_pages: torch.Tensor, write_slots: torch.Tensor, nope_dim: int,
                                    interleave: bool, kv_scale: float, w_uk: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.decode_fused.mla_decode_prep_q_latent`: at up to `MAX_ROWS` tokens with the kernel on, one
    launch (`_prep_and_q_latent_kernel`); otherwise the prep's launch and the product's."""
    rows, heads, _ = q.shape
    q_nope = q[..., :nope_dim]
    fused = (0 < rows <= MAX_ROWS and heads > 0 and head_matmul_kernel_on() and w_uk.dtype == q.dtype
             and mla_decode_prep_runs(q, kv_a, cos, sin, norm_weight, kv_cache, nope_dim))
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


__all__ = ["HEAD_MATMUL_ENV", "MAX_ROWS", "head_matmul_triton", "mla_decode_attention_up_triton",
           "mla_decode_prep_q_latent_triton"]
