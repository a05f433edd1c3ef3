"""Paged latent KV cache with cross-layer pages (DESIGN.md "KV page layout").

One tensor ``[num_pages, num_layers, page_size, kv_lora_rank + qk_rope_head_dim]``: every layer of a
page is contiguous, so a transfer engine registers the whole tensor once and moves a page (or a run of
contiguous pages) as one descriptor. Attention for layer l reads the strided view ``layer(l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PoolExhaustedError(RuntimeError):
    """Not enough free pages for an allocation."""


class PageAllocator:
    """Hands out page indices, preferring one contiguous run per request.

    Free pages are kept as sorted disjoint runs ``[start, end)``. ``alloc`` takes the smallest run
    that fits whole (so big runs stay big); when none fits it takes runs largest-first, which keeps
    the number of runs (= transfer descriptors) per request small. Freeing merges neighbours.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._runs: list[list[int]] = [[0, num_pages]]
        self._allocated = bytearray(num_pages)
        self._free_count = num_pages

    @property
    def free_pages(self) -> int:
        return self._free_count

    def alloc(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self._free_count:
            raise PoolExhaustedError(f"need {n} pages, {self._free_count} free of {self.num_pages}")
        if n == 0:
            return []
        fitting = [run for run in self._runs if run[1] - run[0] >= n]
        if fitting:
            run = min(fitting, key=lambda r: r[1] - r[0])
            pages = list(range(run[0], run[0] + n))
            run[0] += n
        else:
            pages = []
            for run in sorted(self._runs, key=lambda r: r[0] - r[1]):  # largest first
                take = min(n - len(pages), run[1] - run[0])
                pages.extend(range(run[0], run[0] + take))
                run[0] += take
                if len(pages) == n:
                    break
        self._runs = [run for run in self._runs if run[0] < run[1]]
        for page in pages:
            self._allocated[page] = 1
        self._free_count -= n
        return pages

    def free(self, pages: list[int]) -> None:
        """Return pages; refuses (and changes nothing) on a double free or an unknown index."""
        seen: set[int] = set()
        for page in pages:
            if not 0 <= page < self.num_pages:
                raise ValueError(f"page {page} is outside the pool [0, {self.num_pages})")
            if not self._allocated[page] or page in seen:
                raise ValueError(f"page {page} is not allocated (double free?)")
            seen.add(page)
        for page in pages:
            self._allocated[page] = 0
        self._free_count += len(pages)
        merged: list[list[int]] = []
        points = sorted([run[0], run[1]] for run in self._runs) + [[p, p + 1] for p in sorted(seen)]
        for start, end in sorted(points):
            if merged and merged[-1][1] == start:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        self._runs = merged


@dataclass(frozen=True)
class KVPoolLayout:
    """What a transfer engine needs to know about the pool: no model knowledge."""

    num_pages: int
    num_layers: int
    page_size: int
    kv_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        return self.num_layers * self.page_size * self.kv_dim * torch.empty(0, dtype=self.dtype).element_size()


class KVPool:
    """Owns the KV tensor and its page allocator. ``close()`` drops the tensor."""

    def __init__(self, num_pages: int, num_layers: int, page_size: int, kv_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.layout = KVPoolLayout(num_pages, num_layers, page_size, kv_dim, dtype)
        self.page_size = page_size
        self.num_layers = num_layers
        self.tensor: torch.Tensor = torch.zeros(num_pages, num_layers, page_size, kv_dim, dtype=dtype,
                                                device=device)
        self.allocator = PageAllocator(num_pages)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def free_pages(self) -> int:
        return self.allocator.free_pages

    def alloc(self, n: int) -> list[int]:
        return self.allocator.alloc(n)

    def free(self, pages: list[int]) -> None:
        self.allocator.free(pages)

    def pages_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def layer(self, layer_id: int) -> torch.Tensor:
        """``[num_pages, page_size, kv_dim]`` strided view of one layer."""
        return self.tensor[:, layer_id]

    def close(self) -> None:
        self.tensor = torch.empty(0)
