"""Prefix cache over the paged latent KV pool: full pages of prompt (and output) KV, shared by the requests
that start with the same tokens, and evicted least-recently-used when the pool runs short.

Structure: hash-chained blocks (vLLM's automatic prefix caching), one block per *full* page. A block's key
is ``(parent block id, the page's token ids)``, so a lookup walks a prompt page by page from the root and
a key names the whole prefix up to it exactly: ids are unique integers, not hashes, so two different
prefixes can never collide. A radix tree (SGLang) would also share partial pages; here the last, partial
page of a request is always private, which keeps the rule "a shared page is never written" trivial: a page
joins the cache only once every one of its tokens' KV is computed, and KV of a full page never changes.

Ownership: a request *holds* the blocks of its prefix (refcount + 1 each) from admission to its end, and
always a chain from the root (``acquire`` and ``insert`` take every block up to the deepest one), so a
block with refcount 0 has only refcount-0 descendants: every refcount-0 block is evictable (leaves first).
Hence ``evictable_pages`` is exact and the pool is idle when ``free + evictable == total``. Pages of a
request that are not the page of a block it holds are its own and are freed at its end.

Determinism: every decision (hits, inserts, which block to evict) depends only on the sequence of calls,
never on wall time (LRU uses a logical clock). Each rank of an attention group runs its own cache over its
own copy of the group's identical pool, driven by the same scheduler calls in the same order (the ranks
run in lockstep), so all ranks of a group take the same decisions and hold the same page indices.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class Block:
    """One cached full page: ``page`` holds the KV of ``tokens`` right after the prefix ``parent`` names."""

    block_id: int
    page: int
    parent: Block | None
    tokens: tuple[int, ...]
    refcount: int = 0
    children: int = 0
    last_used: int = 0  # logical clock of the last acquire or release: LRU order

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        return (self.parent.block_id if self.parent is not None else 0, self.tokens)


class PrefixCache:
    """Refcounted, LRU-evicted full-page blocks over one pool's page allocator.

    Args:
        page_size: tokens per page.
        free_pages: hands evicted pages back to the pool's allocator (``PageAllocator.free``).
    """

    ROOT_ID = 0

    def __init__(self, page_size: int, free_pages: Callable[[list[int]], None]) -> None:
        self.page_size = page_size
        self._free_pages = free_pages
        self._blocks: dict[tuple[int, tuple[int, ...]], Block] = {}
        self._ids = itertools.count(self.ROOT_ID + 1)
        self._clock = itertools.count(1)
        self._evict_heap: list[tuple[int, int, Block]] = []  # (last_used, block_id, block), lazily pruned
        self.evictable_pages = 0  # blocks with refcount 0
        # Counters for /metrics and /server_info: prompt tokens looked up at admission and how many hit.
        self.lookup_tokens = 0
        self.hit_tokens = 0
        self.evicted_pages = 0

    @property
    def cached_pages(self) -> int:
        return len(self._blocks)

    # ---- lookups ---------------------------------------------------------------------------------
    def match(self, tokens: list[int]) -> list[Block]:
        """The chain of cached blocks covering the longest full-page prefix of ``tokens`` (not held)."""
        chain: list[Block] = []
        parent_id = self.ROOT_ID
        ps = self.page_size
        for start in range(0, len(tokens) - ps + 1, ps):
            block = self._blocks.get((parent_id, tuple(tokens[start : start + ps])))
            if block is None:
                break
            chain.append(block)
            parent_id = block.block_id
        return chain

    def acquire(self, tokens: list[int]) -> list[Block]:
        """Hold the cached chain of ``tokens``' full pages (so it cannot be evicted) and return it."""
        chain = self.match(tokens)
        self._hold(chain)
        return chain

    def record_lookup(self, looked_up: int, hit: int) -> None:
        """Count one admitted request: ``looked_up`` prompt tokens, ``hit`` of them served from the cache."""
        self.lookup_tokens += looked_up
        self.hit_tokens += hit

    # ---- inserting and releasing -----------------------------------------------------------------
    def insert(self, tokens: list[int], pages: list[int], held: list[Block]) -> list[Block]:
        """Publish the full pages of ``tokens`` (whose KV is complete in ``pages``) and return the chain the
        caller now holds (``held`` extended; ``held`` must be a prefix of that chain, as ``acquire`` or an
        earlier ``insert`` returned it).

        A page whose prefix is already cached under another page (two requests computed the same prefix
        concurrently) is not published: the caller holds the cached block instead and keeps its own page
        private until its end (it may still be read, e.g. by a KV transfer), then frees it.
        """
        ps = self.page_size
        full = min(len(tokens) // ps, len(pages))
        chain = list(held)
        parent = chain[-1] if chain else None
        for i in range(len(chain), full):
            key = (parent.block_id if parent is not None else self.ROOT_ID, tuple(tokens[i * ps : (i + 1) * ps]))
            block = self._blocks.get(key)
            if block is None:
                block = Block(next(self._ids), pages[i], parent, key[1])
                self._blocks[key] = block
                if parent is not None:
                    parent.children += 1
                block.refcount = 1
                block.last_used = next(self._clock)
            else:
                self._hold([block])
            chain.append(block)
            parent = block
        return chain

    def release(self, pages: list[int], held: list[Block]) -> list[int]:
        """Drop a request's hold on ``held`` and return its private pages (every page of ``pages`` that is
        not a held block's): the caller frees those."""
        shared = {block.page for block in held}
        tick = next(self._clock)
        for block in held:
            if block.refcount < 1:
                raise ValueError(f"block of page {block.page} released more often than held")
            block.refcount -= 1
            block.last_used = tick
            if block.refcount == 0:
                self.evictable_pages += 1
                if block.children == 0:
                    heapq.heappush(self._evict_heap, (tick, block.block_id, block))
        return [page for page in pages if page not in shared]

    # ---- eviction --------------------------------------------------------------------------------
    def evict(self, n: int) -> int:
        """Free up to ``n`` unreferenced pages, least recently used leaves first; returns how many."""
        freed: list[int] = []
        while len(freed) < n and self._evict_heap:
            last_used, _, block = heapq.heappop(self._evict_heap)
            if (self._blocks.get(block.key) is not block or block.refcount or block.children
                    or block.last_used != last_used):
                continue  # stale entry: held again, used since, or has children again
            del self._blocks[block.key]
            self.evictable_pages -= 1
            freed.append(block.page)
            parent = block.parent
            if parent is not None:
                parent.children -= 1
                if parent.children == 0 and parent.refcount == 0:
                    heapq.heappush(self._evict_heap, (parent.last_used, parent.block_id, parent))
        if freed:
            self.evicted_pages += len(freed)
            self._free_pages(freed)
        return len(freed)

    def clear(self) -> int:
        """Evict every unreferenced block (e.g. to compare against an empty cache); returns pages freed."""
        return self.evict(self.evictable_pages)

    def _hold(self, chain: list[Block]) -> None:
        tick = next(self._clock)
        for block in chain:
            if block.refcount == 0:
                self.evictable_pages -= 1
            block.refcount += 1
            block.last_used = tick

    def counters(self) -> dict[str, int]:
        return {
            "prefix_cache_lookup_tokens": self.lookup_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_cached_pages": self.cached_pages,
            "prefix_cache_evictable_pages": self.evictable_pages,
            "prefix_cache_evicted_pages": self.evicted_pages,
        }
