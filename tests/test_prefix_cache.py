"""The prefix cache's bookkeeping on its own: matching, sharing, refcounts, LRU eviction, idle counts."""

from __future__ import annotations

import random

import pytest
import torch

from engine.kv_pool import KVPool, PoolExhaustedError

PS = 4  # tokens per page


def _pool(num_pages: int) -> KVPool:
    return KVPool(num_pages, num_layers=1, page_size=PS, kv_dim=2, dtype=torch.float32, device="cpu",
                  prefix_cache=True)


def _idle(pool: KVPool) -> bool:
    cache = pool.prefix_cache
    assert cache is not None
    return pool.available_pages == pool.num_pages and cache.evictable_pages == cache.cached_pages


def _run(pool: KVPool, tokens: list[int]) -> tuple[list[int], list]:
    """A request's life without a model: take pages for `tokens`, publish them as computed, keep them."""
    pages, held = pool.alloc_for_prompt(tokens, pool.pages_for_tokens(len(tokens)))
    return pages, pool.publish(tokens, pages, held)


def test_lookup_matches_the_longest_full_page_prefix_and_never_a_partial_page() -> None:
    pool = _pool(16)
    tokens = list(range(10))  # 2 full pages + 2 tokens
    pages, held = _run(pool, tokens)
    assert [b.page for b in held] == pages[:2]  # the partial third page is private
    pool.release(pages, held)
    cache = pool.prefix_cache
    assert cache is not None
    assert [b.page for b in cache.match(list(range(12)))] == pages[:2]
    assert [b.page for b in cache.match(list(range(7)) + [99])] == pages[:1]  # page-unaligned prefix
    assert cache.match([0, 1, 2, 99]) == []
    # The same page contents after a different prefix is a different prefix.
    assert cache.match([9, 9, 9, 9, 4, 5, 6, 7]) == []
    assert _idle(pool)


def test_admission_reuses_cached_pages_but_always_computes_the_last_prompt_token() -> None:
    pool = _pool(16)
    first, held = _run(pool, list(range(8)))
    pool.release(first, held)
    # The same 8-token prompt again: its last token must be computed, so only page 0 is a hit.
    pages, held = pool.alloc_for_prompt(list(range(8)), 2)
    assert pages[0] == first[0] and pages[1] != first[1] and len(held) == 1
    cache = pool.prefix_cache
    assert cache is not None
    assert (cache.lookup_tokens, cache.hit_tokens) == (8 + 8, 4)  # the first run looked 8 up too
    pool.release(pages, held)
    # One token longer: both pages hit.
    pages, held = pool.alloc_for_prompt(list(range(9)), 3)
    assert pages[:2] == first and len(held) == 2
    assert (cache.lookup_tokens, cache.hit_tokens) == (16 + 9, 4 + 8)
    pool.release(pages, held)
    assert _idle(pool)


def test_held_pages_are_never_evicted_and_eviction_takes_the_least_recently_used_leaf() -> None:
    pool = _pool(6)
    cache = pool.prefix_cache
    assert cache is not None
    a_pages, a_held = _run(pool, [1] * 8)  # pages A0, A1 (A1 is A0's child)
    b_pages, b_held = _run(pool, [2] * 4)
    pool.release(a_pages, a_held)
    pool.release(b_pages, b_held)  # B used last
    c_pages, c_held = _run(pool, [3] * 8)  # held: not evictable
    assert (pool.free_pages, pool.evictable_pages, pool.available_pages) == (1, 3, 4)
    # 2 pages needed, 1 free: the LRU leaf goes first, A1 (A0 is not a leaf while A1 is cached).
    got = pool.alloc(2)
    assert a_pages[1] in got and cache.match([1] * 8)[0].page == a_pages[0] and len(cache.match([1] * 8)) == 1
    # 3 more: A0 (a leaf now, older than B) then B; C's held pages stay.
    got += pool.alloc(2)
    assert set(got) == {a_pages[1], a_pages[0], b_pages[0], *(set(range(6)) - set(a_pages + b_pages + c_pages))}
    assert cache.match([1] * 8) == [] and cache.match([2] * 4) == []
    with pytest.raises(PoolExhaustedError):
        pool.alloc(1)  # only held pages are left: refused, nothing changed
    assert [b.page for b in cache.match([3] * 8)] == c_pages and cache.evicted_pages == 3
    pool.free(got)
    pool.release(c_pages, c_held)
    assert _idle(pool)


def test_a_refused_allocation_evicts_nothing() -> None:
    pool = _pool(4)
    pages, held = _run(pool, [5] * 8)
    pool.release(pages, held)
    with pytest.raises(PoolExhaustedError):
        pool.alloc(5)
    with pytest.raises(PoolExhaustedError):
        pool.alloc_for_prompt([7] * 20, 5)
    cache = pool.prefix_cache
    assert cache is not None and cache.cached_pages == 2 and cache.lookup_tokens == 8  # refusals count no lookup
    assert _idle(pool)


def test_a_prefix_computed_twice_concurrently_is_cached_once_and_the_copy_freed_at_the_end() -> None:
    pool = _pool(8)
    cache = pool.prefix_cache
    assert cache is not None
    tokens = list(range(8))
    p1, h1 = pool.alloc_for_prompt(tokens, 2)  # both admitted before either published: no hit
    p2, h2 = pool.alloc_for_prompt(tokens, 2)
    assert h1 == h2 == [] and set(p1).isdisjoint(p2)
    h1 = pool.publish(tokens, p1, h1)
    h2 = pool.publish(tokens, p2, h2)
    assert [b.page for b in h2] == p1 and cache.cached_pages == 2  # p2 holds the cached copy, keeps its own
    assert all(b.refcount == 2 for b in h1)
    pool.release(p2, h2)  # p2's own pages go back to the free list now
    assert pool.free_pages == 8 - 2 - 2 + 2
    pool.release(p1, h1)
    assert _idle(pool) and cache.cached_pages == 2


def test_an_extended_chain_shares_its_parent_pages_and_clear_empties_an_idle_cache() -> None:
    pool = _pool(8)
    cache = pool.prefix_cache
    assert cache is not None
    p1, h1 = _run(pool, list(range(8)))
    p2, h2 = _run(pool, list(range(16)))  # the first 8 tokens hit p1's pages, the next 8 are new blocks
    assert p2[:2] == p1 and [b.page for b in h2] == p2 and h2[0].refcount == 2
    pool.release(p1, h1)
    assert cache.evictable_pages == 0  # p2 still holds the shared pages
    pool.release(p2, h2)
    assert cache.evictable_pages == 4 and _idle(pool)
    assert cache.clear() == 4 and pool.free_pages == 8 and cache.cached_pages == 0


def test_release_refuses_a_block_released_twice() -> None:
    pool = _pool(4)
    pages, held = _run(pool, [1] * 4)
    pool.release(pages, held)
    with pytest.raises(ValueError, match="released more often"):
        pool.release([], held)


def _kv_of(tokens: list[int], position: int) -> float:
    """What a model would store at `position` after `tokens[:position + 1]`: depends on the whole prefix."""
    return float(hash(tuple(tokens[: position + 1])) % 100_003)


def test_random_sharing_publishing_and_eviction_keep_every_hit_s_content_and_every_count_exact() -> None:
    """Many overlapping requests over a tiny vocabulary (so prefixes repeat) on a pool too small for them
    all: every page a hit hands out holds the KV of exactly that prefix, no page is ever in two hands, and
    the pool ends idle."""
    rng = random.Random(0)
    pool = _pool(24)
    cache = pool.prefix_cache
    assert cache is not None
    live: list[tuple[list[int], list[int], list]] = []
    hits = 0
    for _ in range(600):
        if live and (rng.random() < 0.45 or len(live) > 5):
            tokens, pages, held = live.pop(rng.randrange(len(live)))
            pool.release(pages, held)
            continue
        tokens = [rng.choice((1, 2)) for _ in range(rng.randrange(1, 30))]
        try:
            pages, held = pool.alloc_for_prompt(tokens, pool.pages_for_tokens(len(tokens)))
        except PoolExhaustedError:
            continue
        cached = len(held) * PS
        hits += cached
        for p in range(cached):  # a hit: the pages hold this very prefix's KV
            assert pool.tensor[pages[p // PS], 0, p % PS, 0].item() == _kv_of(tokens, p)
        for p in range(cached, len(tokens)):  # "prefill" the rest into the request's own pages
            pool.tensor[pages[p // PS], 0, p % PS, 0] = _kv_of(tokens, p)
        held = pool.publish(tokens, pages, held)
        live.append((tokens, pages, held))
        # No page is in two hands: requests' own pages, and each cached block once.
        owned = [pg for _, pages_, held_ in live for pg in pages_ if pg not in {b.page for b in held_}]
        assert len(owned) == len(set(owned)) and not set(owned) & {b.page for _, _, h in live for b in h}
        assert pool.free_pages + cache.cached_pages + len(owned) == pool.num_pages
        assert cache.evictable_pages == sum(1 for b in cache._blocks.values() if b.refcount == 0)
    for _, pages, held in live:
        pool.release(pages, held)
    assert hits > 0 and cache.evicted_pages > 0
    assert _idle(pool)
