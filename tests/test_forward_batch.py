"""ForwardBatch's DECODE layout (built flat, two device tensors) equals the general layout of the same batch."""

from __future__ import annotations

import random

import pytest
import torch

from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import KVPool

FIELDS = ("input_ids", "positions", "extend_lens", "prefix_lens", "seq_lens", "page_table", "cu_seqlens_q",
          "cu_seqlens_k", "write_pages", "write_slots", "cu_seqlens_q_host", "cu_seqlens_k_host")


@pytest.mark.parametrize("seed", range(5))
def test_a_decode_batch_lays_out_like_the_same_one_token_extend_batch(seed: int) -> None:
    rng = random.Random(seed)
    pool = KVPool(64, 2, 16, 8, torch.float32, "cpu")
    batch_size = rng.randint(1, 9)
    prefix_lens = [rng.randint(0, 200) for _ in range(batch_size)]
    # Tables as the scheduler grows them: every page the sequence needs, and sometimes one spare.
    tables = [rng.sample(range(64), (p + 1 + 15) // 16 + rng.randint(0, 1)) for p in prefix_lens]
    tokens = [[rng.randrange(100)] for _ in range(batch_size)]
    decode = ForwardBatch.build(ForwardMode.DECODE, tokens, prefix_lens, tables, pool, vocab_size=100)
    extend = ForwardBatch.build(ForwardMode.EXTEND, tokens, prefix_lens, tables, pool, vocab_size=100)
    assert decode.mode is ForwardMode.DECODE and decode.read_pages is None and decode.read_slots is None
    assert decode.batch_size == batch_size
    for name in FIELDS:
        got, want = getattr(decode, name), getattr(extend, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


def test_a_decode_batch_is_checked_like_any_other() -> None:
    pool = KVPool(8, 2, 16, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ForwardBatch.build(ForwardMode.DECODE, [[5]], [3], [[0]], pool, vocab_size=5)
    with pytest.raises(ValueError, match="only 1 pages"):
        ForwardBatch.build(ForwardMode.DECODE, [[1]], [16], [[0]], pool)
    with pytest.raises(ValueError, match="exactly one new token"):
        ForwardBatch.build(ForwardMode.DECODE, [[1, 2]], [3], [[0]], pool)
