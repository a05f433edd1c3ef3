"""Low-level ops behind stable signatures (torch only).

Call the ops through this module. ``kernels.backend.select_backend`` picks, per call, the torch
reference (``kernels.mla`` / ``kernels.moe``) or the GPU fast path (Triton decode and MoE, fused SDPA
prefill); ``TANDEM_KERNELS=torch|triton|auto`` forces one. Fast modules are imported only when chosen,
so CPU-only machines never import Triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from kernels import decode_fused, fp8, mla, moe, norm
from kernels.backend import select_backend
from kernels.f16_groups import F16Rows

# op name -> (module, function) of the GPU fast path; same signature as the reference.
_FAST: dict[str, tuple[str, str]] = {
    "mla_prefill_attention": ("kernels.gpu_prefill", "mla_prefill_attention_sdpa"),
    "mla_decode_attention": ("kernels.triton_mla_decode", "mla_decode_attention_triton"),
    "moe_forward": ("kernels.triton_moe", "moe_forward_gpu"),
    "moe_forward_masked": ("kernels.triton_moe", "moe_forward_masked_triton"),
    "moe_forward_masked_shared": ("kernels.triton_moe", "moe_forward_masked_shared_triton"),
    "rms_norm": ("kernels.triton_norm", "rms_norm_triton"),
    "quantize_fp8_act": ("kernels.triton_fp8", "quantize_fp8_act_triton"),
    "fp8_linear": ("kernels.triton_fp8", "fp8_linear_triton"),
    "fp8_moe_forward": ("kernels.triton_fp8_moe", "fp8_moe_forward_triton"),
    "fp8_moe_forward_masked": ("kernels.triton_fp8_moe", "fp8_moe_forward_masked_triton"),
    "fp8_gated_mlp": ("kernels.triton_fp8_moe", "fp8_gated_mlp_triton"),
    "fp8_moe_forward_masked_shared": ("kernels.triton_fp8_moe", "fp8_moe_forward_masked_shared_triton"),
    "add_rms_norm": ("kernels.triton_decode_fused", "add_rms_norm_triton"),
    "mla_decode_prep": ("kernels.triton_decode_fused", "mla_decode_prep_triton"),
    "router_logits": ("kernels.triton_router", "router_logits_triton"),
    "router_topk": ("kernels.triton_decode_fused", "router_topk_triton"),
    "router_logits_topk": ("kernels.triton_router", "router_logits_topk_triton"),
    "moe_scatter_rows": ("kernels.triton_decode_fused", "moe_scatter_rows_triton"),
    "moe_scatter_rows_active": ("kernels.triton_decode_fused", "moe_scatter_rows_active_triton"),
    "moe_scatter_rows_active_f16": ("kernels.triton_decode_fused", "moe_scatter_rows_active_f16_triton"),
    "active_experts": ("kernels.triton_decode_fused", "active_experts_triton"),
    "moe_combine": ("kernels.triton_decode_fused", "moe_combine_triton"),
    "moe_combine_add_rms_norm": ("kernels.triton_decode_fused", "moe_combine_add_rms_norm_triton"),
    "gated_mlp": ("kernels.triton_moe", "gated_mlp_triton"),
    "head_matmul": ("kernels.triton_head_matmul", "head_matmul_triton"),
    "mla_decode_prep_q_latent": ("kernels.triton_head_matmul", "mla_decode_prep_q_latent_triton"),
}
_REFERENCE: dict[str, Callable[..., Any]] = {
    "mla_prefill_attention": mla.mla_prefill_attention,
    "mla_decode_attention": mla.mla_decode_attention,
    "moe_forward": moe.moe_forward,
    "moe_forward_masked": moe.moe_forward_masked,
    "moe_forward_masked_shared": moe.moe_forward_masked_shared,
    "rms_norm": norm.rms_norm,
    "quantize_fp8_act": fp8.quantize_fp8_act,
    "fp8_linear": fp8.fp8_linear,
    "fp8_moe_forward": fp8.fp8_moe_forward,
    "fp8_moe_forward_masked": fp8.fp8_moe_forward_masked,
    "fp8_gated_mlp": fp8.fp8_gated_mlp,
    "fp8_moe_forward_masked_shared": fp8.fp8_moe_forward_masked_shared,
    "add_rms_norm": decode_fused.add_rms_norm,
    "mla_decode_prep": decode_fused.mla_decode_prep,
    "router_logits": decode_fused.router_logits,
    "router_topk": decode_fused.router_topk,
    "router_logits_topk": decode_fused.router_logits_topk,
    "moe_scatter_rows": decode_fused.moe_scatter_rows,
    "moe_scatter_rows_active": decode_fused.moe_scatter_rows_active,
    "moe_scatter_rows_active_f16": decode_fused.moe_scatter_rows_active_f16,
    "active_experts": decode_fused.active_experts,
    "moe_combine": decode_fused.moe_combine,
    "moe_combine_add_rms_norm": decode_fused.moe_combine_add_rms_norm,
    "gated_mlp": moe.gated_mlp,
    "head_matmul": mla.head_matmul,
    "mla_decode_prep_q_latent": decode_fused.mla_decode_prep_q_latent,
}


@cache
def _fast_op(name: str) -> Callable[..., Any]:
    module, function = _FAST[name]
    return getattr(importlib.import_module(module), function)


def get_op(name: str, tensor: torch.Tensor) -> Callable[..., Any]:
    """The implementation of op ``name`` for inputs like ``tensor``."""
    return _fast_op(name) if select_backend(tensor) == "triton" else _REFERENCE[name]


def mla_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
    return get_op("mla_prefill_attention", q)(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)


def mla_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                         page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         kv_scale: float = 1.0) -> torch.Tensor:
    return get_op("mla_decode_attention", q_latent)(q_latent, q_rope, kv_cache, page_table, seq_lens, scale,
                                                    kv_scale=kv_scale)


def head_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return get_op("head_matmul", x)(x, w, out)


def moe_forward(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    return get_op("moe_forward", hidden)(hidden, topk_ids, topk_weights, w13, w2)


def moe_forward_masked(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return get_op("moe_forward_masked", x)(x, counts, w13, w2)


# `active` (the masked-shared ops): (``active_experts(counts)``, how many grid slots to launch, at least the
# number of active experts): the GPU kernels then run a grid of the active experts alone, and the rows of the
# other experts are left unwritten (nothing reads them); None: every expert, rows past each count zeroed.
ActiveGrid = tuple[torch.Tensor, int]


def moe_forward_masked_shared(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                              hidden: torch.Tensor, shared_gate_up: torch.Tensor, shared_down: torch.Tensor,
                              active: ActiveGrid | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return get_op("moe_forward_masked_shared", x)(x, counts, w13, w2, hidden, shared_gate_up, shared_down,
                                                  active=active)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return get_op("rms_norm", x)(x, weight, eps)


# FP8 block-scaled ops (kernels/fp8.py): weights per 128x128 block, activations per 1x128 token group.
def quantize_fp8_act(x: torch.Tensor, group_size: int = fp8.BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]`` -> (fp8 ``[M, K]``, float32 scales ``[M, ceil(K/group_size)]``)."""
    return get_op("quantize_fp8_act", x)(x, group_size)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               block_size: fp8.BlockSize = (fp8.BLOCK, fp8.BLOCK)) -> torch.Tensor:
    return get_op("fp8_linear", x)(x, weight, weight_scale, bias, block_size)


def fp8_moe_forward(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                    block_size: fp8.BlockSize = (fp8.BLOCK, fp8.BLOCK)) -> torch.Tensor:
    return get_op("fp8_moe_forward", hidden)(hidden, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale,
                                             block_size)


def fp8_moe_forward_masked(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                           w2: torch.Tensor, w2_scale: torch.Tensor,
                           block_size: fp8.BlockSize = (fp8.BLOCK, fp8.BLOCK)) -> torch.Tensor:
    return get_op("fp8_moe_forward_masked", x)(x, counts, w13, w13_scale, w2, w2_scale, block_size)


def fp8_moe_forward_masked_shared(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                                  w2: torch.Tensor, w2_scale: torch.Tensor, hidden: torch.Tensor,
                                  shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                  block_size: fp8.BlockSize = (fp8.BLOCK, fp8.BLOCK),
                                  active: ActiveGrid | None = None,
                                  f16: F16Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``shared`` = the shared experts' (gate/up, its scales, down, its scales), FP8. ``f16``: ``x`` and
    ``hidden`` in f16 groups as well (``moe_scatter_rows_active_f16``), for GPU launches that take them."""
    return get_op("fp8_moe_forward_masked_shared", x)(x, counts, w13, w13_scale, w2, w2_scale, hidden, *shared,
                                                      block_size, active=active, f16=f16)


def fp8_gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor,
                  down_scale: torch.Tensor, block_size: fp8.BlockSize = (fp8.BLOCK, fp8.BLOCK)) -> torch.Tensor:
    return get_op("fp8_gated_mlp", x)(x, gate_up, gate_up_scale, down, down_scale, block_size)


# The fused decode-step ops (kernels.decode_fused documents each).
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return get_op("add_rms_norm", x)(x, residual, weight, eps)


def mla_decode_prep(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor, write_pages: torch.Tensor,
                    write_slots: torch.Tensor, nope_dim: int, interleave: bool,
                    kv_scale: float = 1.0, in_place: bool = False) -> torch.Tensor:
    return get_op("mla_decode_prep", q)(q, kv_a, cos, sin, norm_weight, eps, kv_cache, write_pages, write_slots,
                                        nope_dim, interleave, kv_scale, in_place)


def mla_decode_prep_q_latent(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor, write_pages: torch.Tensor,
                             write_slots: torch.Tensor, nope_dim: int, interleave: bool, kv_scale: float,
                             w_uk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return get_op("mla_decode_prep_q_latent", q)(q, kv_a, cos, sin, norm_weight, eps, kv_cache, write_pages,
                                                 write_slots, nope_dim, interleave, kv_scale, w_uk)


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 ``hidden @ weight.T`` (no TF32): hidden ``[T, D]``, the router's float32 weight ``[E, D]``."""
    return get_op("router_logits", hidden)(hidden, weight)


def router_topk(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scoring: str, method: str,
                n_group: int, topk_group: int, normalize: bool,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return get_op("router_topk", logits)(logits, bias, top_k, scoring, method, n_group, topk_group, normalize,
                                         scaling)


def router_logits_topk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                       scoring: str, method: str, n_group: int, topk_group: int, normalize: bool,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return get_op("router_logits_topk", hidden)(hidden, weight, bias, top_k, scoring, method, n_group, topk_group,
                                                normalize, scaling)


def moe_scatter_rows(hidden: torch.Tensor, topk_ids: torch.Tensor,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_op("moe_scatter_rows", hidden)(hidden, topk_ids, num_experts)


def moe_scatter_rows_active(
        hidden: torch.Tensor, topk_ids: torch.Tensor,
        num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_scatter_rows`'s (rows, counts, dest) plus ``active_experts(counts)``, in one launch on the GPU (the
    active list for the masked GEMMs' grid costs no launch of its own)."""
    return get_op("moe_scatter_rows_active", hidden)(hidden, topk_ids, num_experts)


def moe_scatter_rows_active_f16(
        hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
        group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, F16Rows]:
    """`moe_scatter_rows_active` plus the rows and ``hidden`` in f16 groups (``kernels.f16_groups``), in the
    same one launch on the GPU."""
    return get_op("moe_scatter_rows_active_f16", hidden)(hidden, topk_ids, num_experts, group)


def active_experts(counts: torch.Tensor) -> torch.Tensor:
    return get_op("active_experts", counts)(counts)


def moe_combine(y: torch.Tensor, dest: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
    return get_op("moe_combine", y)(y, dest, topk_ids, topk_weights, add)


def moe_combine_add_rms_norm(y: torch.Tensor, dest: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                             add: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return get_op("moe_combine_add_rms_norm", y)(y, dest, topk_ids, topk_weights, add, residual, norm_weight, eps)


def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return get_op("gated_mlp", x)(x, gate_up, down)
