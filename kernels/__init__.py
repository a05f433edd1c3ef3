"""Low-level ops behind stable signatures (torch only).

Call the ops through this module: on CUDA it uses a fast backend (``kernels.triton_mla``,
``kernels.triton_moe``) when one is installed and defines the op, else the torch reference in
``kernels.mla`` / ``kernels.moe``. ``TANDEM_KERNELS=ref`` forces the references everywhere.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from kernels import mla, moe

_FAST_MODULES = {
    "mla_prefill_attention": "kernels.triton_mla",
    "mla_decode_attention": "kernels.triton_mla",
    "moe_forward": "kernels.triton_moe",
    "moe_forward_masked": "kernels.triton_moe",
}
_REFERENCES: dict[str, Callable[..., Any]] = {
    "mla_prefill_attention": mla.mla_prefill_attention,
    "mla_decode_attention": mla.mla_decode_attention,
    "moe_forward": moe.moe_forward,
    "moe_forward_masked": moe.moe_forward_masked,
}


@cache
def get_op(name: str, device_type: str) -> Callable[..., Any]:
    """The implementation of op ``name`` for tensors on ``device_type`` ("cpu", "cuda")."""
    if device_type == "cuda" and os.environ.get("TANDEM_KERNELS", "auto") != "ref":
        try:
            module = importlib.import_module(_FAST_MODULES[name])
        except ImportError:
            module = None
        fast = getattr(module, name, None) if module is not None else None
        if fast is not None:
            return fast
    return _REFERENCES[name]


def mla_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
    return get_op("mla_prefill_attention", q.device.type)(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)


def mla_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                         page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return get_op("mla_decode_attention", q_latent.device.type)(q_latent, q_rope, kv_cache, page_table,
                                                                seq_lens, scale)


def moe_forward(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    return get_op("moe_forward", hidden.device.type)(hidden, topk_ids, topk_weights, w13, w2)


def moe_forward_masked(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return get_op("moe_forward_masked", x.device.type)(x, counts, w13, w2)
