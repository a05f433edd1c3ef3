"""The router's float32 GEMM (`kernels.decode_fused.router_logits`) as one Triton launch.

At decode the router GEMM is tiny (T <= 64 tokens x E <= 256 experts x D <= 7168), and `F.linear(hidden.float(),
weight)` ran it once per MoE layer as a cast launch plus two cuBLAS launches at batch 1 (a split dot and its
reduction, 3.8 us on an H100) or one 5.6-6 us sgemm at batch 8-64. This kernel reads the hidden in its own
dtype and tiles (token block, expert block) over a fixed grid, each program running whole dot products: one
launch, no atomics (the same sum order on every run), graph-safe.

Products and sums are float32 FMAs, never TF32 (the expert choice depends on the logits' low bits); the sum
order differs from cuBLAS', so logits agree to float32 rounding, not bit for bit.

`router_logits_topk_triton`: at up to `FUSED_MAX_TOKENS` tokens the launch's last program to finish its logits
also makes every token's expert choice (`kernels.triton_last_program`; the top-k step of
`kernels.triton_decode_fused`), one launch a MoE layer fewer. `TANDEM_ROUTER_FUSED=1` turns it on. Off: on one
H100 (V2-Lite) it took 135 / 587 us a step at batch 1 / 8 against 127 / 142 for the two launches (the last
program chooses token after token; a choice per program would need the logits of every expert block first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import decode_fused
from kernels.backend import env_flag
from kernels.triton_decode_fused import (
    router_topk_constants,
    router_topk_row,
    router_topk_runs,
    router_topk_store,
    router_topk_triton,
)
from kernels.triton_last_program import arrive_last, launch_counters, reset_counter
from kernels.triton_pdl import pdl_args, pdl_begin

ROUTER_FUSED_ENV = "TANDEM_ROUTER_FUSED"
FUSED_MAX_TOKENS = 8  # the last program chooses every token's experts one after the other


@triton.jit
def _router_logits_kernel(h_ptr, w_ptr, out_ptr, num_tokens, num_experts, dim, stride_h, stride_w, stride_o,
                          bias_ptr, w_out_ptr, id_out_ptr, counter_ptr, group_size, scaling,
                          TILE_T: tl.constexpr, TILE_E: tl.constexpr, TILE_K: tl.constexpr, TOPK: tl.constexpr,
                          TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, BLOCK_E: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                          GROUPED: tl.constexpr, V3_GROUPS: tl.constexpr, NORMALIZE: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    offs_t = tl.program_id(0) * TILE_T + tl.arange(0, TILE_T)
    offs_e = tl.program_id(1) * TILE_E + tl.arange(0, TILE_E)
    tmask = offs_t < num_tokens
    emask = offs_e < num_experts
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + offs_e.to(tl.int64)[:, None] * stride_w
    # Per-lane partial sums, reduced once at the end: the loop body is FMAs only (no cross-lane shuffles).
    acc = tl.zeros([TILE_T, TILE_E, TILE_K], tl.float32)
    for k0 in range(0, dim, TILE_K):
        offs_k = k0 + tl.arange(0, TILE_K)
        kmask = offs_k < dim
        h = tl.load(h_rows + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, :], mask=emask[:, None] & kmask[None, :], other=0.0)
        acc += h[:, None, :] * w[None, :, :]
    logits = tl.sum(acc, axis=2)
    out = out_ptr + offs_t[:, None] * stride_o + offs_e[None, :]
    tl.store(out, logits, mask=tmask[:, None] & emask[None, :])
    if TOPK:
        if arrive_last(counter_ptr, tl.num_programs(0) * tl.num_programs(1)):
            offs = tl.arange(0, BLOCK_E)
            every = offs < num_experts
            for t in range(num_tokens):
                x = tl.load(out_ptr + t * stride_o + offs, mask=every, other=float("-inf"), cache_modifier=".cg")
                weights, ids = router_topk_row(x, offs, every, bias_ptr, group_size, TOP_K, N_GROUP, TOPK_GROUP,
                                               BLOCK_G, BLOCK_K, SIGMOID, HAS_BIAS, GROUPED, V3_GROUPS)
                router_topk_store(weights, ids, w_out_ptr, id_out_ptr, t, scaling, TOP_K, BLOCK_K, NORMALIZE)
            reset_counter(counter_ptr)


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


def _logits_run(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton GEMM takes these operands (else ``F.linear`` runs)."""
    return (hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
            and weight.dtype == torch.float32 and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and hidden.stride(1) == 1 and weight.stride(1) == 1 and 0 < hidden.shape[0] <= MAX_TOKENS
            and weight.shape[0] > 0 and hidden.device == weight.device)


def _launch(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
            topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, int] | None,
            constants: dict[str, int | bool]) -> None:
    (num_tokens, dim), num_experts = hidden.shape, weight.shape[0]
    block_t, block_e, block_k, warps = _blocks(num_tokens, num_experts, dim)
    w_out, id_out, counter, bias, scaling, group_size = topk if topk is not None else (out, out, out, None, 1.0, 1)
    _router_logits_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, block_e))](
        hidden, weight, out, num_tokens, num_experts, dim, hidden.stride(0), weight.stride(0), out.stride(0),
        bias if bias is not None else out, w_out, id_out, counter, group_size, scaling,
        TILE_T=block_t, TILE_E=block_e, TILE_K=block_k, TOPK=topk is not None, **constants, num_warps=warps,
        **pdl_args(hidden),
    )  # fmt: skip


# Stand-ins for the top-k constants of a launch without the top-k step (one compiled variant for all of them).
_NO_TOPK = router_topk_constants(1, 1, "softmax", "greedy", 1, 1, False, False)


def router_logits_triton(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``decode_fused.router_logits`` (``F.linear(hidden.float(), weight)``) in one launch."""
    if not _logits_run(hidden, weight):
        return decode_fused.router_logits(hidden, weight)
    out = torch.empty((hidden.shape[0], weight.shape[0]), dtype=torch.float32, device=hidden.device)
    _launch(hidden, weight, out, None, _NO_TOPK)
    return out


def router_fused_enabled() -> bool:
    return env_flag(ROUTER_FUSED_ENV)


def router_logits_topk_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                              scoring: str, method: str, n_group: int, topk_group: int, normalize: bool,
                              scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_fused.router_logits_topk``: one launch at up to `FUSED_MAX_TOKENS` tokens with the switch on,
    else the logits' launch and the top-k's."""
    num_tokens, num_experts = hidden.shape[0], weight.shape[0]
    counter = None
    if (router_fused_enabled() and num_tokens <= FUSED_MAX_TOKENS and _logits_run(hidden, weight)
            and router_topk_runs((num_tokens, num_experts), top_k, method, n_group)):
        counter = launch_counters(hidden.device, 1)
    if counter is None:
        return router_topk_triton(router_logits_triton(hidden, weight), bias, top_k, scoring, method, n_group,
                                  topk_group, normalize, scaling)
    out = torch.empty((num_tokens, num_experts), dtype=torch.float32, device=hidden.device)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=hidden.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=hidden.device)
    constants = router_topk_constants(num_experts, top_k, scoring, method, n_group, topk_group, normalize,
                                      bias is not None)
    _launch(hidden, weight, out, (weights, ids, counter, bias, float(scaling), num_experts // max(1, n_group)),
            constants)
    return weights, ids
