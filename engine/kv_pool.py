"""Paged latent KV cache with cross-layer pages (DESIGN.md "KV page layout").

One tensor ``[num_pages, num_layers, page_size, kv_lora_rank + qk_rope_head_dim]``: every layer of a
page is contiguous, so a transfer engine registers the whole tensor once and moves a page (or a run of
contiguous pages) as one descriptor. Attention for layer l reads the strided view ``layer(l)``.

KV cache dtype (``--kv-cache-dtype``, SGLang's and vLLM's flag): ``auto`` stores the model dtype; ``fp8_e4m3``
stores float8_e4m3fn, half the bytes of bf16 per token (and per page moved by a KV transfer). Values are
written as ``x / scale`` (clamped to e4m3's +-448) and read back as ``stored * scale`` by every attention
path, with one scale per layer (``KVPool.layer_scale``).

How the scale is chosen: 1.0 for every layer, as vLLM and SGLang use when a checkpoint ships no calibrated
``k_scale``. Why that suffices for MLA: the cached latent is the output of ``kv_a_layernorm`` (RMS-normalised,
times a learned weight: values of order 1-10) and k_pe a roped projection of similar size, well inside
e4m3's range (+-448, normals down to 2^-6); e4m3's relative error (3 mantissa bits) does not depend on the
scale inside that range, so a calibrated scale would mostly buy range that is not used. The scale is fixed
rather than computed per batch because a page must mean the same thing wherever it is read: pages written
by different forwards (and by a prefill instance for a decode instance) share one per-layer scale, so no
scale travels with the pages. Kernels take the scale as an argument, so calibrated per-layer scales can be
plugged in later — they would then have to join the PageLayout checked at bootstrap, like the dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.prefix_cache import Block, PrefixCache

# --kv-cache-dtype choices -> storage dtype (None: the model dtype).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
DEFAULT_KV_SCALE = 1.0  # see the module docstring for why


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's storage dtype for ``--kv-cache-dtype name`` with a model running in ``model_dtype``."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv cache dtype {name!r} (choose from {', '.join(KV_CACHE_DTYPES)})")
    return KV_CACHE_DTYPES[name] or model_dtype


def quantize_kv(values: torch.Tensor, storage_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``values`` as the pool stores them: divided by ``scale`` and clamped for FP8 (a plain cast to
    float8_e4m3fn turns out-of-range values into NaN instead of saturating), else just cast."""
    if storage_dtype in FP8_DTYPES:
        limit = _FP8_MAX[storage_dtype]
        scaled = values.float() / scale if scale != 1.0 else values.float()
        return scaled.clamp(-limit, limit).to(storage_dtype)
    return values.to(storage_dtype)


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as uint8 (same bytes, same strides): indexing and index_put are then plain byte moves on
    every device and torch version, whatever FP8 kernels a build has."""
    return tensor.view(torch.uint8) if tensor.dtype in FP8_DTYPES else tensor


def write_kv(kv_cache: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, values: torch.Tensor,
             scale: float) -> None:
    """Store ``values`` ``[T, dim]`` (compute dtype) at ``kv_cache[pages, slots]``, quantized."""
    stored = quantize_kv(values, kv_cache.dtype, scale)
    _raw(kv_cache)[pages, slots] = _raw(stored)


def read_kv(kv_cache: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype,
            scale: float) -> torch.Tensor:
    """``kv_cache[pages, slots]`` in the compute ``dtype``, dequantized."""
    rows = _raw(kv_cache)[pages, slots]
    return dequantize_kv(rows.view(kv_cache.dtype) if rows.dtype != kv_cache.dtype else rows, dtype, scale)


def dequantize_kv(stored: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Stored pool values back in the compute ``dtype``: ``stored * scale`` (FP8 has no CPU arithmetic,
    so it is converted first)."""
    out = stored.to(dtype)
    return out * scale if scale != 1.0 else out


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
    """Owns the KV tensor and its page allocator. ``close()`` drops the tensor.

    ``dtype`` is the storage dtype (``resolve_kv_cache_dtype``); ``scales`` the per-layer FP8 scales
    (default ``DEFAULT_KV_SCALE`` everywhere; ignored, and must be 1.0, for non-FP8 storage).
    ``prefix_cache``: keep finished requests' full pages in a ``PrefixCache`` (``self.prefix_cache``);
    ``alloc`` then evicts unreferenced cached pages when too few are free, so nobody waits for pages the
    cache could give back. Idle means ``available_pages == num_pages`` (free + evictable cached pages).
    """

    def __init__(self, num_pages: int, num_layers: int, page_size: int, kv_dim: int, dtype: torch.dtype,
                 device: torch.device | str, scales: list[float] | None = None, prefix_cache: bool = False) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        scales = [DEFAULT_KV_SCALE] * num_layers if scales is None else [float(s) for s in scales]
        if len(scales) != num_layers or any(not s > 0 for s in scales):
            raise ValueError(f"need {num_layers} positive per-layer KV scales, got {scales}")
        if dtype not in FP8_DTYPES and any(s != 1.0 for s in scales):
            raise ValueError(f"KV scales other than 1.0 need an FP8 pool, not {dtype}")
        self.layout = KVPoolLayout(num_pages, num_layers, page_size, kv_dim, dtype)
        self.page_size = page_size
        self.num_layers = num_layers
        # Python floats, not a tensor: kernels take the scale as a launch argument (no device read, so
        # CUDA-graph capture is unaffected).
        self.scales: list[float] = scales
        self.tensor: torch.Tensor = torch.zeros(num_pages, num_layers, page_size, kv_dim, dtype=dtype,
                                                device=device)
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache: PrefixCache | None = (
            PrefixCache(page_size, self.allocator.free) if prefix_cache else None
        )

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def free_pages(self) -> int:
        """Pages in no one's hands (cached pages, even unreferenced ones, are not counted)."""
        return self.allocator.free_pages

    @property
    def evictable_pages(self) -> int:
        return self.prefix_cache.evictable_pages if self.prefix_cache is not None else 0

    @property
    def available_pages(self) -> int:
        """Pages an allocation can get now: free ones plus unreferenced cached ones (evicted on demand)."""
        return self.allocator.free_pages + self.evictable_pages

    @property
    def max_request_pages(self) -> int:
        """The most pages one request can hold (a sharded pool's requests live in one shard)."""
        return self.num_pages

    def same_shard(self, pages: Sequence[int], others: Sequence[int]) -> bool:
        """Whether freeing ``pages`` makes room for ``others`` to grow (always, in a pool of one shard)."""
        return True

    def alloc(self, n: int, after: Sequence[int] = ()) -> list[int]:
        """``n`` pages; ``after``: the pages of the request they extend (a sharded pool keeps a request on one
        shard, this pool has one)."""
        short = n - self.allocator.free_pages
        if short > 0 and self.prefix_cache is not None and n <= self.available_pages:
            self.prefix_cache.evict(short)
        return self.allocator.alloc(n)

    def alloc_for_prompt(self, prompt_ids: list[int], num_pages: int, use_cache: bool = True,
                         shard: int | None = None) -> tuple[list[int], list[Block]]:
        """``num_pages`` pages for a request starting with ``prompt_ids``: first the cached pages of its
        prompt's longest cached full-page prefix (held: the request must ``release`` them), then new ones.
        The lookup leaves out the prompt's last token, which must be computed to get the logits of the first
        output token. Raises ``PoolExhaustedError`` and changes nothing when the pool cannot serve it.
        Returns (pages, held blocks); ``len(held) * page_size`` prompt tokens need no computing.
        ``use_cache`` False skips the lookup (a request that wants every prompt position's logits).
        ``shard``: where a sharded pool must put them (``engine.kv_shards``); this pool is one shard.
        """
        cache = self.prefix_cache
        if cache is None or not use_cache:
            return self.alloc(num_pages), []
        held = cache.acquire(prompt_ids[:-1])
        try:
            new = self.alloc(num_pages - len(held))
        except PoolExhaustedError:
            cache.release([], held)
            raise
        cache.record_lookup(len(prompt_ids), len(held) * self.page_size)
        return [block.page for block in held] + new, held

    def publish(self, tokens: list[int], pages: list[int], held: list[Block]) -> list[Block]:
        """Offer the full pages of ``tokens`` (KV complete in ``pages``) to the prefix cache; returns the
        blocks the request holds now (``held`` when there is no cache)."""
        if self.prefix_cache is None:
            return held
        return self.prefix_cache.insert(tokens, pages, held)

    def release(self, pages: list[int], held: list[Block]) -> None:
        """End a request's use of ``pages``: drop its hold on the cached blocks ``held`` and free the rest."""
        if self.prefix_cache is None:
            if held:
                raise ValueError("cached blocks held without a prefix cache")
            self.allocator.free(pages)
        else:
            self.allocator.free(self.prefix_cache.release(pages, held))

    def free(self, pages: list[int]) -> None:
        self.allocator.free(pages)

    def status_counts(self) -> dict[str, int]:
        """For /server_info and /metrics: idle is ``free_pages + evictable_pages == total_pages``, and the
        prefix cache's counters (tokens looked up and hit at admission, cached and evicted pages)."""
        counts = {"free_pages": self.free_pages, "evictable_pages": self.evictable_pages,
                  "total_pages": self.num_pages}
        if self.prefix_cache is not None:
            counts.update(self.prefix_cache.counters())
        return counts

    def pages_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def layer(self, layer_id: int) -> torch.Tensor:
        """``[num_pages, page_size, kv_dim]`` strided view of one layer."""
        return self.tensor[:, layer_id]

    def layer_scale(self, layer_id: int) -> float:
        """Stored value x means ``x * layer_scale(layer_id)`` (1.0 unless FP8 with a calibrated scale)."""
        return self.scales[layer_id]

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    def close(self) -> None:
        self.tensor = torch.empty(0)
