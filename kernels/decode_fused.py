"""Torch references of the fused decode-step ops (their Triton twins: `kernels.triton_decode_fused`).

A CUDA-graph decode step of V2-Lite launched ~1500 kernels, most of them elementwise glue around the
GEMMs (bench.decode_step --profile): the residual add before each RMSNorm, RoPE (a dozen ops for q and for
k), the latent's norm and its write into the paged pool, the router's scoring and top-k, and the scatter
and weighted sum around the masked expert GEMM. Each op here is one such group with the exact arithmetic
of the unfused code it replaces (same roundings in the same order), so the CPU path stays the reference:

- `add_rms_norm`: ``s = x + residual`` (rounded to the dtype), then `rms_norm(s)`; returns both.
- `mla_decode_prep`: RMSNorm of the new tokens' latent, RoPE of their k_pe, both written into the pool at
  (write_pages, write_slots), and RoPE of the query's rope part, returned; `mla_decode_prep_q_latent` with the
  absorbed query (``q_nope @ W_UK``, independent work a GPU launch can run beside it).
- `router_topk`: DeepSeek's V2 (softmax, greedy / group-limited) and V3 (sigmoid + correction bias,
  grouped by the sum of each group's two best) expert choice from the router logits.
- `moe_scatter_rows` / `moe_combine`: (token, slot) rows into the masked layout ``[E, T, D]`` with
  per-expert counts, and back: a float32 weighted sum per token in ascending expert order, plus `add`.
  `moe_scatter_rows_active` also returns `active_experts` (the experts with rows) for the masked GEMMs' grid.
- `moe_combine_add_rms_norm`: `moe_combine`, then the next layer's `add_rms_norm` of its output (one launch).
- `router_logits`: the router's float32 GEMM ahead of `router_topk` (its GPU twin: one launch, no TF32);
  `router_logits_topk`: the two as one op (its GPU twin may run both in one launch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.f16_groups import F16Rows, f16_groups
from kernels.mla import head_matmul
from kernels.norm import rms_norm

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # the largest finite value of each


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``rms_norm(x + residual)``, ``x + residual``): the pre-norm layer's add and norm in one op."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """`engine.rope.RotaryEmbedding.apply`: pairs (even, odd) when ``interleave`` else (first, second half);
    the output is laid out as halves. ``x`` ``[T, ..., P]``, ``cos``/``sin`` float32 ``[T, P/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else (x[..., :half], x[..., half:])
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def mla_decode_prep(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor, write_pages: torch.Tensor,
                    write_slots: torch.Tensor, nope_dim: int, interleave: bool,
                    kv_scale: float = 1.0, in_place: bool = False) -> torch.Tensor:
    """q ``[T, H, nope + P]``, kv_a ``[T, R + P]`` (kv_a_proj's output) -> q's rotated rope part ``[T, H, P]``,
    a new tensor, or with ``in_place`` written over q's own rope part and returned as that view (prefill then
    attends over q itself where it concatenated q_nope and q_pe: one copy of q a layer fewer).

    Writes ``cat(rms_norm(latent), rope(k_pe))`` of every token into ``kv_cache`` ``[pages, page_size,
    R + P]`` at (write_pages[t], write_slots[t]); an FP8 pool stores ``value / kv_scale`` saturated to the
    format's range (a plain cast would turn overflow into NaN), as ``engine.kv_pool.write_kv`` does."""
    lora = norm_weight.shape[0]
    latent = rms_norm(kv_a[:, :lora], norm_weight, eps)
    k_pe = rope_rotate(kv_a[:, lora:], cos, sin, interleave)
    values = torch.cat([latent, k_pe], dim=-1)
    if kv_cache.dtype in FP8_MAX:
        limit = FP8_MAX[kv_cache.dtype]
        scaled = values.float() / kv_scale if kv_scale != 1.0 else values.float()
        stored = scaled.clamp(-limit, limit).to(kv_cache.dtype)
        # Byte moves: index_put has no FP8 kernel on every device and build.
        kv_cache.view(torch.uint8)[write_pages, write_slots] = stored.view(torch.uint8)
    else:
        kv_cache[write_pages, write_slots] = values.to(kv_cache.dtype)
    q_pe = rope_rotate(q[..., nope_dim:], cos, sin, interleave)
    return q[..., nope_dim:].copy_(q_pe) if in_place else q_pe


def router_topk(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scoring: str, method: str,
                n_group: int, topk_group: int, normalize: bool,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 router logits ``[T, E]`` -> (weights float32 ``[T, K]``, expert ids int64 ``[T, K]``).

    ``bias`` (V3's e_score_correction_bias) is added for the choice only; weights are unbiased scores."""
    num_tokens, num_experts = logits.shape
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if method in ("group_limited_greedy", "noaux_tc") and n_group > 1:
        # Explicit row counts: a DP group with no tokens still routes an empty batch (no -1 on 0 elements).
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        if method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        # V3 masks with -inf (biased scores may be negative); V2 with 0 (softmax scores are > 0).
        choice = choice.masked_fill(~expert_mask, float("-inf") if method == "noaux_tc" else 0.0)
    topk_ids = choice.topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, topk_ids)
    if normalize and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, topk_ids


def moe_scatter_rows(hidden: torch.Tensor, topk_ids: torch.Tensor,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[T, D]``, local expert ids ``[T, K]`` (-1: another rank's) -> (rows ``[E, T, D]``, counts int64
    ``[E]``, dest int64 ``[T * K]``: the flat row ``e * T + slot`` of each (token, slot), -1 if none).

    A row's slot is its rank among the rows of its expert in (token, slot) order. Capacity T suffices: top-k
    picks distinct experts, so no expert gets more than one row per token. Rows past a count are
    unspecified (the masked GEMM never reads them)."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    valid = flat >= 0
    expert = torch.where(valid, flat, num_experts)  # a sentinel column for rows that go nowhere
    # [E+1, T*K] built expert-major, so the scan runs along the contiguous dimension.
    one_hot = (torch.arange(num_experts + 1, device=hidden.device)[:, None] == expert[None, :]).long()
    slot = (one_hot.cumsum(1) - 1).gather(0, expert[None, :]).squeeze(0)
    counts = one_hot[:num_experts].sum(1)
    dest = torch.where(valid, expert * num_tokens + slot, -1)
    rows = hidden.new_zeros(num_experts * num_tokens + 1, hidden.shape[1])
    token_of = torch.arange(num_tokens * top_k, device=hidden.device) // top_k
    rows.index_copy_(0, torch.where(valid, dest, num_experts * num_tokens), hidden[token_of])
    return rows[:-1].view(num_experts, num_tokens, -1), counts, dest


def active_experts(counts: torch.Tensor) -> torch.Tensor:
    """int32 ``[E + 1]``: the experts with rows (``counts > 0``) in ascending order, then how many there are (at
    index E); the slots between are unspecified. The masked GEMMs can then launch a grid of the active experts
    alone (``active`` of ``moe_forward_masked_shared``). No host sync: graph-capturable."""
    num_experts = counts.shape[0]
    active = counts > 0
    pos = torch.where(active, active.long().cumsum(0) - 1, num_experts + 1)  # the inactive go to a spare slot
    out = torch.zeros(num_experts + 2, dtype=torch.int32, device=counts.device)
    out.scatter_(0, pos, torch.arange(num_experts, dtype=torch.int32, device=counts.device))
    out[num_experts] = active.sum()
    return out[: num_experts + 1]


def moe_scatter_rows_active(hidden: torch.Tensor, topk_ids: torch.Tensor,
                            num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_scatter_rows` plus ``active_experts(counts)``: (rows, counts, dest, active). One op so that the GPU
    twin builds the active list inside the scatter's launch (one small launch fewer per MoE layer)."""
    rows, counts, dest = moe_scatter_rows(hidden, topk_ids, num_experts)
    return rows, counts, dest, active_experts(counts)


def moe_scatter_rows_active_f16(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                                group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, F16Rows]:
    """`moe_scatter_rows_active` plus the rows and ``hidden`` in f16 groups of ``group`` columns
    (``kernels.f16_groups``), which the FP8 decode expert launches take instead of converting them (one launch
    fewer a layer): one op so that the GPU twin writes them in the scatter's launch."""
    rows, counts, dest, active = moe_scatter_rows_active(hidden, topk_ids, num_experts)
    rq, rs = f16_groups(rows, group)
    hq, hs = f16_groups(hidden, group)
    return rows, counts, dest, active, F16Rows(rq, rs, hq, hs)


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router GEMM: hidden ``[T, D]`` (any float dtype) times the float32 gate ``[E, D]`` -> float32
    logits ``[T, E]``, in full float32 (the expert choice is sensitive to the logits' low bits)."""
    return F.linear(hidden.float(), weight)


def moe_combine(y: torch.Tensor, dest: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = add[t] + sum_k w[t, k] * y[dest[t, k]]`` over the rows with ``dest >= 0``, in float32, summed
    in ascending expert order (as the contiguous reference sums), rounded once to ``y``'s dtype.

    y ``[E * T, D]`` (the masked GEMM's output, flat), dest ``[T * K]`` from `moe_scatter_rows`."""
    num_tokens, top_k = topk_ids.shape
    dest = dest.view(num_tokens, top_k)
    valid = dest >= 0
    picked = y[dest.clamp_min(0)].float() * topk_weights.float()[:, :, None]
    picked = torch.where(valid[:, :, None], picked, 0.0)
    order = topk_ids.argsort(dim=1, stable=True)  # -1 first: those rows add an exact zero
    picked = picked.gather(1, order[:, :, None].expand(-1, -1, y.shape[1]))
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    for k in range(top_k):
        out = out + picked[:, k]
    if add is not None:
        out = out + add.float()
    return out.to(y.dtype)


def moe_combine_add_rms_norm(y: torch.Tensor, dest: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                             add: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm(moe_combine(y, dest, topk_ids, topk_weights, add), residual, norm_weight, eps)``: an MoE
    layer's output summed into the residual stream and normed for the next layer, the two ops' roundings kept."""
    return add_rms_norm(moe_combine(y, dest, topk_ids, topk_weights, add), residual, norm_weight, eps)


def router_logits_topk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                       scoring: str, method: str, n_group: int, topk_group: int, normalize: bool,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_topk(router_logits(hidden, weight), bias, ...)``: the whole router."""
    return router_topk(router_logits(hidden, weight), bias, top_k, scoring, method, n_group, topk_group, normalize,
                       scaling)


def mla_decode_prep_q_latent(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor, write_pages: torch.Tensor,
                             write_slots: torch.Tensor, nope_dim: int, interleave: bool, kv_scale: float,
                             w_uk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`mla_decode_prep`'s q_pe, ``head_matmul(q[..., :nope_dim], w_uk)``): a decode layer's attention inputs."""
    q_pe = mla_decode_prep(q, kv_a, cos, sin, norm_weight, eps, kv_cache, write_pages, write_slots, nope_dim,
                           interleave, kv_scale)
    return q_pe, head_matmul(q[..., :nope_dim], w_uk)
