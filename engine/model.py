"""DeepSeek-V2/V3 causal LM (MLA + MoE) running on ForwardBatch over the paged latent KV pool."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention import MLAttention
from engine.config import Fp8Config, ModelConfig
from engine.dbo import DboConfig, Streams, agree_split, micro_batch, split_point
from engine.forward_batch import ForwardBatch, ForwardMode, ForwardOutput
from engine.kv_shards import ShardedKVPool
from engine.layers import ParallelLMHead, RMSNorm, VocabParallelEmbedding
from engine.mla_core import build_route
from engine.moe import DenseMLP, Dispatcher, MoEBlock, PendingCombine
from engine.parallel import ParallelContext
from engine.rope import RotaryEmbedding


def add_norm(norm: RMSNorm, hidden: torch.Tensor | PendingCombine,
             residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``norm(hidden + residual)``, ``hidden + residual``); a pending MoE output is summed in the same launch."""
    if isinstance(hidden, PendingCombine):
        return hidden.add_rms_norm(residual, norm.weight, norm.eps)
    return norm.add_forward(hidden, residual)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, ctx: ParallelContext, dtype: torch.dtype,
                 device: torch.device | str, dispatcher: Dispatcher | None, fp8: Fp8Config | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = MLAttention(config, layer_id, ctx, dtype, device, fp8)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_id):
            self.mlp = MoEBlock(config, ctx, dtype, device, dispatcher, fp8)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, ctx, dtype, device, fp8=fp8)

    def forward(self, hidden: torch.Tensor | PendingCombine, residual: torch.Tensor | None, batch: ForwardBatch,
                rope: RotaryEmbedding, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor | PendingCombine, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the caller's next add is fused into the
        next RMSNorm (``kernels.add_rms_norm``), as the same adds in the same order as ``h + f(norm(h))``; a
        graph-safe MoE layer's output may come pending, its weighted sum run in that add's launch."""
        x, residual = self.attention(hidden, residual, batch, rope, cos, sin)
        if batch.graph_safe and isinstance(self.mlp, MoEBlock):
            return self.mlp(x, graph_safe=True, defer_combine=True), residual
        return self.mlp(x), residual

    def attention(self, hidden: torch.Tensor | PendingCombine, residual: torch.Tensor | None, batch: ForwardBatch,
                  rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to its MLP: (the MLP's input, the residual stream)."""
        kv_cache = batch.kv_pool.layer(self.layer_id)
        if residual is None:
            assert isinstance(hidden, torch.Tensor)
            residual, x = hidden, self.input_layernorm(hidden)
        else:
            x, residual = add_norm(self.input_layernorm, hidden, residual)
        return self.post_attention_layernorm.add_forward(
            self.self_attn(x, batch, rope, cos, sin, kv_cache, batch.kv_pool.layer_scale(self.layer_id)), residual)


class DeepseekForCausalLM(nn.Module):
    """The whole model on one rank. Parameter names follow the HF checkpoint (``model.layers.N...``),
    except routed experts, which live packed per layer as ``mlp.w13`` / ``mlp.w2`` (see engine.weights).

    ``fp8``: the decoder layers' linear weights and experts are held in FP8 with block scales and run the
    FP8 kernels (``engine.quant.plan_quantization`` decides; embeddings, norms, router, LM head stay in
    ``dtype``). None: every weight in ``dtype`` (FP8 checkpoints are dequantized at load).
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", dispatcher: Dispatcher | None = None,
                 fp8: Fp8Config | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.config, self.ctx, self.dtype, self.device = config, ctx, dtype, torch.device(device)
        self.fp8 = fp8
        self.model = nn.Module()
        # Embedding and LM head are vocab-parallel over the attention-TP group: with DP attention each DP
        # group embeds and scores its own tokens (= the whole TP group when dp_size is 1).
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.attn_tp_rank,
                                                         ctx.attn_tp_size, ctx.attn_tp_group, dtype, device)
        self.model.layers = nn.ModuleList(
            DecoderLayer(config, i, ctx, dtype, device, dispatcher, fp8) for i in range(config.num_hidden_layers)
        )
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.attn_tp_rank, ctx.attn_tp_size,
                                      ctx.attn_tp_group, dtype, device)
        self.rope = RotaryEmbedding(config.rope, config.qk_rope_head_dim, config.rope_interleave,
                                    min(config.max_position_embeddings, 8192), device)
        self.dbo = DboConfig()  # dual batch overlap (engine.dbo): off unless the engine turns it on
        # Ranks of different attention-DP groups hold different batches: they agree on each split (engine.dbo).
        self.dbo_vote_group: Any = None
        self._streams: Streams | None = None

    def dbo_split(self, batch: ForwardBatch | None) -> int | None:
        """Where this forward's batch is cut into two micro-batches, or None; `batch` None is an idle forward
        of a DP group without work, which takes part in the vote (it splits when everyone else does: 0)."""
        if not self.dbo.enabled:
            return None
        split = split_point(batch, self.dbo) if batch is not None else 0
        if self.dbo_vote_group is not None and not agree_split(split is not None, self.dbo_vote_group):
            return None
        return split

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> ForwardOutput:
        """Token ids are not range-checked here (that would stall the device): ``ForwardBatch.build``
        checks them when given ``vocab_size``, and the scheduler validates every prompt on entry."""
        if batch.kv_pool.num_layers != self.config.num_hidden_layers:
            raise ValueError(f"KV pool has {batch.kv_pool.num_layers} layers, model has "
                             f"{self.config.num_hidden_layers}")
        if isinstance(batch.kv_pool, ShardedKVPool):
            if batch.graph_safe:
                raise ValueError("MLA-core DP runs without CUDA graphs (its exchange reads split sizes on the host)")
            batch.mla_core = build_route(batch, batch.kv_pool, self.ctx.attn_tp_group, self.ctx.attn_tp_size)
        split = self.dbo_split(batch) if not batch.graph_safe and batch.mla_core is None else None
        if split:
            return self._forward_overlapped(batch, split)
        hidden = self.model.embed_tokens(batch.input_ids)
        if batch.graph_safe:
            if batch.mode is not ForwardMode.DECODE or batch.return_all_logits:
                raise ValueError("graph_safe batches are DECODE batches without return_all_logits")
            # The cos/sin table grows on a host sync (positions.max()), which a capture forbids: compute
            # the rows from the positions instead (same float32 math as the table).
            freqs = batch.positions.float()[:, None] * self.rope.inv_freq[None, :]
            cos, sin = freqs.cos() * self.rope.scale, freqs.sin() * self.rope.scale
        else:
            cos, sin = self.rope.cos_sin(batch.positions)
        residual = None
        out: torch.Tensor | PendingCombine = hidden
        for layer in self.model.layers:
            out, residual = layer(out, residual, batch, self.rope, cos, sin)
        assert residual is not None
        if batch.graph_safe:
            return ForwardOutput(self.lm_head(add_norm(self.model.norm, out, residual)[0]))
        assert isinstance(out, torch.Tensor)  # pending only in graph-safe batches
        hidden = out
        if batch.return_all_logits:
            all_logits = self.lm_head(self.model.norm.add_forward(hidden, residual)[0])
            return ForwardOutput(all_logits[batch.cu_seqlens_q[1:].long() - 1], all_logits)
        last = batch.cu_seqlens_q[1:].long() - 1
        return ForwardOutput(self.lm_head(self.model.norm.add_forward(hidden[last], residual[last])[0]))

    def _forward_overlapped(self, batch: ForwardBatch, split: int) -> ForwardOutput:
        """The forward as two micro-batches, sequences [0, split) and [split, B), whose stages interleave per
        MoE layer as `engine.dbo` describes; the outputs are the two halves' outputs concatenated."""
        if self._streams is None:
            self._streams = Streams(self.device)
        streams = self._streams
        halves = [micro_batch(batch, 0, split), micro_batch(batch, split, batch.batch_size)]
        hidden = [self.model.embed_tokens(b.input_ids) for b in halves]
        rope = [self.rope.cos_sin(b.positions) for b in halves]
        residual: list[torch.Tensor | None] = [None, None]
        for layer in self.model.layers:
            mlp = layer.mlp
            if not isinstance(mlp, MoEBlock):
                for i, b in enumerate(halves):
                    with streams.joined():  # its input may be the last MoE layer's combine
                        x, residual[i] = layer.attention(hidden[i], residual[i], b, self.rope, *rope[i])
                    hidden[i] = mlp(x)
                continue
            stages = []
            for i, b in enumerate(halves):  # attention(1) runs while dispatch(0) is in flight
                with streams.joined():
                    x, residual[i] = layer.attention(hidden[i], residual[i], b, self.rope, *rope[i])
                stages.append(streams.communicate(mlp.dispatch_stage, x))
            for i, stage in enumerate(stages):  # experts(1) run while combine(0) is in flight
                with streams.joined():
                    mlp.expert_stage(stage)
                hidden[i] = streams.communicate(mlp.combine_stage, stage)
        streams.finish()
        outputs = []
        for b, h, r in zip(halves, hidden, residual, strict=True):
            assert r is not None
            if b.return_all_logits:
                all_logits = self.lm_head(self.model.norm.add_forward(h, r)[0])
                outputs.append(ForwardOutput(all_logits[b.cu_seqlens_q[1:].long() - 1], all_logits))
            else:
                last = b.cu_seqlens_q[1:].long() - 1
                outputs.append(ForwardOutput(self.lm_head(self.model.norm.add_forward(h[last], r[last])[0])))
        logits = torch.cat([o.next_token_logits for o in outputs])
        if batch.return_all_logits:
            return ForwardOutput(logits, torch.cat([o.all_logits for o in outputs]))  # type: ignore[misc]
        return ForwardOutput(logits)
