"""Asks L2 for a layer's dense weights while the kernels before them leave DRAM idle.

A decode step at small batch streams each layer's weights once, and between those streams it runs tens of
microseconds of kernels that hardly touch DRAM: the attention over a short context, norms, routing. A layer's
dense weights (the attention projections, the shared experts, a dense MLP) depend on nothing the step computes,
so one small launch at the layer's start can have them on their way into L2 while those kernels run, and the
GEMMs that follow find them there. The routed experts are left out: which of them a token uses is known only
just before their launch, and a layer's whole set is far larger than L2.

The launch (``kernels.triton_l2_prefetch``) issues ``cp.async.bulk.prefetch.L2`` (sm90+: one instruction per chunk, fire and forget, the copy
engine of the SM does the rest) for a plan of (address, bytes) chunks built once from the weights. Launched as a
programmatic dependent (``kernels.triton_pdl``), it does so *before* ``griddepcontrol.wait``, while the kernel
ahead of it (the last layer's expert GEMMs) drains: it reads only its own plan, which no kernel writes, and
the weights, which nothing in a step writes. Then it waits, so the kernels after it keep stream order. A
prefetch is a hint: it changes no result, only where the next reads are served from.

``TANDEM_L2_PREFETCH_MB`` caps each layer's plan, in first-use order (0: no launch). It is what the prefetched
lines may occupy of L2 (50 MB on an H100) beside the expert weights that stream through it afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kernels.backend import device_facts

BUDGET_ENV = "TANDEM_L2_PREFETCH_MB"
CHUNK_BYTES = 16 << 10  # one bulk prefetch: 128 lines of 128 bytes
ALIGN = 16  # the instruction's address and size granule


def budget_bytes() -> int:
    """Each layer's prefetch cap from ``BUDGET_ENV`` (default 0: off); a value that is not a whole number of
    megabytes at least 0 is refused, never read as the default."""
    raw = os.environ.get(BUDGET_ENV, "0")
    if not raw.isdigit():
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a whole number of megabytes (0 turns it off)")
    return int(raw) << 20


def byte_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The [start, end) device addresses ``tensors`` span, in the order given, each byte once: a view of a
    buffer already listed (a fused weight's parts) adds only what the buffer did not cover. Ends are widened
    and starts narrowed to the 16-byte granule, which never leaves a CUDA allocation (512-byte aligned). A
    tensor that is not contiguous is left out (its span would hold bytes it does not use)."""
    taken: list[tuple[int, int]] = []
    for t in tensors:
        if t.numel() == 0 or not t.is_contiguous():
            continue
        start = t.data_ptr() // ALIGN * ALIGN
        end = -(-(t.data_ptr() + t.numel() * t.element_size()) // ALIGN) * ALIGN
        pieces = [(start, end)]
        for lo, hi in taken:  # cut away what an earlier range holds
            pieces = [p for s, e in pieces for p in ((s, min(e, lo)), (max(s, hi), e)) if p[0] < p[1]]
        taken.extend(pieces)
    return taken


def plan_chunks(ranges: list[tuple[int, int]], budget: int, chunk: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """(address, bytes) chunks of at most ``chunk`` bytes covering ``ranges`` in order until ``budget`` bytes;
    every address and size a multiple of 16."""
    if chunk % ALIGN or chunk <= 0:
        raise ValueError(f"chunk of {chunk} bytes: expected a positive multiple of {ALIGN}")
    chunks: list[tuple[int, int]] = []
    left = budget // ALIGN * ALIGN
    for start, end in ranges:
        for addr in range(start, end, chunk):
            size = min(chunk, end - addr, left)
            if size <= 0:
                return chunks
            chunks.append((addr, size))
            left -= size
    return chunks


@dataclass(frozen=True)
class PrefetchPlan:
    """One launch's chunks on the device: ``addresses`` int64 and ``sizes`` int32, ``nbytes`` in all."""

    addresses: torch.Tensor
    sizes: torch.Tensor
    nbytes: int

    @classmethod
    def of(cls, tensors: Iterable[torch.Tensor], budget: int, chunk: int = CHUNK_BYTES) -> PrefetchPlan | None:
        """The plan for ``tensors`` (all on one CUDA device of compute capability 9.0+) within ``budget``
        bytes, or None where there is nothing to launch: no budget, no tensor, not such a device."""
        tensors = list(tensors)
        if budget <= 0 or not tensors or not prefetch_supported(tensors[0].device):
            return None
        chunks = plan_chunks(byte_ranges(tensors), budget, chunk)
        if not chunks:
            return None
        device = tensors[0].device
        addresses = torch.tensor([a for a, _ in chunks], dtype=torch.int64, device=device)
        sizes = torch.tensor([s for _, s in chunks], dtype=torch.int32, device=device)
        return cls(addresses, sizes, sum(s for _, s in chunks))


def prefetch_supported(device: torch.device) -> bool:
    """Bulk prefetches exist from sm90; elsewhere (CPU, older GPUs) there is no launch."""
    return device.type == "cuda" and device_facts(device.index or 0)[0] >= (9, 0)


class LayerPrefetch:
    """A layer's plan, built on first use outside a CUDA-graph capture (a capture may not copy to the device)
    from ``weights()``, and again whenever ``BUDGET_ENV`` changes; ``plan()`` is None while there is nothing to
    launch. Weights are read once: a layer's dense weights keep their storage after loading."""

    def __init__(self, weights: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._weights = weights
        self._budget: int | None = None
        self._plan: PrefetchPlan | None = None

    def plan(self, device: torch.device) -> PrefetchPlan | None:
        budget = budget_bytes()
        if budget != self._budget:
            if not prefetch_supported(device) or torch.cuda.is_current_stream_capturing():
                return None
            self._plan, self._budget = PrefetchPlan.of(self._weights(), budget), budget
        return self._plan
