"""Who this rank is inside an instance, and the collectives the model layers call.

One process per rank. ``tp_size`` ranks form an instance; attention runs in ``dp_size`` groups of
``attn_tp_size = tp_size // dp_size`` ranks (DESIGN.md's vocabulary); MoE experts are split over all
``tp_size`` ranks (expert parallelism). With one rank every collective is the identity, so the model
code is the same at any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    """Rank placement plus the process groups collectives run over (``None`` = world size 1).

    Attributes:
        tp_rank / tp_size: this rank inside the instance (dense MLP, LM head, experts).
        dp_size: number of attention data-parallel groups.
        tp_group: group of all ``tp_size`` ranks.
        attn_tp_group: the ``attn_tp_size`` ranks that share this rank's attention heads.
        redundant_experts: EPLB's extra physical expert slots (``engine.eplb``): the instance holds
            ``num_experts + redundant_experts`` physical experts, split evenly over the EP ranks.
    """

    tp_rank: int = 0
    tp_size: int = 1
    dp_size: int = 1
    tp_group: Any = None
    attn_tp_group: Any = None
    redundant_experts: int = 0

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"bad tp placement: rank {self.tp_rank} of {self.tp_size}")
        if self.dp_size < 1 or self.tp_size % self.dp_size:
            raise ValueError(f"tp_size {self.tp_size} is not divisible by dp_size {self.dp_size}")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")

    @classmethod
    def single(cls) -> ParallelContext:
        return cls()

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.dp_size

    @property
    def attn_tp_rank(self) -> int:
        return self.tp_rank % self.attn_tp_size

    @property
    def dp_rank(self) -> int:
        return self.tp_rank // self.attn_tp_size

    @property
    def ep_size(self) -> int:
        return self.tp_size

    @property
    def ep_rank(self) -> int:
        return self.tp_rank

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """The contiguous range ``[start, end)`` of physical expert slots held by this rank (the routed
        experts themselves without EPLB's redundant slots)."""
        physical = num_experts + self.redundant_experts
        if physical % self.ep_size:
            extra = f" + {self.redundant_experts} redundant" if self.redundant_experts else ""
            raise ValueError(f"{num_experts}{extra} experts cannot be split evenly over {self.ep_size} ranks")
        per_rank = physical // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank


def all_reduce(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """Sum over ``group`` in place; the identity when the group has one rank."""
    if size > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """Concatenate every rank's shard along the last dimension; the identity for one rank."""
    if size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return torch.cat(shards, dim=-1)
