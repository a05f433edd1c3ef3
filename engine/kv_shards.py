"""The KV pool of an MLA-core data-parallel instance (``--attention-dp mla-core``): each rank holds the latent
KV of its own requests only.

Every rank runs every request (the projections stay TP-sharded over the whole batch), so every rank's
scheduler must take the same decisions: each rank keeps the allocator of the *whole instance* — one shard
of ``pages_per_shard`` pages per rank, page ``g`` of the instance being page ``g % pages_per_shard`` of rank
``g // pages_per_shard`` — but the tensor of its own shard only. A request's pages all come from one shard,
its *owner*: the shard with the most free pages when it is admitted (least loaded), or the shard of the
cached prefix it reuses; later pages (``alloc(n, after=pages)``) come from the same shard.

The local tensor has one page more than the shard: the *scratch* page, where a forward writes the latents
of the tokens other ranks own (a write with a fixed shape stays capturable in a CUDA graph; nothing reads it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kv_pool import KVPool, KVPoolLayout, PageAllocator, PoolExhaustedError
from engine.prefix_cache import Block, PrefixCache


class ShardedPageAllocator:
    """Page indices of the whole instance, handed out one shard at a time (a ``PageAllocator`` per shard)."""

    def __init__(self, pages_per_shard: int, num_shards: int) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.pages_per_shard, self.num_shards = pages_per_shard, num_shards
        self.shards = [PageAllocator(pages_per_shard) for _ in range(num_shards)]

    @property
    def num_pages(self) -> int:
        return self.pages_per_shard * self.num_shards

    @property
    def free_pages(self) -> int:
        return sum(s.free_pages for s in self.shards)

    def shard_of(self, page: int) -> int:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} is outside the pool [0, {self.num_pages})")
        return page // self.pages_per_shard

    def least_loaded(self) -> int:
        """The shard with the most free pages (the lowest rank among equals)."""
        return max(range(self.num_shards), key=lambda s: (self.shards[s].free_pages, -s))

    def alloc_on(self, shard: int, n: int) -> list[int]:
        base = shard * self.pages_per_shard
        return [base + p for p in self.shards[shard].alloc(n)]

    def alloc(self, n: int) -> list[int]:
        return self.alloc_on(self.least_loaded(), n)

    def free(self, pages: list[int]) -> None:
        by_shard: dict[int, list[int]] = {}
        for page in pages:
            by_shard.setdefault(self.shard_of(page), []).append(page % self.pages_per_shard)
        for shard, local in by_shard.items():
            self.shards[shard].free(local)


class ShardedKVPool(KVPool):
    """A ``KVPool`` over the instance's page space whose tensor holds shard ``shard_rank`` only.

    Page indices everywhere above the model (scheduler, requests, page tables) are the instance's; the model
    maps them to local pages (``local_pages``) and writes tokens of other shards to ``scratch_page``.
    ``num_pages`` counts the instance's pages; one request fits in one shard (``max_request_pages``).
    """

    def __init__(
        self,
        pages_per_shard: int,
        num_shards: int,
        shard_rank: int,
        num_layers: int,
        page_size: int,
        kv_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scales: list[float] | None = None,
        prefix_cache: bool = False,
    ) -> None:
        if not 0 <= shard_rank < num_shards:
            raise ValueError(f"shard_rank {shard_rank} is outside [0, {num_shards})")
        # The base builds a tensor of the shard plus the scratch page, then its allocator is replaced.
        super().__init__(
            pages_per_shard + 1, num_layers, page_size, kv_dim, dtype, device, scales, prefix_cache
        )
        self.pages_per_shard, self.num_shards, self.shard_rank = pages_per_shard, num_shards, shard_rank
        self.scratch_page = pages_per_shard
        # What a transfer engine registers and moves: the shard's pages (the scratch page is never sent).
        self.layout = KVPoolLayout(pages_per_shard, num_layers, page_size, kv_dim, dtype)
        self.allocator = ShardedPageAllocator(pages_per_shard, num_shards)  # type: ignore[assignment]
        self.prefix_cache = PrefixCache(page_size, self.allocator.free) if prefix_cache else None

    @property
    def max_request_pages(self) -> int:
        return self.pages_per_shard

    def owner_of(self, pages: Sequence[int]) -> int:
        """The shard (= rank) holding a request's pages."""
        if not pages:
            raise ValueError("a request without pages has no owner")
        return self.allocator.shard_of(pages[0])

    def same_shard(self, pages: Sequence[int], others: Sequence[int]) -> bool:
        return bool(pages) and bool(others) and self.owner_of(pages) == self.owner_of(others)

    def owns(self, pages: Sequence[int]) -> bool:
        return self.owner_of(pages) == self.shard_rank

    def local_pages(self, pages: Sequence[int]) -> list[int]:
        """This rank's indices of its own pages (the transfer engines' and the tensor's)."""
        base = self.shard_rank * self.pages_per_shard
        local = [p - base for p in pages]
        if any(not 0 <= p < self.pages_per_shard for p in local):
            raise ValueError(f"pages {list(pages)} are not all on shard {self.shard_rank}")
        return local

    def alloc(self, n: int, after: Sequence[int] = ()) -> list[int]:
        shard = self.owner_of(after) if after else self.allocator.least_loaded()
        return self._alloc_on(shard, n)

    def _alloc_on(self, shard: int, n: int) -> list[int]:
        allocator = self.allocator.shards[shard]
        # Cached pages are evicted least recently used first, whatever their shard: evict until this shard
        # has room or nothing evictable is left.
        while allocator.free_pages < n and self.prefix_cache is not None and self.prefix_cache.evict(1):
            pass
        if allocator.free_pages < n:
            raise PoolExhaustedError(
                f"need {n} pages on shard {shard}, {allocator.free_pages} free of {self.pages_per_shard}"
            )
        return self.allocator.alloc_on(shard, n)

    def alloc_for_prompt(
        self, prompt_ids: list[int], num_pages: int, use_cache: bool = True, shard: int | None = None
    ) -> tuple[list[int], list[Block]]:
        """As ``KVPool.alloc_for_prompt``. Without ``shard`` the request goes to the shard of the cached pages
        it reuses, else to the least loaded; with ``shard`` there, using cached pages only if they are on it."""
        cache = self.prefix_cache
        if cache is None or not use_cache:
            return self._alloc_on(self.allocator.least_loaded() if shard is None else shard, num_pages), []
        held = cache.acquire(prompt_ids[:-1])
        if held and shard is not None and self.allocator.shard_of(held[0].page) != shard:
            cache.release([], held)
            held = []
        try:
            if shard is None:
                shard = self.allocator.shard_of(held[0].page) if held else self.allocator.least_loaded()
            new = self._alloc_on(shard, num_pages - len(held))
        except PoolExhaustedError:
            cache.release([], held)
            raise
        cache.record_lookup(len(prompt_ids), len(held) * self.page_size)
        return [block.page for block in held] + new, held

    def status_counts(self) -> dict[str, int]:
        counts = super().status_counts()
        counts["shard_pages"] = self.pages_per_shard  # one rank's pool: total_pages is num_shards of them
        counts["local_free_pages"] = self.allocator.shards[self.shard_rank].free_pages
        return counts
