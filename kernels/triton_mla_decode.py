"""Triton paged MLA decode attention in the absorbed form (flash-decoding with split-K).

Same function as `kernels.mla.mla_decode_attention`: every query head attends to the shared latent
KV of its sequence, `score = q_latent . c + q_rope . k_rope`, `out = softmax(score * scale) @ c`, where
each cached token holds `[c (kv_lora_rank) | k_rope (rope_dim)]` and the values are the latent `c` itself.

Two launches:
  1. `_mla_decode_split_kernel`, grid (head blocks, splits, batch): one program takes BLOCK_H heads of
     one sequence and one contiguous slice ("split") of its context. Each KV tile is loaded once and used
     for both products (scores and values), so a latent page is read once per (sequence, head block).
     Head blocks vary fastest in the grid so the programs sharing a page run side by side and the
     repeated reads (many heads, e.g. 128) come from L2. It writes the split's normalised partial output
     and its log-sum-exp (base 2).
  2. `_mla_decode_reduce_kernel`, grid (heads, batch): merges the splits by their log-sum-exp.

The number of splits depends only on shapes (batch, heads, page-table width, SM count), never on the
values of `seq_lens`, so the launch is free of host syncs and can be captured in a CUDA graph.

FP8 KV (`--kv-cache-dtype fp8_e4m3`): the cache may be stored in float8 while q is bf16/fp16; each tile
is dequantized on load (`c * kv_scale`, in registers) into q's dtype, so the dots run as in the bf16 path
and the cache is read at one byte per value: half the bytes of a bf16 cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.flashmla_decode import flashmla_runs, mla_decode_attention_flashmla
from kernels.triton_pdl import pdl_args, pdl_begin

_LOG2E = 1.4426950408889634
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_COMPUTE = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _mla_decode_split_kernel(
    q_latent_ptr,
    q_rope_ptr,
    kv_ptr,
    page_table_ptr,
    seq_lens_ptr,
    mid_out_ptr,
    mid_lse_ptr,
    scale_log2,
    kv_scale,
    num_heads,
    stride_ql_b,
    stride_ql_h,
    stride_qr_b,
    stride_qr_h,
    stride_kv_page,
    stride_kv_tok,
    stride_pt_b,
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    LORA: tl.constexpr,
    ROPE: tl.constexpr,
    LORA_PAD: tl.constexpr,
    ROPE_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DEQUANT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    offs_c = tl.arange(0, LORA_PAD)
    offs_r = tl.arange(0, ROPE_PAD)
    c_mask = offs_c < LORA
    r_mask = offs_r < ROPE

    seq_len = tl.load(seq_lens_ptr + b)
    # Each split takes a whole number of BLOCK_N tiles so tiles never straddle two splits.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    q = tl.load(
        q_latent_ptr + b * stride_ql_b + heads[:, None] * stride_ql_h + offs_c[None, :],
        mask=head_mask[:, None] & c_mask[None, :],
        other=0.0,
    )
    q_pe = tl.load(
        q_rope_ptr + b * stride_qr_b + heads[:, None] * stride_qr_h + offs_r[None, :],
        mask=head_mask[:, None] & r_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, LORA_PAD], dtype=tl.float32)

    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        tok_mask = pos < end
        page = tl.load(page_table_ptr + b * stride_pt_b + pos // PAGE_SIZE, mask=tok_mask, other=0)
        row = page.to(tl.int64) * stride_kv_page + (pos % PAGE_SIZE) * stride_kv_tok
        c = tl.load(
            kv_ptr + row[:, None] + offs_c[None, :], mask=tok_mask[:, None] & c_mask[None, :], other=0.0
        )
        k_pe = tl.load(
            kv_ptr + row[:, None] + LORA + offs_r[None, :],
            mask=tok_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if DEQUANT:  # an FP8 cache: dequantize the tile in registers, into q's dtype
            c = (c.to(tl.float32) * kv_scale).to(q.dtype)
            k_pe = (k_pe.to(tl.float32) * kv_scale).to(q.dtype)
        score = tl.dot(q, tl.trans(c), input_precision=DOT_PRECISION)
        score += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        score = tl.where(tok_mask[None, :], score * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(score, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(score - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (short sequence) leaves l_i at 0: mark it with lse = -inf so the reduce skips it.
    has_tokens = l_i > 0.0
    safe_l = tl.where(has_tokens, l_i, 1.0)
    lse = tl.where(has_tokens, m_i + tl.log2(safe_l), float("-inf"))
    part = acc / safe_l[:, None]
    tl.store(
        mid_out_ptr + b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s + offs_c[None, :],
        part,
        mask=head_mask[:, None] & c_mask[None, :],
    )
    tl.store(mid_lse_ptr + b * stride_ml_b + heads * stride_ml_h + split, lse, mask=head_mask)


@triton.jit
def _mla_decode_reduce_kernel(
    mid_out_ptr,
    mid_lse_ptr,
    out_ptr,
    stride_mo_b,
    stride_mo_h,
    stride_mo_s,
    stride_ml_b,
    stride_ml_h,
    stride_o_b,
    stride_o_h,
    LORA: tl.constexpr,
    LORA_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, LORA_PAD)
    c_mask = offs_c < LORA

    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([LORA_PAD], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(mid_lse_ptr + b * stride_ml_b + h * stride_ml_h + s)
        part = tl.load(
            mid_out_ptr + b * stride_mo_b + h * stride_mo_h + s * stride_mo_s + offs_c, mask=c_mask, other=0.0
        )
        m_new = tl.maximum(m, lse)
        # Both exponents are -inf -> 0 while every split so far was empty; guard the -inf - -inf NaN.
        safe_m = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - safe_m)
        w = tl.exp2(lse - safe_m)
        acc = acc * alpha + part * w
        denom = denom * alpha + w
        m = m_new
    out = tl.where(denom > 0.0, acc / tl.where(denom > 0.0, denom, 1.0), 0.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + offs_c, out.to(out_ptr.dtype.element_ty), mask=c_mask)


@dataclass(frozen=True)
class DecodeLaunchConfig:
    """Tile shape and split count of one decode launch; every field is a compile-time constant."""

    block_h: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the Triton interpreter on CPU: any small number keeps the grid small
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_launch_config(
    batch: int, num_heads: int, max_context: int, dtype: torch.dtype, device: torch.device
) -> DecodeLaunchConfig:
    """Picks tiles from shapes alone (never from `seq_lens` values, so CUDA graphs stay valid).

    Why these numbers (one H200, `python -m bench.tune_gpu`, bench/results/tune_gpu_mla.json; graph-timed
    sweeps of tile, warps, stages and splits at batch 1 / 8 / 64, context 1024 / 4096):
    - 16 heads (TP attention): 16-head x 32-token tiles, about two programs per SM (64 x 4 splits at
      batch 64, context 4096: 114 us, 62 % of copy_, against 135 us with four per SM); small batches fill
      the GPU only with short splits (>= 64 tokens) and take 64-token tiles with 8 warps (13.2 vs 14.3 us).
    - 128 heads (DP attention, compute-bound): 64-head x 64-token tiles, 8 warps, 3 stages, about three
      programs per SM: 354 us at batch 64, context 4096 (206 TFLOP/s) against 458 us for 32-head tiles.
    """
    wide = num_heads > 16 and dtype != torch.float32
    sms = _sm_count(device)
    if wide:
        block_h = 64
        head_blocks = triton.cdiv(num_heads, block_h)
        splits = round(3 * sms / max(1, batch * head_blocks))
        splits = max(1, min(splits, triton.cdiv(max(max_context, 1), 128), 64))
        return DecodeLaunchConfig(block_h=block_h, block_n=64, num_splits=splits, num_warps=8, num_stages=3)
    block_h = 16
    head_blocks = triton.cdiv(num_heads, block_h)
    small = batch * head_blocks <= 8
    splits = (2 * sms) // max(1, batch * head_blocks)
    # A small batch (decode at batch 1-8) fills the GPU only with short splits: at batch 1, context 1024,
    # 256-token splits left 4 programs running for 19 us a layer on one H200 (bench.decode_step --profile).
    min_split = 64 if small else 256
    splits = max(1, min(splits, triton.cdiv(max(max_context, 1), min_split), 64))
    if dtype == torch.float32:
        return DecodeLaunchConfig(block_h=block_h, block_n=16, num_splits=splits, num_warps=4, num_stages=2)
    if small:
        return DecodeLaunchConfig(block_h=block_h, block_n=64, num_splits=splits, num_warps=8, num_stages=2)
    return DecodeLaunchConfig(block_h=block_h, block_n=32, num_splits=splits, num_warps=4, num_stages=2)


def _validate(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q_latent.dim() != 3 or q_rope.dim() != 3 or q_latent.shape[:2] != q_rope.shape[:2]:
        raise ValueError(f"q_latent {tuple(q_latent.shape)} and q_rope {tuple(q_rope.shape)} must be [B, H, *]")
    if kv_cache.dim() != 3:
        raise ValueError(f"kv_cache must be [num_pages, page_size, dim], got {tuple(kv_cache.shape)}")
    lora, rope = q_latent.shape[2], q_rope.shape[2]
    if kv_cache.shape[2] != lora + rope:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[2]} != kv_lora_rank {lora} + rope_dim {rope}")
    if kv_cache.stride(2) != 1:
        raise ValueError("kv_cache must be contiguous in its last dim (a pool[:, layer] view is fine)")
    batch = q_latent.shape[0]
    if page_table.dim() != 2 or page_table.shape[0] != batch or page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32 [B={batch}, max_pages], got {page_table.dtype} {tuple(page_table.shape)}")
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [B={batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    tensors = (q_latent, q_rope, kv_cache, page_table, seq_lens)
    if len({t.device for t in tensors}) != 1:
        raise ValueError("q_latent, q_rope, kv_cache, page_table and seq_lens must be on one device")
    if q_latent.dtype != q_rope.dtype:
        raise ValueError(f"q_latent and q_rope dtypes differ: {q_latent.dtype}, {q_rope.dtype}")
    if kv_cache.dtype != q_latent.dtype and not (kv_cache.dtype in _FP8 and q_latent.dtype in _FP8_COMPUTE):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} cannot be read with q in {q_latent.dtype} (an FP8 "
                         "cache needs q in bfloat16, float16 or float32; otherwise the dtypes must match)")


def mla_decode_attention_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    config: DecodeLaunchConfig | None = None,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Paged absorbed-MLA decode; same contract as `kernels.mla.mla_decode_attention`.

    q_latent [B, H, kv_lora_rank], q_rope [B, H, rope_dim], kv_cache [num_pages, page_size,
    kv_lora_rank + rope_dim] (any page/token strides), page_table int32 [B, max_pages], seq_lens int32
    [B] -> [B, H, kv_lora_rank] in q's dtype. A sequence of length 0 yields zeros. An FP8 kv_cache is
    dequantized on load: cached value x means `x * kv_scale`. Without an explicit `config`, FlashMLA runs
    the call where it can (`kernels.flashmla_decode`). `seq_lens` must not
    exceed `max_pages * page_size` (not checked here: checking would need a host sync).
    """
    _validate(q_latent, q_rope, kv_cache, page_table, seq_lens)
    if config is None and flashmla_runs(q_latent, kv_cache, kv_scale):
        return mla_decode_attention_flashmla(q_latent, q_rope, kv_cache, page_table, seq_lens, scale)
    batch, num_heads, lora = q_latent.shape
    rope = q_rope.shape[2]
    page_size = kv_cache.shape[1]
    q_latent = q_latent if q_latent.stride(2) == 1 else q_latent.contiguous()
    q_rope = q_rope if q_rope.stride(2) == 1 else q_rope.contiguous()
    page_table = page_table if page_table.stride(1) == 1 else page_table.contiguous()
    if config is None:
        config = default_launch_config(
            batch, num_heads, page_table.shape[1] * page_size, q_latent.dtype, kv_cache.device
        )
    out = torch.empty((batch, num_heads, lora), dtype=q_latent.dtype, device=q_latent.device)
    if batch == 0 or num_heads == 0:
        return out
    splits = config.num_splits
    mid_out = torch.empty((batch, num_heads, splits, lora), dtype=torch.float32, device=q_latent.device)
    mid_lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q_latent.device)
    lora_pad = max(16, triton.next_power_of_2(lora))
    rope_pad = max(16, triton.next_power_of_2(rope))
    # fp32 caches compare to the reference bit-for-bit-ish only with full-precision dots (no tf32).
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    dequant = kv_cache.dtype != q_latent.dtype or kv_scale != 1.0

    grid = (triton.cdiv(num_heads, config.block_h), splits, batch)
    _mla_decode_split_kernel[grid](
        q_latent,
        q_rope,
        kv_cache,
        page_table,
        seq_lens,
        mid_out,
        mid_lse,
        float(scale) * _LOG2E,
        float(kv_scale),
        num_heads,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        page_table.stride(0),
        mid_out.stride(0),
        mid_out.stride(1),
        mid_out.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        LORA=lora,
        ROPE=rope,
        LORA_PAD=lora_pad,
        ROPE_PAD=rope_pad,
        PAGE_SIZE=page_size,
        BLOCK_H=config.block_h,
        BLOCK_N=config.block_n,
        NUM_SPLITS=splits,
        DOT_PRECISION=precision,
        DEQUANT=dequant,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_args(q_latent),
    )
    _mla_decode_reduce_kernel[(num_heads, batch)](
        mid_out,
        mid_lse,
        out,
        mid_out.stride(0),
        mid_out.stride(1),
        mid_out.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        LORA=lora,
        LORA_PAD=lora_pad,
        NUM_SPLITS=splits,
        num_warps=4,
        **pdl_args(out),
    )
    return out


def kv_bytes_read(seq_lens_total: int, dim: int, dtype: torch.dtype) -> int:
    """Fewest bytes a decode step must read from the latent cache: every cached token once."""
    return seq_lens_total * dim * torch.empty((), dtype=dtype).element_size()


__all__ = [
    "DecodeLaunchConfig",
    "default_launch_config",
    "kv_bytes_read",
    "mla_decode_attention_triton",
]
