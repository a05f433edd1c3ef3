"""Multi-head latent attention (MLA) of DeepSeek-V2/V3 over the paged latent KV pool.

EXTEND decompresses the whole context's latent (prefix read from the pages + the new tokens) to
per-head K/V and runs causal attention; DECODE folds W_UK into the query and W_UV into the output
("absorbed" form) so attention reads only the latent cache. Both write the new tokens' latent first.
Heads are split over the attention-TP group; the latent itself is replicated on every rank, or with
MLA-core DP (``engine.mla_core``) held by each request's owner rank alone.
With an FP8 pool (``--kv-cache-dtype fp8_e4m3``) the new tokens are written quantized with the layer's
scale and every read dequantizes: EXTEND on the gathered rows, DECODE inside the decode kernel.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from engine.config import Fp8Config, ModelConfig
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import read_kv
from engine.layers import ColumnParallelLinear, ReplicatedLinear, RMSNorm, RowParallelLinear, stacked_in
from engine.mla_core import decode_core, gather_context
from engine.parallel import ParallelContext
from engine.rope import RotaryEmbedding


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, ctx: ParallelContext, dtype: torch.dtype,
                 device: torch.device | str, fp8: Fp8Config | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = config.qk_head_dim
        if config.num_attention_heads % ctx.attn_tp_size:
            raise ValueError(f"{config.num_attention_heads} heads cannot be split over {ctx.attn_tp_size} ranks")
        self.num_heads = config.num_attention_heads // ctx.attn_tp_size
        self.scale = config.softmax_scale
        rank, size, group = ctx.attn_tp_rank, ctx.attn_tp_size, ctx.attn_tp_group
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * self.qk_dim, False, rank, size, dtype, device, fp8)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, config.q_lora_rank, config.attention_bias, dtype, device, fp8)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps, dtype, device)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, heads * self.qk_dim, False, rank, size,
                                                 dtype, device, fp8)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, config.kv_cache_dim, config.attention_bias, dtype,
                                                   device, fp8)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps, dtype, device)
        # Kept in the model dtype even with FP8 (as SGLang does): decode reads it as per-head W_UK / W_UV
        # matrices folded into the query and the output, not through a linear layer.
        self.kv_b_proj = ColumnParallelLinear(config.kv_lora_rank, heads * (self.nope_dim + self.v_dim), False,
                                              rank, size, dtype, device)
        if fp8 is not None:
            self.kv_b_proj.fp8_fallback = "MLA decode reads it per head (W_UK / W_UV absorbed)"
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, config.attention_bias, rank, size, group,
                                        dtype, device, fp8=fp8)
        # The two projections of the hidden state (q, or V3's q_a, and kv_a) live in one [rows_q + 576, D]
        # buffer, so a step runs them as one GEMM (one launch where decode ran two). Without biases; FP8
        # weights too where both hold FP8 in the same blocks and q's rows end on a block, so the block scales
        # stack the same way ([rows_q / 128 + 5, D / 128]: kv_a's last block is the buffer's partial one).
        self._q_in = self.q_proj if config.q_lora_rank is None else self.q_a_proj
        self._q_kv_a: torch.Tensor | None = None
        self._q_kv_a_scale: torch.Tensor | None = None
        rows, kv_a = self._q_in.weight.shape[0], self.kv_a_proj_with_mqa
        same_fp8 = self._q_in.fp8 is not None and kv_a.fp8 == self._q_in.fp8 and rows % self._q_in.fp8.block_n == 0
        if not config.attention_bias and (same_fp8 or (self._q_in.fp8 is None and kv_a.fp8 is None)):
            self._q_kv_a = torch.empty(rows + config.kv_cache_dim, hidden, dtype=self._q_in.weight.dtype,
                                       device=device)
            self._q_in.weight = nn.Parameter(self._q_kv_a[:rows], requires_grad=False)
            kv_a.weight = nn.Parameter(self._q_kv_a[rows:], requires_grad=False)
            if same_fp8:
                assert self._q_in.weight_scale_inv is not None and kv_a.weight_scale_inv is not None
                q_blocks = self._q_in.weight_scale_inv.shape[0]
                self._q_kv_a_scale = torch.empty(q_blocks + kv_a.weight_scale_inv.shape[0],
                                                 self._q_in.weight_scale_inv.shape[1], dtype=torch.float32,
                                                 device=device)
                self._q_in.weight_scale_inv = nn.Parameter(self._q_kv_a_scale[:q_blocks], requires_grad=False)
                kv_a.weight_scale_inv = nn.Parameter(self._q_kv_a_scale[q_blocks:], requires_grad=False)

    def _project_hidden(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, or V3's q_a; kv_a) of the hidden state: one GEMM while both weights (and FP8 scales) live in
        the fused buffers (a loader may have replaced them), else two. The results are column views of one
        output."""
        first, fused, kv_a = self._q_in.weight, self._q_kv_a, self.kv_a_proj_with_mqa
        if fused is None or not stacked_in(fused, first, kv_a.weight):
            return self._q_in(hidden), kv_a(hidden)
        if self._q_in.fp8 is None:
            both = torch.nn.functional.linear(hidden, fused)
        elif stacked_in(self._q_kv_a_scale, self._q_in.weight_scale_inv, kv_a.weight_scale_inv):
            assert self._q_kv_a_scale is not None
            both = kernels.fp8_linear(hidden, fused, self._q_kv_a_scale, None, self._q_in.fp8.block_size)
        else:
            return self._q_in(hidden), kv_a(hidden)
        return both[:, : first.shape[0]], both[:, first.shape[0]:]

    def _w_kc_vc(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``[H, nope, R]`` and W_UV ``[H, v, R]`` as views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding,
                cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, kv_scale: float = 1.0) -> torch.Tensor:
        """hidden ``[T, D]`` -> ``[T, D]``; kv_cache is this layer's view ``[num_pages, page_size, R + P]``
        (stored value x means ``x * kv_scale``)."""
        num_tokens = hidden.shape[0]
        q, kv_a = self._project_hidden(hidden)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(num_tokens, self.num_heads, self.qk_dim)
        route = batch.mla_core  # MLA-core DP: this rank holds its own requests' latents only
        write_pages = batch.write_pages if route is None else route.write_pages
        # One op: the latent's RMSNorm, k_pe's RoPE, both written into the pool, and q_pe's RoPE (one kernel
        # on the GPU where the unfused code launched about twenty); at decode with the absorbed query beside it
        # (both in one launch where kernels.triton_head_matmul runs). Prefill takes the rotation in q itself.
        prep = (q, kv_a, cos, sin, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, kv_cache, write_pages,
                batch.write_slots, self.nope_dim, rope.interleave, kv_scale)
        if batch.mode is ForwardMode.DECODE:
            w_kc, _ = self._w_kc_vc()
            q_pe, q_latent = kernels.mla_decode_prep_q_latent(*prep, w_kc)
            out = self._decode(q_latent, q_pe, batch, kv_cache, kv_scale)
        else:
            kernels.mla_decode_prep(*prep, in_place=True)
            out = self._extend(q, batch, kv_cache, kv_scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_dim))

    def _extend(self, q: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor, kv_scale: float) -> torch.Tensor:
        """q ``[T, H, nope + P]``, its rope part already rotated."""
        assert batch.read_pages is not None and batch.read_slots is not None
        # [Tk, R + P], prefix and new tokens, in the compute dtype
        if batch.mla_core is None:
            context = read_kv(kv_cache, batch.read_pages, batch.read_slots, q.dtype, kv_scale)
        else:
            context = gather_context(batch.mla_core, kv_cache, batch.read_slots, q.dtype, kv_scale)
        ctx_latent, ctx_k_pe = context.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(ctx_latent).view(-1, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, ctx_k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
        # The host copies of the bounds where the batch has them: the attention cuts sequences in Python.
        cu_q = batch.cu_seqlens_q if batch.cu_seqlens_q_host is None else batch.cu_seqlens_q_host
        cu_k = batch.cu_seqlens_k if batch.cu_seqlens_k_host is None else batch.cu_seqlens_k_host
        return kernels.mla_prefill_attention(q, k, v, cu_q, cu_k, self.scale)

    def _decode(self, q_latent: torch.Tensor, q_pe: torch.Tensor, batch: ForwardBatch,
                kv_cache: torch.Tensor, kv_scale: float) -> torch.Tensor:
        """q_latent ``[B, H, R]`` (q_nope @ W_UK), q_pe ``[B, H, P]`` rotated -> ``[B, H, v]``."""
        _, w_vc = self._w_kc_vc()
        # Written into a [B, H, v] buffer (cuBLAS through its [H, B, v] view), so the o_proj input is a plain
        # reshape: a transposed result cost a copy launch per layer.
        out = torch.empty(q_latent.shape[0], self.num_heads, self.v_dim, dtype=q_latent.dtype, device=q_latent.device)
        if batch.mla_core is not None:
            out_latent = decode_core(batch.mla_core, q_latent, q_pe, kv_cache, self.scale, kv_scale)
        else:
            out_latent = kernels.mla_decode_attention(q_latent, q_pe, kv_cache, batch.page_table, batch.seq_lens,
                                                      self.scale, kv_scale)
        return kernels.head_matmul(out_latent, w_vc.transpose(1, 2), out)
