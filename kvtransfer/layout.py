"""Where the KV pages of one rank live in memory, and how page indices become transfer descriptors.

A rank's KV pool is one registered buffer shaped `[num_pages, num_layers, page_size, token_dim]` (DESIGN.md,
"cross-layer pages"): every layer of a page is contiguous, so a page is one descriptor, and a run of
consecutive pages is one descriptor too. Transports move (address, nbytes) ranges computed here and know
nothing of models.

Torch-free on purpose except inside `PageLayout.from_tensor`: this module is imported by processes that
must not pull torch in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Bytes per value of the dtypes a KV pool may use; the name is torch's without the "torch." prefix.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r}")


@dataclass(frozen=True)
class PageLayout:
    """The KV pool of one rank: `[num_pages, num_layers, page_size, token_dim]` values at `base_ptr`.

    num_pages: pages in the pool.
    num_layers: model layers held per page (all of them: cross-layer pages).
    page_size: tokens per page.
    token_dim: values per token per layer (MLA: kv_lora_rank + qk_rope_head_dim, 576 for DeepSeek-V3).
    itemsize: bytes per value.
    dtype: the value type's name, e.g. "bfloat16" (compared between peers; never interpreted here).
    base_ptr: address of page 0, layer 0.
    device: "cpu" or "cuda:N".
    """

    num_pages: int
    num_layers: int
    page_size: int
    token_dim: int
    itemsize: int
    dtype: str
    base_ptr: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        for field_name in ("num_pages", "num_layers", "page_size", "token_dim", "itemsize"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PageLayout.{field_name} must be a positive int, got {value!r}")
        if not isinstance(self.base_ptr, int) or self.base_ptr < 0:
            raise ValueError(f"PageLayout.base_ptr must be a non-negative int, got {self.base_ptr!r}")
        expected = DTYPE_ITEMSIZE.get(self.dtype)
        if expected is not None and expected != self.itemsize:
            raise ValueError(f"PageLayout: dtype {self.dtype} has itemsize {expected}, not {self.itemsize}")
        _check_device(self.device)

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer of one page."""
        return self.page_size * self.token_dim * self.itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes of one page, all layers (one transfer descriptor)."""
        return self.num_layers * self.layer_bytes

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise IndexError(f"page {page} out of range [0, {self.num_pages})")

    def page_addr(self, page: int) -> int:
        self._check_page(page)
        return self.base_ptr + page * self.page_bytes

    def layer_addr(self, page: int, layer: int) -> int:
        self._check_page(page)
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return self.base_ptr + page * self.page_bytes + layer * self.layer_bytes

    def layer_descriptors(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        """(addr, nbytes) per layer per page: the per-layer layout's descriptors, kept as a baseline."""
        return [(self.layer_addr(p, layer), self.layer_bytes) for p in pages for layer in range(self.num_layers)]

    def coalesce(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        """Runs of consecutive page indices as (start, count), keeping the given order.

        [3, 4, 5, 9, 10, 2] -> [(3, 3), (9, 2), (2, 1)]. Indices are checked against the pool.
        """
        runs: list[tuple[int, int]] = []
        for page in pages:
            self._check_page(page)
            if runs and runs[-1][0] + runs[-1][1] == page:
                start, count = runs[-1]
                runs[-1] = (start, count + 1)
            else:
                runs.append((page, 1))
        return runs

    def compatible_with(self, other: PageLayout) -> str | None:
        """Why pages of `self` cannot be copied byte for byte into pages of `other`, or None if they can.

        The dtype is compared before the itemsize it implies, so an FP8 pool meeting a bf16 one is named as
        what it is (the workers' `--kv-cache-dtype`), not as a size mismatch.
        """
        if self.dtype != other.dtype:
            return (f"dtype differs: {self.dtype!r} here, {other.dtype!r} on the peer (prefill and decode must "
                    "store the KV cache in one dtype: the same --kv-cache-dtype and --dtype on both)")
        for field_name in ("page_size", "num_layers", "token_dim", "itemsize"):
            mine, theirs = getattr(self, field_name), getattr(other, field_name)
            if mine != theirs:
                return f"{field_name} differs: {mine!r} here, {theirs!r} on the peer"
        return None

    @classmethod
    def from_tensor(cls, pool: Any) -> PageLayout:
        """Layout of a contiguous torch tensor shaped `[num_pages, num_layers, page_size, token_dim]`."""
        import torch  # here only: the rest of this module stays importable without torch

        if not isinstance(pool, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(pool).__name__}")
        if pool.dim() != 4:
            raise ValueError(f"KV pool must be 4-D [pages, layers, page_size, dim], got shape {tuple(pool.shape)}")
        if not pool.is_contiguous():
            raise ValueError("KV pool must be contiguous: pages are transferred as raw byte ranges")
        num_pages, num_layers, page_size, token_dim = (int(s) for s in pool.shape)
        return cls(
            num_pages=num_pages,
            num_layers=num_layers,
            page_size=page_size,
            token_dim=token_dim,
            itemsize=pool.element_size(),
            dtype=str(pool.dtype).removeprefix("torch."),
            base_ptr=pool.data_ptr(),
            device=str(pool.device) if pool.device.type == "cpu" else f"cuda:{pool.device.index or 0}",
        )


def coalesce_pairs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs where both source and destination page indices are consecutive, as (src, dst, count).

    ([3, 4, 5, 9], [10, 11, 20, 21]) -> [(3, 10, 2), (5, 20, 1), (9, 21, 1)].
    """
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(src_pages, dst_pages, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            start_src, start_dst, count = runs[-1]
            runs[-1] = (start_src, start_dst, count + 1)
        else:
            runs.append((src, dst, 1))
    return runs


def page_descriptors(
    src: PageLayout, src_pages: Sequence[int], dst: PageLayout, dst_pages: Sequence[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(src, dst) lists of (addr, nbytes) that copy src_pages[i] into dst_pages[i]: one per paired run."""
    why = src.compatible_with(dst)
    if why is not None:
        raise ValueError(f"page layouts are incompatible: {why}")
    for layout, pages in ((src, src_pages), (dst, dst_pages)):
        for page in pages:
            layout._check_page(page)
    runs = coalesce_pairs(src_pages, dst_pages)
    return (
        [(src.page_addr(s), n * src.page_bytes) for s, _, n in runs],
        [(dst.page_addr(d), n * dst.page_bytes) for _, d, n in runs],
    )


def layer_descriptors(
    src: PageLayout, src_pages: Sequence[int], dst: PageLayout, dst_pages: Sequence[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """One descriptor per layer per page, no coalescing: what a per-layer pool layout would need.
    Kept as the benchmark's baseline."""
    why = src.compatible_with(dst)
    if why is not None:
        raise ValueError(f"page layouts are incompatible: {why}")
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    return src.layer_descriptors(src_pages), dst.layer_descriptors(dst_pages)


@dataclass(frozen=True)
class AuxLayout:
    """The aux buffer of one rank: `num_slots` slots of `slot_bytes` at `base_ptr` (first token id + logprob)."""

    base_ptr: int
    slot_bytes: int
    num_slots: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.slot_bytes <= 0 or self.num_slots <= 0:
            raise ValueError(f"AuxLayout needs positive slot_bytes and num_slots, got {self}")
        if self.base_ptr < 0:
            raise ValueError(f"AuxLayout.base_ptr must be non-negative, got {self.base_ptr}")
        _check_device(self.device)

    @property
    def pool_bytes(self) -> int:
        return self.slot_bytes * self.num_slots

    def slot_addr(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"aux slot {slot} out of range [0, {self.num_slots})")
        return self.base_ptr + slot * self.slot_bytes
