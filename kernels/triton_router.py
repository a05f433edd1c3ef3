"""The router's float32 GEMM (`kernels.decode_fused.router_logits`) as one Triton launch.

At decode the router GEMM is tiny (T <= 64 tokens x E <= 256 experts x D <= 7168), and `F.linear(hidden.float(),
weight)` ran it once per MoE layer as a cast launch plus two cuBLAS launches at batch 1 (a split dot and its
reduction, 3.8 us on an H100) or one 5.6-6 us sgemm at batch 8-64. This kernel reads the hidden in its own
dtype and tiles (token block, expert block) over a fixed grid, each program running whole dot products: one
launch, no atomics (the same sum order on every run), graph-safe.

Products and sums are float32 FMAs, never TF32 (the expert choice depends on the logits' low bits); the sum
order differs from cuBLAS', so logits agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import decode_fused
from kernels.triton_pdl import pdl_args, pdl_begin


@triton.jit
def _router_logits_kernel(h_ptr, w_ptr, out_ptr, num_tokens, num_experts, dim, stride_h, stride_w, stride_o,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    tmask = offs_t < num_tokens
    emask = offs_e < num_experts
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + offs_e.to(tl.int64)[:, None] * stride_w
    # Per-lane partial sums, reduced once at the end: the loop body is FMAs only (no cross-lane shuffles).
    acc = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_K], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < dim
        h = tl.load(h_rows + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, :], mask=emask[:, None] & kmask[None, :], other=0.0)
        acc += h[:, None, :] * w[None, :, :]
    logits = tl.sum(acc, axis=2)
    out = out_ptr + offs_t[:, None] * stride_o + offs_e[None, :]
    tl.store(out, logits, mask=tmask[:, None] & emask[None, :])


# Up to this many tokens (decode batches); more (prefill) go to cuBLAS, whose GEMM is then the better one (at
# 64 tokens of V3's 256 x 7168 router the two already tie on an H100).
MAX_TOKENS = 64

# (up to this many tokens, BLOCK_T, BLOCK_E, BLOCK_K, num_warps): the first row whose bound covers T. From a
# sweep on an H100 (each config timed as 20 back-to-back launches in a CUDA graph): one program per expert at
# one token spreads the weight reads over the SMs; more tokens take wider tiles as the FMAs (T x E x D) grow.
# Per launch against `F.linear(hidden.float(), weight)` timed the same way (its cast launch included), at
# T = 1 / 8 / 64: V2-Lite (64 x 2048) 2.0 / 2.4 / 4.4 us vs 6.3 / 10.3 / 11.1; V2 (160 x 5120) 3.3 / 5.0 /
# 15.4 us vs 6.3 / 19.2 / 19.3; V3 (256 x 7168) 3.7 / 7.3 / 22.3 us vs 7.2 / 20.0 / 21.7.
_SMALL_TILES = ((1, 1, 1, 2048, 4), (4, 2, 1, 2048, 4), (16, 2, 2, 2048, 4), (64, 4, 2, 1024, 4))
_LARGE_TILES = ((1, 1, 1, 4096, 8), (4, 2, 1, 2048, 8), (8, 4, 1, 1024, 4), (16, 4, 2, 1024, 4),
                (32, 8, 2, 512, 4), (64, 8, 4, 256, 4))
_SMALL_WEIGHTS = 1 << 18  # E x D up to V2-Lite's 64 x 2048 (x 2): the small table


def _blocks(num_tokens: int, num_experts: int, dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_K, num_warps) for the shape (BLOCK_K no wider than D needs)."""
    tiles = _SMALL_TILES if num_experts * dim <= _SMALL_WEIGHTS else _LARGE_TILES
    _, block_t, block_e, block_k, warps = next(row for row in tiles if num_tokens <= row[0])
    return block_t, block_e, min(block_k, triton.next_power_of_2(dim)), warps


def router_logits_triton(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``decode_fused.router_logits`` (``F.linear(hidden.float(), weight)``) in one launch."""
    if (hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or weight.dtype != torch.float32
            or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16) or hidden.stride(1) != 1
            or weight.stride(1) != 1 or not 0 < hidden.shape[0] <= MAX_TOKENS or weight.shape[0] == 0
            or hidden.device != weight.device):
        return decode_fused.router_logits(hidden, weight)
    (num_tokens, dim), num_experts = hidden.shape, weight.shape[0]
    out = torch.empty((num_tokens, num_experts), dtype=torch.float32, device=hidden.device)
    block_t, block_e, block_k, warps = _blocks(num_tokens, num_experts, dim)
    _router_logits_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, block_e))](
        hidden, weight, out, num_tokens, num_experts, dim, hidden.stride(0), weight.stride(0), out.stride(0),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=warps, **pdl_args(hidden),
    )  # fmt: skip
    return out
