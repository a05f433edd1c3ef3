"""The chunk plan shared by the colocated scheduler and the prefill batcher."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from engine.forward_batch import ForwardMode
from engine.kv_pool import KVPool
from engine.prefill_chunks import build_extend_batch, plan_prefill_chunks


@dataclass(eq=False)
class Item:
    prompt_ids: list[int]
    num_computed: int = 0
    pages: list[int] = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids


def test_budget_goes_to_the_oldest_items_and_cuts_the_last_one_taken() -> None:
    items = [Item(list(range(5)), num_computed=2), Item(list(range(10))), Item(list(range(4)))]
    plan = plan_prefill_chunks(items, 9)
    assert [(items.index(item), n) for item, n in plan] == [(0, 3), (1, 6)]  # the third waits: no budget left
    assert plan_prefill_chunks(items, 100) == [(items[0], 3), (items[1], 10), (items[2], 4)]
    assert plan_prefill_chunks([], 8) == []


def test_extend_batch_computes_each_chunk_after_the_tokens_already_in_its_pages() -> None:
    pool = KVPool(num_pages=8, num_layers=1, page_size=4, kv_dim=8, dtype=torch.float32, device="cpu")
    first, second = Item([1, 2, 3, 4, 5, 6], num_computed=4, pages=[0, 1]), Item([7, 8, 9], pages=[2])
    batch = build_extend_batch(plan_prefill_chunks([first, second], 4), pool, vocab_size=10)
    assert batch.mode is ForwardMode.EXTEND
    assert batch.positions.tolist() == [4, 5, 0, 1]  # first: its last 2 tokens; second: 2 of its 3
    assert batch.input_ids.tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_extend_batch([(Item([12], pages=[3]), 1)], pool, vocab_size=10)
