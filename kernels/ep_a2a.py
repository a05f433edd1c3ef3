"""The collectives behind ``kernels.ep.Dispatcher``: an all-to-all over a torch.distributed group, or
the identity on one rank (``local``). Kept apart so a new backend only implements these three calls."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class ExchangeBackend(Protocol):
    rank: int
    size: int

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Equal-split all-to-all of a small int64 tensor (``size`` blocks): what each peer sends me."""
        ...

    def all_to_all(self, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        """Send ``send_splits[p]`` leading rows of ``rows`` to rank ``p``; receive ``recv_splits[p]`` from it."""
        ...

    def all_to_all_equal(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Equal-split all-to-all of fixed-shape buffers into ``out`` (same shape); returns ``out``."""
        ...


class LocalBackend:
    """One rank holds every expert: every exchange is a copy to itself."""

    rank, size = 0, 1

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return counts.clone()

    def all_to_all(self, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        return rows

    def all_to_all_equal(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(rows)


class A2ABackend:
    """``torch.distributed.all_to_all_single`` over ``group`` (gloo on CPU, NCCL on GPU).

    A group of one rank skips the collective. Zero-row splits are legal: idle ranks still take part.
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("the a2a EP backend needs torch.distributed initialised (or use backend='local')")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        if counts.numel() % self.size:
            raise ValueError(f"{counts.numel()} counts do not split into {self.size} equal blocks")
        return self.all_to_all_equal(counts.contiguous(), torch.empty_like(counts))

    def all_to_all(self, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        if self.size == 1:
            return rows
        out = torch.empty(sum(recv_splits), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=self.group)
        return out

    def all_to_all_equal(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return out.copy_(rows)
        dist.all_to_all_single(out, rows.contiguous(), group=self.group)
        return out
