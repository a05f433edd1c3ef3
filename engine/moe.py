"""Feed-forward blocks: the dense SiLU MLP and the routed MoE with shared experts.

The MoE runs router top-k -> dispatch -> local experts (``kernels.moe_forward``) -> combine. The
dispatcher is the seam for expert parallelism: ``LocalDispatcher`` keeps every token on this rank
(identity with one rank; with several ranks holding replicated tokens, experts off this rank
contribute 0 and ``combine`` sums over ranks). An EP all-to-all dispatcher (``kernels/ep.py``)
implements the same two methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.config import Fp8Config, ModelConfig
from engine.layers import ColumnParallelLinear, RowParallelLinear, stacked_in
from engine.parallel import ParallelContext, all_reduce
from kernels.backend import env_flag
from kernels.f16_groups import F16Rows, f16_decode_wanted

# Up to this many tokens (decode batches) a dense MLP with FP8 weights runs as one expert of the gated grouped
# GEMM, and the shared experts ride in the routed experts' launches; prefill keeps cuBLAS.
FUSED_MLP_MAX_TOKENS = 256


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
        # gate and up live in one [2I, D] buffer (gate rows, then up rows: the experts' w13 layout), so that a
        # decode batch runs the whole MLP as one expert of the gated grouped GEMM: 2 kernels instead of 5.
        # FP8 weights fuse the same way, their block scales in one [2 * ceil(I/bn), ceil(D/bk)] buffer beside them
        # (gate's block rows, then up's: the experts' w13_scale_inv layout); all three must hold FP8 (a shard
        # cut off the block grid keeps the model dtype, and then the three linears run).
        local = self.gate_proj.weight.shape[0]
        self.fp8 = fp8 if all(p.fp8 is not None for p in (self.gate_proj, self.up_proj, self.down_proj)) else None
        self._gate_up: torch.Tensor | None = None
        self._gate_up_scale: torch.Tensor | None = None
        if fp8 is None or self.fp8 is not None:
            self._gate_up = torch.empty(2 * local, hidden, dtype=self.gate_proj.weight.dtype, device=device)
            self.gate_proj.weight = nn.Parameter(self._gate_up[:local], requires_grad=False)
            self.up_proj.weight = nn.Parameter(self._gate_up[local:], requires_grad=False)
        if self.fp8 is not None:
            assert self.gate_proj.weight_scale_inv is not None
            blocks = self.gate_proj.weight_scale_inv.shape[0]
            self._gate_up_scale = torch.empty(2 * blocks, self.gate_proj.weight_scale_inv.shape[1],
                                              dtype=torch.float32, device=device)
            self.gate_proj.weight_scale_inv = nn.Parameter(self._gate_up_scale[:blocks], requires_grad=False)
            self.up_proj.weight_scale_inv = nn.Parameter(self._gate_up_scale[blocks:], requires_grad=False)

    def _gate_up_weight(self) -> torch.Tensor | None:
        """The [2I, D] buffer while both weights still live in it (a loader may have replaced them) and the MLP
        has no bias (the fused kernels take none)."""
        if self.gate_proj.bias is not None or self.down_proj.bias is not None:
            return None
        if not stacked_in(self._gate_up, self.gate_proj.weight, self.up_proj.weight):
            return None
        if self.fp8 is not None and not stacked_in(self._gate_up_scale, self.gate_proj.weight_scale_inv,
                                                   self.up_proj.weight_scale_inv):
            return None
        return self._gate_up

    def one_expert_gate_up(self, rows: int) -> torch.Tensor | None:
        """The fused [2I, D] gate/up weight when `rows` tokens run this MLP as one expert of the gated grouped
        GEMM (a decode-sized batch, both weights still in the buffer, no bias); None: the three linears."""
        return None if rows > FUSED_MLP_MAX_TOKENS else self._gate_up_weight()

    def one_expert_weights(self, rows: int) -> tuple[torch.Tensor, ...] | None:
        """What a grouped GEMM needs to run this MLP as one expert over `rows` tokens: (gate/up, down), or with
        FP8 weights (gate/up, its block scales, down, its block scales); None as ``one_expert_gate_up``."""
        gate_up = self.one_expert_gate_up(rows)
        if gate_up is None:
            return None
        if self.fp8 is None:
            return gate_up, self.down_proj.weight
        assert self._gate_up_scale is not None and self.down_proj.weight_scale_inv is not None
        return gate_up, self._gate_up_scale, self.down_proj.weight, self.down_proj.weight_scale_inv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 at every size (kernels.gated_mlp picks its GEMMs by rows); FP8 at decode sizes only.
        gate_up = self._gate_up_weight() if self.fp8 is None else self.one_expert_gate_up(x.shape[0])
        if gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.fp8 is not None:
            assert self._gate_up_scale is not None and self.down_proj.weight_scale_inv is not None
            out = kernels.fp8_gated_mlp(x, gate_up, self._gate_up_scale, self.down_proj.weight,
                                        self.down_proj.weight_scale_inv, self.fp8.block_size)
        else:
            out = kernels.gated_mlp(x, gate_up, self.down_proj.weight)
        return all_reduce(out, self.down_proj.group, self.down_proj.tp_size) if self.down_proj.reduce_results else out


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
        # A float32 GEMM and the expert choice: a launch each on the GPU, or one (kernels.triton_router).
        return kernels.router_logits_topk(hidden, self.weight, self.e_score_correction_bias, self.top_k,
                                          cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group,
                                          cfg.norm_topk_prob, cfg.routed_scaling_factor)


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


@dataclass
class MaskedTokens:
    """Tokens in the masked layout of a fixed-budget exchange: ``x`` ``[E_local, capacity, D]`` (rows
    ``[0, counts[e])`` of expert ``e`` are real), ``counts`` ``[E_local]`` on the device, ``handle`` for combine."""

    x: torch.Tensor
    counts: torch.Tensor
    handle: Any


@runtime_checkable
class MaskedDispatcher(Protocol):
    """An EP dispatcher whose exchange a CUDA graph can capture (engine.ep_moe, low-latency mode): fixed
    shapes, no host sync; the routing weights are applied by ``combine_masked`` on the source rank."""

    def check_capture(self, max_tokens: int) -> None:
        """Raises ValueError saying why forwards of up to ``max_tokens`` rows cannot be captured."""
        ...

    def dispatch_masked(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor) -> MaskedTokens: ...

    def combine_masked(self, expert_out: torch.Tensor, masked: MaskedTokens) -> torch.Tensor: ...


class LocalDispatcher:
    """Every rank sees every token; experts outside ``[expert_start, expert_end)`` are masked to -1."""

    def __init__(self, expert_start: int, expert_end: int, group: Any = None, group_size: int = 1,
                 num_experts: int | None = None) -> None:
        self.expert_start, self.expert_end = expert_start, expert_end
        self.group, self.group_size = group, group_size
        self.holds_all = num_experts is not None and (expert_start, expert_end) == (0, num_experts)

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchedTokens:
        if self.holds_all:  # the ids are local already: no masking (5 kernels a layer on the GPU)
            return DispatchedTokens(hidden, topk_ids, topk_weights)
        local = topk_ids - self.expert_start
        off_rank = (topk_ids < self.expert_start) | (topk_ids >= self.expert_end)
        return DispatchedTokens(hidden, local.masked_fill(off_rank, -1), topk_weights)

    def combine(self, expert_out: torch.Tensor, dispatched: DispatchedTokens) -> torch.Tensor:
        return all_reduce(expert_out, self.group, self.group_size)


# The graph-safe MoE's launches (with the shared experts folded in) run a grid of the experts that got rows (at
# most tokens x top-k of them) instead of every local expert, most of them empty at decode (the list comes from
# kernels.moe_scatter_rows_active, in the scatter's launch). On an H100 (V2-Lite, batch 1) it took one layer's
# FP8 launches from 60.2 to 50.4 us and the bf16 step from 3.50 to 3.27 ms with the same tiles (then with a
# launch of its own for the list); TANDEM_MOE_ACTIVE_GRID=0 turns it off.
ACTIVE_GRID_ENV = "TANDEM_MOE_ACTIVE_GRID"


def active_grid_enabled() -> bool:
    return os.environ.get(ACTIVE_GRID_ENV, "1") != "0"


# The graph-safe MoE's weighted sum can wait for the next layer's residual add and RMSNorm and run in their launch
# (kernels.moe_combine_add_rms_norm): one launch a MoE layer fewer; only where the layer's output needs no
# all-reduce. TANDEM_COMBINE_NORM=1 turns it on. Off: on one H100 (V2-Lite) the fused launch took 143 / 197 us a
# step at batch 1 / 8 against 134 / 171 for the two it replaces (one program a token; the combine alone spreads a
# token's columns over several), README "decode step".
COMBINE_NORM_ENV = "TANDEM_COMBINE_NORM"


def combine_norm_enabled() -> bool:
    return env_flag(COMBINE_NORM_ENV)


@dataclass
class PendingCombine:
    """A graph-safe MoE layer's output before its weighted sum (``kernels.moe_combine``'s arguments)."""

    y: torch.Tensor
    dest: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    add: torch.Tensor | None

    def tensor(self) -> torch.Tensor:
        return kernels.moe_combine(self.y, self.dest, self.topk_ids, self.topk_weights, self.add)

    def add_rms_norm(self, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(``rms_norm(self.tensor() + residual)``, ``self.tensor() + residual``) in one launch on the GPU."""
        return kernels.moe_combine_add_rms_norm(self.y, self.dest, self.topk_ids, self.topk_weights, self.add,
                                                residual, weight, eps)


def moe_forward_static(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, add: torch.Tensor | None = None,
                       fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                       block_size: tuple[int, int] = (128, 128),
                       shared: tuple[torch.Tensor, ...] | None = None) -> PendingCombine:
    """``kernels.moe_forward``'s contract (plus ``add``, summed in), computed with fixed shapes and no host
    sync (CUDA graphs): the (token, slot) rows scattered into the masked layout ``[E, T, D]`` with per-expert
    counts, ``kernels.moe_forward_masked``, then each token's rows summed back in float32 in ascending expert
    order, as the contiguous reference sums (``kernels.decode_fused``). Four kernels on the GPU; the last (the
    weighted sum) is returned as a `PendingCombine` for the caller to run alone or with the next add and norm.
    ``fp8_scales`` (w13's and w2's block scales): FP8 experts, run by ``kernels.fp8_moe_forward_masked``.
    ``shared``: the shared experts' fused gate/up and down weights (``DenseMLP.one_expert_weights``: FP8 ones
    with their scales, beside FP8 experts), run over every token in the routed experts' launches and summed in
    (instead of ``add``)."""
    num_experts = w13.shape[0]
    ids = topk_ids.contiguous()
    active: kernels.ActiveGrid | None = None
    f16: F16Rows | None = None
    if shared is not None and active_grid_enabled():
        # The scatter's launch also lists the active experts (no launch of its own), and where the FP8 expert
        # launches take f16 activations, writes the rows in f16 groups too (kernels.f16_groups).
        if fp8_scales is not None and f16_decode_wanted():
            rows, counts, dest, active_ids, f16 = kernels.moe_scatter_rows_active_f16(hidden, ids, num_experts,
                                                                                     block_size[1])
        else:
            rows, counts, dest, active_ids = kernels.moe_scatter_rows_active(hidden, ids, num_experts)
        active = (active_ids, min(num_experts, ids.numel()))
    else:
        rows, counts, dest = kernels.moe_scatter_rows(hidden, ids, num_experts)
    if shared is not None:
        assert add is None and (len(shared) == 4) == (fp8_scales is not None)
        if fp8_scales is None:
            y, add = kernels.moe_forward_masked_shared(rows, counts, w13, w2, hidden, shared[0], shared[1], active)
        else:
            y, add = kernels.fp8_moe_forward_masked_shared(rows, counts, w13, fp8_scales[0], w2, fp8_scales[1],
                                                           hidden, shared, block_size, active, f16)
    elif fp8_scales is None:
        y = kernels.moe_forward_masked(rows, counts, w13, w2)
    else:
        y = kernels.fp8_moe_forward_masked(rows, counts, w13, fp8_scales[0], w2, fp8_scales[1], block_size)
    return PendingCombine(y.view(-1, hidden.shape[1]), dest, ids, topk_weights.contiguous(), add)


@dataclass
class MoEStage:
    """One micro-batch between the stages of ``MoEBlock``: its tokens, what dispatch gave, the experts' output."""

    hidden: torch.Tensor
    dispatched: DispatchedTokens
    expert_out: torch.Tensor | None = None
    shared_out: torch.Tensor | None = None  # EP dispatchers: the shared experts' output, added after combine


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
        # Physical slots [expert_start, expert_end); without EPLB's redundant slots slot e holds expert e.
        self.expert_start, self.expert_end = ctx.expert_range(config.n_routed_experts)
        num_local = self.expert_end - self.expert_start
        # The logical expert in each local slot: EPLB's start-up layout (engine.eplb.policy.static_placement),
        # rewritten by each live rebalance (engine.eplb.rebalance).
        self.local_experts = [slot % config.n_routed_experts for slot in range(self.expert_start, self.expert_end)]
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
            self.expert_start, self.expert_end, ctx.tp_group, ctx.tp_size, config.n_routed_experts)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DenseMLP(hidden, inter * config.n_shared_experts, ctx, dtype, device,
                                           reduce_output=False, fp8=fp8)
        self.ctx = ctx

    def slots_of(self, expert: int) -> list[int]:
        """The local slots holding logical ``expert`` (none when another rank holds it)."""
        return [slot for slot, held in enumerate(self.local_experts) if held == expert]

    def expert_tensors(self) -> list[torch.Tensor]:
        """Every per-expert tensor of the routed experts (weights, then FP8 scales), slot-major."""
        scales = [t for t in (self.w13_scale_inv, self.w2_scale_inv) if t is not None]
        return [self.w13, self.w2, *scales]

    def _experts(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts on the contiguous layout (eager), bf16 or FP8."""
        if self.fp8 is None:
            return kernels.moe_forward(hidden, topk_ids, topk_weights, self.w13, self.w2)
        assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
        return kernels.fp8_moe_forward(hidden, topk_ids, topk_weights, self.w13, self.w13_scale_inv, self.w2,
                                       self.w2_scale_inv, self.fp8.block_size)

    def _experts_static(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        add: torch.Tensor | None, shared: tuple[torch.Tensor, ...] | None) -> PendingCombine:
        """The routed experts graph-safe (masked layout; ``add`` summed in, or the shared experts'
        ``_fused_shared_weights`` run in the same launches), their weighted sum left pending."""
        if self.fp8 is None:
            return moe_forward_static(hidden, topk_ids, topk_weights, self.w13, self.w2, add=add, shared=shared)
        assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
        return moe_forward_static(hidden, topk_ids, topk_weights, self.w13, self.w2, add,
                                  (self.w13_scale_inv, self.w2_scale_inv), self.fp8.block_size, shared)

    def _fused_shared_weights(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The shared experts' weights (``DenseMLP.one_expert_weights``) when they can ride in the routed
        experts' launches: weights of the experts' kind (model dtype, or FP8 in the same blocks) still in their
        fused buffer, no bias, a decode-sized batch."""
        mlp = self.shared_experts
        if mlp is None or (self.fp8 is None) != (mlp.fp8 is None):
            return None
        if self.fp8 is not None and mlp.fp8 is not None and mlp.fp8.block_size != self.fp8.block_size:
            return None
        return mlp.one_expert_weights(hidden.shape[0])

    def forward(self, hidden: torch.Tensor, graph_safe: bool = False,
                defer_combine: bool = False) -> torch.Tensor | PendingCombine:
        """``graph_safe``: CUDA-graph decode (engine.cuda_graph) — the experts run on the masked
        fixed-capacity layout (``moe_forward_static``), which has no host sync and no data-dependent shape.
        ``defer_combine``: return the weighted sum pending (`PendingCombine`) where nothing has to run between it
        and the caller's next residual add (the local dispatcher of one rank, ``combine_norm_enabled``)."""
        if not graph_safe:
            return self.combine_stage(self.expert_stage(self.dispatch_stage(hidden)))
        if isinstance(self.dispatcher, MaskedDispatcher):
            return self._forward_masked_ep(hidden, self.dispatcher)
        if not isinstance(self.dispatcher, LocalDispatcher):
            raise RuntimeError("the graph-safe MoE path needs the local dispatcher or a masked EP dispatcher")
        topk_weights, topk_ids = self.gate(hidden)
        dispatched = self.dispatcher.dispatch(hidden, topk_ids, topk_weights)
        # The local dispatcher: the shared output is summed in the combine (its experts in the routed launches
        # where they fit there).
        fused = self._fused_shared_weights(hidden)
        shared = self.shared_experts(hidden) if fused is None and self.shared_experts is not None else None
        pending = self._experts_static(dispatched.hidden, dispatched.topk_ids, dispatched.topk_weights, shared, fused)
        if defer_combine and self.dispatcher.group_size == 1 and combine_norm_enabled():
            return pending
        return self.dispatcher.combine(pending.tensor(), dispatched)

    def _forward_masked_ep(self, hidden: torch.Tensor, dispatcher: MaskedDispatcher) -> torch.Tensor:
        """The graph-safe forward over expert parallelism: fixed-budget dispatch into the masked layout, the
        masked expert GEMM on it (counts stay on the device), combine. The collectives come in the eager
        stages' order (dispatch, the shared experts' reduction, combine), so a DP group running this inside
        a graph and one running the eager stages (or an idle forward) meet in the same exchanges."""
        topk_weights, topk_ids = self.gate(hidden)
        masked = dispatcher.dispatch_masked(hidden, topk_ids, topk_weights)
        if self.fp8 is None:
            expert_out = kernels.moe_forward_masked(masked.x, masked.counts, self.w13, self.w2)
        else:
            assert self.w13_scale_inv is not None and self.w2_scale_inv is not None
            expert_out = kernels.fp8_moe_forward_masked(masked.x, masked.counts, self.w13, self.w13_scale_inv,
                                                        self.w2, self.w2_scale_inv, self.fp8.block_size)
        shared = None
        if self.shared_experts is not None:
            shared = all_reduce(self.shared_experts(hidden), self.ctx.attn_tp_group, self.ctx.attn_tp_size)
        out = dispatcher.combine_masked(expert_out, masked)
        return out if shared is None else out + shared

    # The eager path in three stages, so that dual batch overlap (engine.dbo) can interleave two micro-batches'
    # stages; `forward` runs them back to back. Dispatch and combine are the EP communication.
    def dispatch_stage(self, hidden: torch.Tensor) -> MoEStage:
        """Routing, then the dispatch of this rank's tokens to their experts' ranks."""
        if self.ctx.dp_size > 1 and isinstance(self.dispatcher, LocalDispatcher):
            # Its all-reduce assumes every rank holds the same tokens; DP groups hold different ones.
            raise RuntimeError("dp_size > 1 needs an expert-parallel dispatcher (engine.ep_moe)")
        topk_weights, topk_ids = self.gate(hidden)
        return MoEStage(hidden, self.dispatcher.dispatch(hidden, topk_ids, topk_weights))

    def expert_stage(self, stage: MoEStage) -> MoEStage:
        """The routed experts on the tokens this rank received, and the shared experts on its own."""
        dispatched = stage.dispatched
        stage.expert_out = self._experts(dispatched.hidden, dispatched.topk_ids, dispatched.topk_weights)
        if self.shared_experts is not None:
            # With the local dispatcher the shared output is added before combine, so one reduction covers
            # both (it is a TP partial sum); an EP dispatcher that moves tokens adds it after combine instead.
            shared = self.shared_experts(stage.hidden)
            if isinstance(self.dispatcher, LocalDispatcher):
                stage.expert_out = stage.expert_out + shared
            else:
                stage.shared_out = all_reduce(shared, self.ctx.attn_tp_group, self.ctx.attn_tp_size)
        return stage

    def combine_stage(self, stage: MoEStage) -> torch.Tensor:
        """The experts' outputs back to their tokens' ranks, weighted and summed (plus the shared output)."""
        assert stage.expert_out is not None
        out = self.dispatcher.combine(stage.expert_out, stage.dispatched)
        return out if stage.shared_out is None else out + stage.shared_out
