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

from kernels.mla import prefill_segments


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
    segments = prefill_segments(q, k, v, cu_seqlens_q, cu_seqlens_k)
    dv = v.shape[2]
    if pad_v and dv < q.shape[2]:
        v = F.pad(v, (0, q.shape[2] - dv))
    out = q.new_empty(q.shape[0], q.shape[1], dv)
    for q0, q1, k0, k1 in segments:
        lq, lk = q1 - q0, k1 - k0
        qs = q[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, H, lq, D]: strided views, no copies
        ks = k[k0:k1].transpose(0, 1).unsqueeze(0)
        vs = v[k0:k1].transpose(0, 1).unsqueeze(0)
        if lq == lk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(lq, lk), scale=scale)
        out[q0:q1] = o[0, :, :, :dv].transpose(0, 1)
    return out
