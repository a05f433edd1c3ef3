"""Reference kernels agree with direct per-token computations (the definitions, written naively)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.mla import mla_decode_attention, mla_prefill_attention
from kernels.moe import moe_forward, moe_forward_masked


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: int, scale: float) -> torch.Tensor:
    """One query ``[H, D]`` over the first ``visible`` keys."""
    scores = torch.einsum("hd,thd->ht", q, k[:visible]) * scale
    return torch.einsum("ht,thd->hd", scores.softmax(-1), v[:visible])


def test_prefill_attention_is_causal_and_bottom_right_aligned_per_sequence() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, dqk, dv = 3, 12, 8
    lens_q, lens_k = [4, 1, 7], [9, 1, 7]  # a cached prefix of 5, a single token, no prefix
    q = torch.randn(sum(lens_q), heads, dqk, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens_k), heads, dqk, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), heads, dv, generator=gen, dtype=torch.float64)
    cu_q = torch.tensor([0, 4, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 10, 17], dtype=torch.int32)
    out = mla_prefill_attention(q, k, v, cu_q, cu_k, 0.3)
    assert out.shape == (12, heads, dv)
    for b in range(3):
        lq, lk = lens_q[b], lens_k[b]
        for i in range(lq):
            expected = _naive_attention(q[cu_q[b] + i], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]],
                                        visible=i + lk - lq + 1, scale=0.3)
            torch.testing.assert_close(out[cu_q[b] + i], expected)


def test_prefill_attention_refuses_more_queries_than_keys() -> None:
    q = torch.zeros(3, 1, 4)
    with pytest.raises(ValueError, match="fewer keys"):
        mla_prefill_attention(q, q[:2], q[:2], torch.tensor([0, 3], dtype=torch.int32),
                              torch.tensor([0, 2], dtype=torch.int32), 1.0)


def test_paged_decode_equals_attention_over_the_gathered_latent_on_a_strided_layer_view() -> None:
    gen = torch.Generator().manual_seed(1)
    heads, rank, rope, page_size, layers = 4, 16, 6, 4, 3
    pool = torch.randn(12, layers, page_size, rank + rope, generator=gen, dtype=torch.float64)
    kv_cache = pool[:, 1]  # strided view of layer 1, as the engine passes it
    page_tables = [[7, 2, 9], [0], [11, 3, 5]]
    seq_lens = [10, 3, 12]
    table = torch.full((3, 3), -1, dtype=torch.int32)
    for i, t in enumerate(page_tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    q_latent = torch.randn(3, heads, rank, generator=gen, dtype=torch.float64)
    q_rope = torch.randn(3, heads, rope, generator=gen, dtype=torch.float64)
    out = mla_decode_attention(q_latent, q_rope, kv_cache, table, torch.tensor(seq_lens, dtype=torch.int32), 0.2)
    for b in range(3):
        tokens = torch.cat([kv_cache[p] for p in page_tables[b]])[: seq_lens[b]]  # [S, rank + rope]
        latent, k_rope = tokens[:, :rank], tokens[:, rank:]
        scores = (q_latent[b] @ latent.T + q_rope[b] @ k_rope.T) * 0.2
        torch.testing.assert_close(out[b], scores.softmax(-1) @ latent)


def _naive_moe(hidden, topk_ids, topk_weights, w13, w2):
    out = torch.zeros_like(hidden)
    inter = w13.shape[1] // 2
    for t in range(hidden.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e < 0:
                continue
            h = F.silu(w13[e, :inter] @ hidden[t]) * (w13[e, inter:] @ hidden[t])
            out[t] += topk_weights[t, j] * (w2[e] @ h)
    return out


def test_moe_forward_sums_weighted_expert_outputs_and_skips_experts_off_this_rank() -> None:
    gen = torch.Generator().manual_seed(2)
    tokens, dim, inter, experts, top_k = 9, 8, 6, 4, 3
    hidden = torch.randn(tokens, dim, generator=gen, dtype=torch.float64)
    w13 = torch.randn(experts, 2 * inter, dim, generator=gen, dtype=torch.float64)
    w2 = torch.randn(experts, dim, inter, generator=gen, dtype=torch.float64)
    topk_ids = torch.randint(-1, experts, (tokens, top_k), generator=gen)
    topk_ids[0] = -1  # a token with no local expert gets exactly zero
    topk_weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64)
    out = moe_forward(hidden, topk_ids, topk_weights, w13, w2)
    torch.testing.assert_close(out, _naive_moe(hidden, topk_ids, topk_weights, w13, w2))
    assert torch.count_nonzero(out[0]) == 0


def test_moe_forward_refuses_an_expert_index_beyond_the_local_experts() -> None:
    w13, w2 = torch.zeros(2, 4, 3), torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="expert 2"):
        moe_forward(torch.zeros(1, 3), torch.tensor([[2]]), torch.ones(1, 1), w13, w2)


def test_masked_moe_matches_the_contiguous_layout_and_zeroes_rows_past_the_count() -> None:
    gen = torch.Generator().manual_seed(3)
    experts, capacity, dim, inter = 3, 5, 8, 4
    x = torch.randn(experts, capacity, dim, generator=gen, dtype=torch.float64)
    w13 = torch.randn(experts, 2 * inter, dim, generator=gen, dtype=torch.float64)
    w2 = torch.randn(experts, dim, inter, generator=gen, dtype=torch.float64)
    counts = torch.tensor([5, 0, 2])
    out = moe_forward_masked(x, counts, w13, w2)
    for e, n in enumerate(counts.tolist()):
        if n:
            ids = torch.full((n, 1), e)
            torch.testing.assert_close(out[e, :n], moe_forward(x[e, :n], ids, torch.ones(n, 1, dtype=x.dtype), w13, w2))
        assert torch.count_nonzero(out[e, n:]) == 0
    with pytest.raises(ValueError, match="capacity"):
        moe_forward_masked(x, torch.tensor([6, 0, 0]), w13, w2)
