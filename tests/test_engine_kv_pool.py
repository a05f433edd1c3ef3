"""Page allocator and KV pool: contiguity, counts, refusals."""

from __future__ import annotations

import pytest
import torch

from engine.kv_pool import KVPool, PageAllocator, PoolExhaustedError


def test_allocation_prefers_one_contiguous_run_and_free_count_returns_to_start() -> None:
    alloc = PageAllocator(32)
    a, b, c = alloc.alloc(5), alloc.alloc(3), alloc.alloc(8)
    assert a == list(range(0, 5)) and b == list(range(5, 8)) and c == list(range(8, 16))
    alloc.free(b)
    # A 3-page hole and a 16-page tail: a request of 3 takes the hole, keeping the tail whole.
    assert alloc.alloc(3) == [5, 6, 7]
    assert alloc.alloc(16) == list(range(16, 32))
    assert alloc.free_pages == 0
    alloc.free(list(range(5, 8)) + list(range(16, 32)))
    alloc.free(a)
    alloc.free(c)
    assert alloc.free_pages == 32
    assert alloc.alloc(32) == list(range(32))  # freed neighbours merged back into one run


def test_allocation_spans_runs_largest_first_when_no_run_fits() -> None:
    alloc = PageAllocator(10)
    pages = alloc.alloc(10)
    alloc.free([0, 1, 4, 5, 6, 9])
    assert alloc.alloc(5) == [4, 5, 6, 0, 1]
    alloc.free([p for p in pages if p not in (9,)])
    assert alloc.free_pages == 10


def test_double_free_and_foreign_pages_are_refused_without_changing_the_pool() -> None:
    alloc = PageAllocator(8)
    pages = alloc.alloc(4)
    alloc.free(pages[:2])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages[1:])  # page 1 again, together with valid pages 2 and 3
    assert alloc.free_pages == 6  # nothing of the refused call was applied
    with pytest.raises(ValueError, match="outside the pool"):
        alloc.free([8])
    with pytest.raises(ValueError, match="double free"):
        alloc.free([2, 2])
    alloc.free(pages[2:])
    assert alloc.free_pages == 8


def test_exhausted_pool_raises_and_keeps_its_pages() -> None:
    alloc = PageAllocator(4)
    alloc.alloc(3)
    with pytest.raises(PoolExhaustedError, match="need 2 pages, 1 free"):
        alloc.alloc(2)
    assert alloc.free_pages == 1


def test_pool_tensor_is_cross_layer_and_layer_views_alias_it() -> None:
    pool = KVPool(num_pages=6, num_layers=3, page_size=4, kv_dim=10, dtype=torch.float32, device="cpu")
    assert pool.tensor.shape == (6, 3, 4, 10)
    assert pool.tensor[2].is_contiguous()  # one page = one contiguous block of every layer
    pool.layer(1)[2, 3] = 7.0
    assert pool.tensor[2, 1, 3].eq(7.0).all()
    assert pool.layout.bytes_per_page == 3 * 4 * 10 * 4
    assert pool.pages_for_tokens(9) == 3
    pool.close()
