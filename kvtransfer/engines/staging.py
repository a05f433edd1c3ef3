"""Staging for fragmented requests: gather scattered pages into one contiguous range, scatter them back.

A write costs per descriptor (TRANSPORTS.md: ~15 us each through NIXL on one GPU), and a request whose
pages are not consecutive needs one descriptor per run. Gathering the pages into a registered staging
area first turns the request into one descriptor at the price of a device copy on each fragmented side.
bench/kv_transfer.py measures when that pays (the "staged" layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtransfer.layout import PageLayout


class PageStager:
    """Copies pages of a pool to and from a staging area in the same registered memory.

    pool: the rank's pool tensor (any shape and dtype, contiguous) that `layout` describes.
    staging: a contiguous tensor on the pool's device, at least `max_pages` pages long in bytes.
    """

    def __init__(self, pool: torch.Tensor, layout: PageLayout, staging: torch.Tensor) -> None:
        if pool.data_ptr() != layout.base_ptr or not pool.is_contiguous() or not staging.is_contiguous():
            raise ValueError("pool must be the contiguous tensor that `layout` describes; staging contiguous")
        if staging.device != pool.device:
            raise ValueError(f"staging is on {staging.device}, the pool on {pool.device}")
        self.layout = layout
        self._pages = pool.view(torch.uint8).view(layout.num_pages, layout.page_bytes)
        self._staging = staging.view(torch.uint8).reshape(-1)
        self.max_pages = self._staging.numel() // layout.page_bytes
        self._word_aligned = layout.page_bytes % 8 == 0 and pool.data_ptr() % 8 == 0 and staging.data_ptr() % 8 == 0
        if self.max_pages == 0:
            raise ValueError(f"staging holds {self._staging.numel()} bytes, less than one page")

    @property
    def staging_addr(self) -> int:
        return self._staging.data_ptr()

    def _check(self, pages: Sequence[int]) -> None:
        if len(pages) > self.max_pages:
            raise ValueError(f"{len(pages)} pages do not fit a staging area of {self.max_pages} pages")
        for page in (min(pages), max(pages)) if pages else ():
            self.layout.page_addr(page)  # range check

    def _index(self, pages: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(pages), dtype=torch.long).to(self._pages.device, non_blocking=True)

    def _rows(self, count: int) -> torch.Tensor:
        return self._staging[: count * self.layout.page_bytes].view(count, self.layout.page_bytes)

    def _words(self, rows: torch.Tensor) -> torch.Tensor:
        """8-byte words when alignment allows: index kernels move one element per thread."""
        return rows.view(torch.int64) if self._word_aligned else rows

    def gather(self, pages: Sequence[int]) -> tuple[int, int]:
        """Copy `pages` in order to the start of staging; returns the (addr, nbytes) to write from.
        On a GPU the copy is one kernel on the current stream, synchronised before returning."""
        self._check(pages)
        rows = self._rows(len(pages))
        if self._pages.is_cuda:
            torch.index_select(self._words(self._pages), 0, self._index(pages), out=self._words(rows))
            torch.cuda.current_stream(self._pages.device).synchronize()
        else:  # torch's CPU index kernels copy byte by byte; a memcpy per run of pages is far faster
            done = 0
            for start, count in self.layout.coalesce(pages):
                rows[done : done + count].copy_(self._pages[start : start + count])
                done += count
        return self.staging_addr, len(pages) * self.layout.page_bytes

    def scatter(self, pages: Sequence[int]) -> None:
        """Copy the first len(pages) staged pages into `pages` (after a write into staging landed)."""
        self._check(pages)
        rows = self._rows(len(pages))
        if self._pages.is_cuda:
            self._words(self._pages).index_copy_(0, self._index(pages), self._words(rows))
            torch.cuda.current_stream(self._pages.device).synchronize()
        else:
            done = 0
            for start, count in self.layout.coalesce(pages):
                self._pages[start : start + count].copy_(rows[done : done + count])
                done += count
