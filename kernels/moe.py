"""MoE expert compute (SiLU-gated MLP per expert), torch reference implementations.

Work is grouped by expert: tokens are sorted by the expert they go to, then one pair of matmuls
runs per expert that has work. Fast backends keep these signatures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(silu_mul(F.linear(x, w13)), w2)


def moe_forward(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the chosen local experts' outputs per token.

    hidden ``[T, D]``; topk_ids int ``[T, K]`` (local expert index, -1 = expert not on this rank:
    contributes 0); topk_weights float ``[T, K]``; w13 ``[E_local, 2*I, D]`` (gate rows then up rows);
    w2 ``[E_local, D, I]``. Returns ``[T, D]`` in hidden's dtype.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1).long()
    if flat_ids.numel() and int(flat_ids.max()) >= num_experts:
        raise ValueError(f"topk_ids holds expert {int(flat_ids.max())} but only {num_experts} are local")
    valid = flat_ids >= 0
    flat_ids = flat_ids[valid]
    token_of = torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k)[valid]
    weight_of = topk_weights.reshape(-1)[valid]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_sorted, weight_sorted = token_of[order], weight_of[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_sorted[start : start + count]
        y = _expert_mlp(hidden[tokens], w13[expert], w2[expert])
        y = y * weight_sorted[start : start + count, None].to(y.dtype)
        out.index_add_(0, tokens, y.to(out.dtype))
        start += count
    return out


def moe_forward_masked(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Expert MLP on DeepEP's low-latency layout.

    x ``[E_local, capacity, D]`` where rows ``[0, counts[e])`` of expert e are valid; returns
    ``[E_local, capacity, D]`` with rows past the count set to zero.
    """
    num_experts, capacity, _ = x.shape
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must be [{num_experts}], got {tuple(counts.shape)}")
    out = torch.zeros_like(x)
    for expert, count in enumerate(counts.tolist()):
        if count > capacity:
            raise ValueError(f"expert {expert} has {count} rows, capacity is {capacity}")
        if count > 0:
            out[expert, :count] = _expert_mlp(x[expert, :count], w13[expert], w2[expert]).to(x.dtype)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``SiLU(gate) * up`` of rows ``[gate | up]`` ``[T, 2I]`` -> ``[T, I]``, rounded as torch rounds the two ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A dense SiLU-gated MLP: x ``[T, D]``, gate_up ``[2I, D]`` (gate rows then up rows), down ``[D, I]``.
    Gate and up are separate products, as two linear layers compute them (the same bits)."""
    half = gate_up.shape[0] // 2
    return F.linear(F.silu(F.linear(x, gate_up[:half])) * F.linear(x, gate_up[half:]), down)


def moe_forward_masked_shared(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                              hidden: torch.Tensor, shared_gate_up: torch.Tensor, shared_down: torch.Tensor,
                              active: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_forward_masked`` and the layer's shared experts (``gated_mlp`` over ``hidden``) together:
    (routed output ``[E, capacity, D]``, shared output ``[capacity, D]``). The GPU runs both in the
    same two grouped-GEMM launches. ``active`` is the GPU kernels' grid of active experts (``kernels``'s
    ``ActiveGrid``); the reference computes every expert whatever it says."""
    return moe_forward_masked(x, counts, w13, w2), gated_mlp(hidden, shared_gate_up, shared_down)
