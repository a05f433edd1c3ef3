"""MLA attention, torch reference implementations.

Signatures are a contract: fast backends (``kernels/triton_*.py``) implement the same functions and
``kernels.dispatch`` picks one per device. Inputs may be strided views (e.g. ``pool[:, layer]``).
"""

from __future__ import annotations

import torch


def _bounds(cu_seqlens: torch.Tensor, name: str) -> list[int]:
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be int32 [B+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()  # one host sync per batch: prefill is never graph-captured
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
        raise ValueError(f"{name} must start at 0 and never decrease, got {bounds}")
    return bounds


def prefill_segments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor
) -> list[tuple[int, int, int, int]]:
    """Validate a packed prefill's inputs; return (q0, q1, k0, k1) for every sequence with queries.

    Shared by every prefill backend so that all refuse the same inputs with the same messages.
    """
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
    segments = []
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 - q0 == 0:
            continue
        if k1 - k0 < q1 - q0:
            raise ValueError(f"sequence {b} has fewer keys ({k1 - k0}) than queries ({q1 - q0})")
        segments.append((q0, q1, k0, k1))
    return segments


def mla_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention over variable-length sequences packed along the token axis.

    q ``[Tq, H, Dqk]``, k ``[Tk, H, Dqk]``, v ``[Tk, H, Dv]``; ``cu_seqlens_*`` int32 ``[B+1]``.
    Bottom-right aligned: query i of a sequence with lengths (lq, lk) sees keys j <= i + lk - lq, so a
    sequence whose first lk - lq keys are a cached prefix attends to all of them.
    Returns ``[Tq, H, Dv]`` in q's dtype; softmax in float32.
    """
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    # One matmul per sequence: the loop is over sequences (few), never over tokens.
    for q0, q1, k0, k1 in prefill_segments(q, k, v, cu_seqlens_q, cu_seqlens_k):
        lq, lk = q1 - q0, k1 - k0
        qs = q[q0:q1].transpose(0, 1)  # [H, lq, D]
        ks = k[k0:k1].transpose(0, 1)
        vs = v[k0:k1].transpose(0, 1)
        scores = torch.matmul(qs, ks.transpose(1, 2)).float() * scale  # [H, lq, lk]
        rows = torch.arange(lq, device=q.device)[:, None]
        cols = torch.arange(lk, device=q.device)[None, :]
        scores.masked_fill_(cols > rows + (lk - lq), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out[q0:q1] = torch.matmul(probs, vs).transpose(0, 1)
    return out


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Absorbed MLA decode over a paged latent cache, one query token per sequence.

    q_latent ``[B, H, R]`` (q_nope already multiplied by W_UK), q_rope ``[B, H, P]``; kv_cache
    ``[num_pages, page_size, R + P]`` (the latent then k_pe; may be strided); page_table int32
    ``[B, max_pages]`` (entries past a sequence's pages are ignored); seq_lens int32 ``[B]`` including
    the current token. Returns the attention-weighted latent ``[B, H, R]`` (the caller applies W_UV).
    kv_cache may be stored in another dtype than q (an FP8 pool): cached value x means ``x * kv_scale``
    in q's dtype.
    """
    batch, _, rank = q_latent.shape
    page_size = kv_cache.shape[1]
    if kv_cache.shape[2] != rank + q_rope.shape[-1]:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[2]} != {rank} + {q_rope.shape[-1]}")
    max_pages = page_table.shape[1]
    # Gather every sequence's pages into [B, max_pages * page_size, R + P]; padding is masked below.
    pages = page_table.long().clamp(min=0)
    if kv_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # An FP8 cache: gather its bytes (uint8 indexing works on every device), then convert (FP8 has no
        # CPU arithmetic) and scale, in the Triton kernel's order.
        kv = kv_cache.view(torch.uint8)[pages].view(kv_cache.dtype).to(q_latent.dtype)
    else:
        kv = kv_cache[pages]
    kv = kv.reshape(batch, max_pages * page_size, -1)
    if kv.dtype != q_latent.dtype or kv_scale != 1.0:
        kv = kv.to(q_latent.dtype)
        kv = kv * kv_scale if kv_scale != 1.0 else kv
    latent, k_rope = kv[..., :rank], kv[..., rank:]
    scores = torch.matmul(q_latent, latent.transpose(1, 2)) + torch.matmul(q_rope, k_rope.transpose(1, 2))
    scores = scores.float() * scale  # [B, H, S]
    positions = torch.arange(max_pages * page_size, device=q_latent.device)
    scores.masked_fill_((positions[None, :] >= seq_lens.long()[:, None])[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(latent.dtype)
    return torch.matmul(probs, latent)


def check_head_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> None:
    """`head_matmul`'s input checks, shared by its backends."""
    if x.dim() != 3 or w.dim() != 3 or w.shape[0] != x.shape[1] or w.shape[1] != x.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} must be [B, H, K] and w {tuple(w.shape)} [H, K, N]")
    if x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"x and w differ: {x.dtype} on {x.device}, {w.dtype} on {w.device}")
    if x.shape[2] and x.stride(2) != 1:
        raise ValueError("x must have a unit last stride")
    expected = (x.shape[0], x.shape[1], w.shape[2])
    if out is not None and (tuple(out.shape) != expected or out.dtype != x.dtype or (expected[2] and out.stride(2) != 1)):
        raise ValueError(f"out must be {x.dtype} {expected} with a unit last stride, got {out.dtype} {tuple(out.shape)}")


def head_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head products of the absorbed MLA decode: ``out[b, h] = x[b, h] @ w[h]``; x ``[B, H, K]`` (unit last
    stride), w ``[H, K, N]`` (any strides, e.g. a transposed view of kv_b_proj's weight) -> ``[B, H, N]`` with a
    unit last stride, written into ``out`` when given (a ``[B, H, N]`` view of the o_proj input: no copy)."""
    check_head_matmul(x, w, out)
    if out is None:
        return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)
    torch.bmm(x.transpose(0, 1), w, out=out.transpose(0, 1))
    return out
