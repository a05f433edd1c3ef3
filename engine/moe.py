"""Feed-forward blocks: the dense SiLU MLP and the routed MoE with shared experts.

The MoE runs router top-k -> dispatch -> local experts (``kernels.moe_forward``) -> combine. The
dispatcher is the seam for expert parallelism: ``LocalDispatcher`` keeps every token on this rank
(identity with one rank; with several ranks holding replicated tokens, experts off this rank
contribute 0 and ``combine`` sums over ranks). An EP all-to-all dispatcher (``kernels/ep.py``)
implements the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.config import Fp8Config, ModelConfig
from engine.layers import ColumnParallelLinear, RowParallelLinear
from engine.parallel import ParallelContext, all_reduce


class DenseMLP(nn.Module):
    """SiLU-gated MLP, gate/up column-parallel and down row-parallel over the attention-TP group.

    With ``dp_size == 1`` that group is the whole TP group. With DP attention each DP group keeps its
    own tokens through the dense layers (SGLang's choice: no gather of every group's tokens), so
    dense MLPs and shared experts are sharded over the group's ``attn_tp_size`` ranks.
    """

    def __init__(self, hidden: int, intermediate: int, ctx: ParallelContext, dtype: torch.dtype,
                 device: torch.device | str, reduce_output: bool = True, fp8: Fp8Config | None = None) -> None:
        super().__init__()
        rank, size = ctx.attn_tp_rank, ctx.attn_tp_size
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, False, rank, size, dtype, device, fp8)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, False, rank, size, dtype, device, fp8)
        # A shared expert skips its own all-reduce: the MoE block sums it together with the routed output.
        self.down_proj = RowParallelLinear(intermediate, hidden, False, rank, size, ctx.attn_tp_group, dtype,
                                           device, reduce_results=reduce_output, fp8=fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    """Chooses ``num_experts_per_tok`` experts per token, by the V2 or V3 rule (in float32).

    V2: softmax scores; "greedy" top-k or "group_limited_greedy" (top groups by their best expert).
    V3 ("noaux_tc"): sigmoid scores; ``e_score_correction_bias`` is added for the choice only; groups
    ranked by the sum of their two best biased scores; weights are the unbiased scores.
    Then optional normalisation and ``routed_scaling_factor``.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32,
                                               device=device), requires_grad=False)
        self.e_score_correction_bias: torch.Tensor | None = None
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(self.num_experts, dtype=torch.float32, device=device), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden ``[T, D]`` -> (topk_weights float32 ``[T, K]``, topk_ids int64 ``[T, K]``, global ids)."""
        cfg = self.config
        logits = F.linear(hidden.float(), self.weight)
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias
        if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and cfg.n_group > 1:
            # Explicit row counts: a DP group with no tokens still routes an empty batch (no -1 on 0 elements).
            grouped = choice.view(choice.shape[0], cfg.n_group, self.num_experts // cfg.n_group)
            if cfg.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(choice.shape[0], self.num_experts)
            # V3 masks with -inf (biased scores may be negative); V2 with 0 (softmax scores are > 0).
            fill = float("-inf") if cfg.topk_method == "noaux_tc" else 0.0
            choice = choice.masked_fill(~expert_mask, fill)
        topk_ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_ids)
        if cfg.norm_topk_prob and self.top_k > 1:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * cfg.routed_scaling_factor, topk_ids


@dataclass
class DispatchedTokens:
    """Tokens as the local experts see them: hidden ``[N, D]``, local ids ``[N, K]`` (-1 = elsewhere)."""

    hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: Any = None


class Dispatcher(Protocol):
    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchedTokens: ...

    def combine(self, expert_out: torch.Tensor, dispatched: DispatchedTokens) -> torch.Tensor: ...


class LocalDispatcher:
    """Every rank sees every token; experts outside ``[expert_start, expert_end)`` are masked to -1."""

    def __init__(self, expert_start: int, expert_end: int, group: Any = None, group_size: int = 1) -> None:
        self.expert_start, self.expert_end = expert_start, expert_end
        self.group, self.group_size = group, group_size

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchedTokens:
        local = topk_ids - self.expert_start
        off_rank = (topk_ids < self.expert_start) | (topk_ids >= self.expert_end)
        return DispatchedTokens(hidden, local.masked_fill(off_rank, -1), topk_weights)

    def combine(self, expert_out: torch.Tensor, dispatched: DispatchedTokens) -> torch.Tensor:
        return all_reduce(expert_out, self.group, self.group_size)


def moe_forward_static(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                       block_size: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """``kernels.moe_forward``'s contract, computed with fixed shapes and no host sync (CUDA graphs).

    Scatter the (token, slot) rows into the masked layout ``[E, capacity, D]`` + per-expert counts, run
    ``kernels.moe_forward_masked``, gather the rows back and sum them per token. Capacity is the token
    count T: top-k picks distinct experts, so no expert gets more than T rows (tighter than T * top_k).
    Rows keep (token, slot) order inside an expert and each token's experts are summed in ascending
    expert order, as the contiguous reference does, so fp32 results match it closely.
    ``fp8_scales`` (w13's and w2's block scales): FP8 experts, run by ``kernels.fp8_moe_forward_masked``.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden_dim = w13.shape[0], hidden.shape[1]
    flat = topk_ids.reshape(-1).long()
    valid = flat >= 0  # -1: expert on another rank
    expert = torch.where(valid, flat, num_experts)  # sentinel column for rows that go nowhere
    # [E+1, T*K], tiny for decode batches (not F.one_hot/repeat_interleave: they may sync to size outputs).
    # Built expert-major so the scan runs along the contiguous dimension: a cumsum over dim 0 of the
    # [T*K, E+1] layout took 72 us per layer at batch 64 on one H100 (9 % of a CUDA-graph decode step).
    one_hot = (torch.arange(num_experts + 1, device=hidden.device)[:, None] == expert[None, :]).long()
    slot = (one_hot.cumsum(1) - 1).gather(0, expert[None, :]).squeeze(0)  # rank of the row in its expert
    counts = one_hot[:num_experts].sum(1)
    dump = num_experts * num_tokens  # one extra row takes every invalid row's write; never read
    dest = torch.where(valid, expert * num_tokens + slot, dump)
    token_of = torch.arange(num_tokens * top_k, device=hidden.device) // top_k
    # Rows past an expert's count stay unwritten: the masked kernels never read them.
    rows = hidden.new_empty(dump + 1, hidden_dim).index_copy_(0, dest, hidden[token_of])
    x = rows[:dump].view(num_experts, num_tokens, hidden_dim)
    if fp8_scales is None:
        y = kernels.moe_forward_masked(x, counts, w13, w2)
    else:
        y = kernels.fp8_moe_forward_masked(x, counts, w13, fp8_scales[0], w2, fp8_scales[1], block_size)
    y = y.reshape(dump, hidden_dim)
    picked = y[torch.where(valid, dest, 0)] * topk_weights.reshape(-1, 1).to(y.dtype)
    picked = torch.where(valid[:, None], picked, 0).view(num_tokens, top_k, hidden_dim)
    order = topk_ids.argsort(dim=1)  # -1 first: those rows add an exact zero
    picked = picked.gather(1, order[:, :, None].expand(-1, -1, hidden_dim))
    out = torch.zeros_like(hidden)
    for k in range(top_k):
        out = out + picked[:, k]
    return out


class MoEBlock(nn.Module):
    """Routed experts (this rank's contiguous range) plus the always-on shared experts.

    With ``fp8`` the routed experts are FP8 e4m3 with float32 block scales ``w13_scale_inv`` ``[E, 2 *
    ceil(I/bn), ceil(D/bk)]`` (gate half's block rows, then up's) and ``w2_scale_inv`` ``[E, ceil(D/bn),
    ceil(I/bk)]``: experts are split over ranks whole, so their blocks are never cut.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, dtype: torch.dtype,
                 device: torch.device | str, dispatcher: Dispatcher | None = None,
                 fp8: Fp8Config | None = None) -> None:
        super().__init__()
        self.gate = TopKRouter(config, device)
        self.expert_start, self.expert_end = ctx.expert_range(config.n_routed_experts)
        num_local = self.expert_end - self.expert_start
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        self.fp8 = fp8
        wdtype = dtype if fp8 is None else kernels.fp8.FP8_DTYPE
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden, dtype=wdtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter, dtype=wdtype, device=device),
                               requires_grad=False)
        self.w13_scale_inv: nn.Parameter | None = None
        self.w2_scale_inv: nn.Parameter | None = None
        if fp8 is not None:
            bn, bk = fp8.block_size
            self.w13_scale_inv = nn.Parameter(torch.empty(num_local, 2 * -(-inter // bn), -(-hidden // bk),
                                                          dtype=torch.float32, device=device), requires_grad=False)
            self.w2_scale_inv = nn.Parameter(torch.empty(num_local, -(-hidden // bn), -(-inter // bk),
                                                         dtype=torch.float32, device=device), requires_grad=False)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher(
            self.expert_start, self.expert_end, ctx.tp_group, ctx.tp_size)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DenseMLP(hidden, inter * config.n_shared_experts, ctx, dtype, device,
                                           reduce_output=False, fp8=fp8)
        self.ctx = ctx

    def _experts(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 graph_safe: bool) -> torch.Tensor:
        if self.fp8 is None:
            expert = moe_forward_static if graph_safe else kernels.moe_forward
            return expert(hidden, topk_ids, topk_weights, self.w13, self.w2)
        assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
        if graph_safe:
            return moe_forward_static(hidden, topk_ids, topk_weights, self.w13, self.w2,
                                      (self.w13_scale_inv, self.w2_scale_inv), self.fp8.block_size)
        return kernels.fp8_moe_forward(hidden, topk_ids, topk_weights, self.w13, self.w13_scale_inv, self.w2,
                                       self.w2_scale_inv, self.fp8.block_size)

    def forward(self, hidden: torch.Tensor, graph_safe: bool = False) -> torch.Tensor:
        """``graph_safe``: CUDA-graph decode (engine.cuda_graph) — the experts run on the masked
        fixed-capacity layout (``moe_forward_static``), which has no host sync and no data-dependent shape."""
        if self.ctx.dp_size > 1 and isinstance(self.dispatcher, LocalDispatcher):
            # Its all-reduce assumes every rank holds the same tokens; DP groups hold different ones.
            raise RuntimeError("dp_size > 1 needs an expert-parallel dispatcher (engine.ep_moe)")
        if graph_safe and not isinstance(self.dispatcher, LocalDispatcher):
            raise RuntimeError("the graph-safe MoE path runs with the local dispatcher only")
        topk_weights, topk_ids = self.gate(hidden)
        dispatched = self.dispatcher.dispatch(hidden, topk_ids, topk_weights)
        expert_out = self._experts(dispatched.hidden, dispatched.topk_ids, dispatched.topk_weights, graph_safe)
        if self.shared_experts is not None:
            # Added before combine so one reduction covers both (shared output is a TP partial sum).
            # An EP dispatcher that moves tokens adds the shared output after combine instead.
            if isinstance(self.dispatcher, LocalDispatcher):
                return self.dispatcher.combine(expert_out + self.shared_experts(hidden), dispatched)
            return self.dispatcher.combine(expert_out, dispatched) + all_reduce(
                self.shared_experts(hidden), self.ctx.attn_tp_group, self.ctx.attn_tp_size)
        return self.dispatcher.combine(expert_out, dispatched)
