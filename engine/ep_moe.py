"""Expert parallelism for the model's MoE layers: ``kernels.ep.Dispatcher`` behind the engine's
``Dispatcher`` seam (``engine.moe``), plus the idle forward of a DP group with no work.

Tokens inside an attention-DP group are replicated on its ``attn_tp`` ranks after attention. Before
dispatch each rank keeps only its contiguous share of them (so every token is sent once from its group),
and after combine the shares are all-gathered back inside the group. Routing counts are recorded per
layer from that share, so the sum over all ranks counts each token once.

Modes: high-throughput (any token count; prefill and colocated serving) or low-latency (at most
``max_tokens_per_rank`` tokens per rank per forward, fixed shapes; decode instances). In low-latency mode
the eager forward shows the masked layout to ``kernels.moe_forward`` as one row per (expert, slot) routed
to that expert with weight 1, and the routing weights are applied by ``low_latency_combine`` on the source
rank. The graph-safe forward (``dispatch_masked`` / ``combine_masked``, CUDA-graph decode at tp > 1) hands
the masked layout and its device-side counts to ``kernels.moe_forward_masked`` instead: the same exchanges
with the same shapes, so ranks replaying a graph, running eagerly or idle meet in the same collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.eplb.config import EplbConfig
from engine.eplb.state import EplbState
from engine.model import DeepseekForCausalLM
from engine.moe import DispatchedTokens, MaskedTokens, MoEBlock
from engine.parallel import ParallelContext
from kernels.ep import Dispatcher as EPDispatcher
from kernels.ep import DispatchHandle, LowLatencyHandle
from kernels.ep_stats import ExpertLoadRecorder


def share_bounds(num_tokens: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of share ``index`` when ``num_tokens`` rows are cut into ``parts`` contiguous shares."""
    base, extra = divmod(num_tokens, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass
class _Pending:
    """What combine needs besides the kernel's handle."""

    handle: DispatchHandle | LowLatencyHandle
    num_tokens: int  # rows of the DP group's batch (before taking this rank's share)
    topk_ids: torch.Tensor | None = None  # low-latency only: this share's routing
    topk_weights: torch.Tensor | None = None


class ExpertParallelDispatcher:
    """One MoE layer's view of the instance-wide EP dispatcher (the engine's ``Dispatcher`` protocol)."""

    def __init__(self, ep: EPDispatcher, pctx: ParallelContext, layer_id: int,
                 recorder: ExpertLoadRecorder | None, eplb: EplbState | None = None) -> None:
        self.ep, self.pctx, self.layer_id, self.recorder = ep, pctx, layer_id, recorder
        self.eplb = eplb
        self.low_latency = ep.mode == "low_latency"

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchedTokens:
        start, end = share_bounds(hidden.shape[0], self.pctx.attn_tp_size, self.pctx.attn_tp_rank)
        x, ids, weights = hidden[start:end], topk_ids[start:end], topk_weights[start:end]
        if self.recorder is not None:
            self.recorder.record(self.layer_id, ids)  # logical ids: what the policy balances
        if self.eplb is not None:  # logical -> physical slots, tokens spread over an expert's replicas
            ids = self.eplb.to_physical(self.layer_id, ids, start)
        if not self.low_latency:
            out = self.ep.dispatch(x, ids, weights)
            return DispatchedTokens(out.recv_x, out.recv_topk_ids, out.recv_topk_weights,
                                    _Pending(out.handle, hidden.shape[0]))
        ll = self.ep.low_latency_dispatch(x, ids)
        local, capacity = ll.recv_x.shape[:2]
        # Row (e, j) of the masked layout belongs to local expert e while j < count[e], else to none.
        slot = torch.arange(capacity, device=x.device)
        row_expert = torch.where(slot.view(1, -1) < ll.recv_count.view(-1, 1),
                                 torch.arange(local, device=x.device).view(-1, 1), -1)
        rows = ll.recv_x.reshape(local * capacity, -1)
        ones = torch.ones(local * capacity, 1, dtype=torch.float32, device=x.device)
        return DispatchedTokens(rows, row_expert.reshape(-1, 1), ones,
                                _Pending(ll.handle, hidden.shape[0], ids, weights))

    # ---- the capture-safe path (engine.moe.MaskedDispatcher): CUDA-graph decode over EP -------------------

    def check_capture(self, max_tokens: int) -> None:
        """Forwards of up to ``max_tokens`` rows per DP group can run the masked path inside a CUDA graph: the
        low-latency exchange (fixed shapes), this rank's share within the budget, no EPLB. Raises ValueError
        naming what stands in the way."""
        if not self.low_latency:
            raise ValueError(f"CUDA-graph EP decode needs the low-latency EP mode, not {self.ep.mode}")
        if self.eplb is not None:
            raise ValueError("CUDA-graph EP decode runs without EPLB (a rebalance rewrites the expert map and "
                             "weights a captured graph holds)")
        share = -(-max_tokens // self.pctx.attn_tp_size)  # the largest share a rank of the group keeps
        if share > self.ep.budget:
            raise ValueError(f"a batch of {max_tokens} gives one rank {share} tokens to dispatch, over the "
                             f"low-latency budget of {self.ep.budget} per rank")

    def dispatch_masked(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor) -> MaskedTokens:
        """This rank's share into the masked layout ``[E_local, ep_size * budget, D]``. Every buffer's shape is
        fixed by the budget, whatever the routing, and the counts stay on the device. Overflow cannot happen:
        a token picks an expert at most once, so no expert gets more than ``budget`` rows from one rank, and a
        share over the budget is refused by shape (``check_capture`` refuses such a graph before capture).
        Routing counts are not recorded here: a graph's padding rows would count as load."""
        if not self.low_latency:
            raise RuntimeError(f"the masked EP path needs the low-latency mode, not {self.ep.mode}")
        start, end = share_bounds(hidden.shape[0], self.pctx.attn_tp_size, self.pctx.attn_tp_rank)
        ids, weights = topk_ids[start:end], topk_weights[start:end]
        ll = self.ep.low_latency_dispatch(hidden[start:end], ids)
        return MaskedTokens(ll.recv_x, ll.recv_count, _Pending(ll.handle, hidden.shape[0], ids, weights))

    def combine_masked(self, expert_out: torch.Tensor, masked: MaskedTokens) -> torch.Tensor:
        """The experts' masked-layout output back to the source ranks, weighted and summed, shares gathered."""
        pending: _Pending = masked.handle
        assert isinstance(pending.handle, LowLatencyHandle)
        assert pending.topk_ids is not None and pending.topk_weights is not None
        share = self.ep.low_latency_combine(expert_out, pending.topk_ids, pending.topk_weights, pending.handle)
        return self._gather_shares(share, pending.num_tokens)

    def combine(self, expert_out: torch.Tensor, dispatched: DispatchedTokens) -> torch.Tensor:
        pending: _Pending = dispatched.handle
        if self.low_latency:
            assert pending.topk_ids is not None and pending.topk_weights is not None
            assert isinstance(pending.handle, LowLatencyHandle)
            y = expert_out.view(self.ep.num_local_experts, -1, expert_out.shape[-1])
            share = self.ep.low_latency_combine(y, pending.topk_ids, pending.topk_weights, pending.handle)
        else:
            assert isinstance(pending.handle, DispatchHandle)
            share = self.ep.combine(expert_out, pending.handle)
        return self._gather_shares(share, pending.num_tokens)

    def _gather_shares(self, share: torch.Tensor, num_tokens: int) -> torch.Tensor:
        size = self.pctx.attn_tp_size
        if size == 1:
            return share
        longest = -(-num_tokens // size)
        padded = torch.zeros(longest, share.shape[1], dtype=share.dtype, device=share.device)
        padded[: share.shape[0]] = share
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=self.pctx.attn_tp_group)
        lengths = [end - start for start, end in (share_bounds(num_tokens, size, i) for i in range(size))]
        return torch.cat([part[:n] for part, n in zip(parts, lengths, strict=True)])


class ExpertParallelMoE:
    """Owns the EP dispatcher and load recorder of one model; ``close()`` releases the dispatcher.

    Args:
        model: built with the rank's ``ParallelContext``; its MoE layers are switched to expert parallelism.
        backend: ``"a2a"`` (torch.distributed over the instance's TP group) or ``"local"`` (one rank).
        mode: ``"high_throughput"`` or ``"low_latency"``.
        max_tokens_per_rank: low-latency budget: the most tokens one DP group forwards at once.
        record_window: steps of routing counts kept for EPLB (``eplb.window_size`` when EPLB is on).
        eplb: EPLB settings (``None``: off); the model must be built with ``eplb.num_redundant_experts`` as its
            ``ParallelContext.redundant_experts``.
        num_nodes: nodes the instance spans (EPLB keeps expert groups on nodes).
    """

    def __init__(self, model: DeepseekForCausalLM, backend: str = "a2a", mode: str = "high_throughput",
                 max_tokens_per_rank: int = 0, record_window: int = 1000, eplb: EplbConfig | None = None,
                 num_nodes: int = 1) -> None:
        config, pctx = model.config, model.ctx
        redundant = eplb.num_redundant_experts if eplb is not None else 0
        if pctx.redundant_experts != redundant:
            raise ValueError(f"the model holds {pctx.redundant_experts} redundant expert slots, EPLB asks {redundant}")
        self.model = model
        self.moe_layers = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoEBlock)]
        # The whole DP group's batch may land on one rank's share when it is smaller than attn_tp.
        budget = max_tokens_per_rank if mode == "low_latency" else 0
        self.backend, self.mode, self.budget = backend, mode, budget
        self.ep = self._dispatcher(pctx)
        window = eplb.window_size if eplb is not None else record_window
        self.recorder = ExpertLoadRecorder(config.num_hidden_layers, config.n_routed_experts, window, model.device)
        self.blocks = {layer.layer_id: layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoEBlock)}
        self.eplb = None if eplb is None else EplbState(eplb, self.blocks, self.recorder, pctx.ep_rank, pctx.ep_size,
                                                        pctx.tp_group, config.n_group, num_nodes)
        self._point_layers(pctx)

    def _dispatcher(self, pctx: ParallelContext) -> EPDispatcher:
        model = self.model
        # Physical slots travel through the dispatcher: with EPLB an expert's replicas are experts of their own.
        ep = EPDispatcher(model.config.n_routed_experts + pctx.redundant_experts, model.config.hidden_size,
                          group=pctx.tp_group, backend=self.backend, mode=self.mode,
                          num_max_dispatch_tokens_per_rank=self.budget, dtype=model.dtype, device=model.device)
        if ep.ep_size != pctx.ep_size:
            ep.close()
            raise ValueError(f"the EP group has {ep.ep_size} ranks, the model expects {pctx.ep_size}")
        return ep

    def _point_layers(self, pctx: ParallelContext) -> None:
        for layer_id, block in self.blocks.items():
            block.dispatcher = ExpertParallelDispatcher(self.ep, pctx, layer_id, self.recorder, self.eplb)

    def regroup(self, pctx: ParallelContext) -> None:
        """Elastic EP: the instance now spans ``pctx``'s ranks (the experts already moved to their new slots,
        ``engine.runtime.elastic``): a dispatcher over the new EP group, every layer pointed at it, EPLB's
        rank and group re-pointed. The expert map keeps its shape (the physical slots are the same; only
        which rank holds which slot changed)."""
        self.ep.close()
        self.ep = self._dispatcher(pctx)
        if self.eplb is not None:
            self.eplb.ep_rank, self.eplb.ep_size, self.eplb.group = pctx.ep_rank, pctx.ep_size, pctx.tp_group
        self._point_layers(pctx)

    @torch.inference_mode()
    def idle_forward(self) -> None:
        """A DP group with no tokens still enters every MoE layer's collectives, in layer order; when the other
        groups split their forward into two micro-batches (engine.dbo), in the same interleaved order."""
        model = self.model
        empty = torch.empty(0, model.config.hidden_size, dtype=model.dtype, device=model.device)
        split = model.dbo_split(None) is not None
        for block in self.moe_layers:
            if not split:
                block(empty)
                continue
            stages = [block.dispatch_stage(empty), block.dispatch_stage(empty)]
            for stage in stages:
                block.combine_stage(block.expert_stage(stage))

    def end_step(self) -> None:
        """Every rank, at the same lockstep turn: closes the step's counts, and EPLB may rebalance."""
        self.recorder.end_step()
        if self.eplb is not None:
            self.eplb.end_step()

    def close(self) -> None:
        self.ep.close()
