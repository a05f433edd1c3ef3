"""MLA prefill attention on the GPU through PyTorch's fused SDPA kernels (flash / memory-efficient / cuDNN).

Same contract as `kernels.mla.mla_prefill_attention`: K and V are already decompressed per head
(q/k `[T, H, 192]`, v `[T, H, 128]` for DeepSeek), sequences are packed along the token axis and
described by int32 `cu_seqlens`. The reference materialises the `[H, lq, lk]` score matrix; the fused
kernels never do, so memory stays linear in the sequence length.

Causality is bottom-right aligned (query i of a sequence with lengths (lq, lk) sees keys
j <= i + lk - lq): `is_causal=True` when lq == lk (the two alignments agree), else
`causal_lower_right(lq, lk)`, which SDPA also routes to its fused kernels.

Because Dqk != Dv, PyTorch's flash kernel (equal head dims only) is skipped and the memory-efficient or
cuDNN kernel runs. `pad_v=True` pads V to Dqk so flash can run; the bench measures both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def _bounds(cu_seqlens: torch.Tensor, name: str) -> list[int]:
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be int32 [B+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()  # one host sync per batch: prefill is never graph-captured
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
        raise ValueError(f"{name} must start at 0 and never decrease, got {bounds}")
    return bounds


def mla_prefill_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    pad_v: bool = False,
) -> torch.Tensor:
    """Packed variable-length causal attention; returns `[Tq, H, Dv]` in q's dtype."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [tokens, heads, dim]")
    if k.shape[:2] != v.shape[:2] or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    bounds_q = _bounds(cu_seqlens_q, "cu_seqlens_q")
    bounds_k = _bounds(cu_seqlens_k, "cu_seqlens_k")
    if len(bounds_q) != len(bounds_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_k describe different batch sizes")
    if bounds_q[-1] != q.shape[0] or bounds_k[-1] != k.shape[0]:
        raise ValueError(f"cu_seqlens end at {bounds_q[-1]}/{bounds_k[-1]}, tensors hold {q.shape[0]}/{k.shape[0]}")
    dv = v.shape[2]
    if pad_v and dv < q.shape[2]:
        v = F.pad(v, (0, q.shape[2] - dv))
    out = q.new_empty(q.shape[0], q.shape[1], dv)
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk < lq:
            raise ValueError(f"sequence {b} has fewer keys ({lk}) than queries ({lq})")
        qs = q[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, H, lq, D]: strided views, no copies
        ks = k[k0:k1].transpose(0, 1).unsqueeze(0)
        vs = v[k0:k1].transpose(0, 1).unsqueeze(0)
        if lq == lk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(lq, lk), scale=scale)
        out[q0:q1] = o[0, :, :, :dv].transpose(0, 1)
    return out
