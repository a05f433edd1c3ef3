"""Building blocks whose weights may be split over ranks: column-/row-parallel linear layers,
vocab-parallel embedding and LM head, RMSNorm.

Each parallel layer keeps only its shard and knows how to cut that shard from the full checkpoint
tensor (``load_full``), so the weight loader never needs to know the parallel layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.parallel import all_gather_last_dim, all_reduce


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(expected)}"
        )


class RMSNorm(nn.Module):
    """Normalise in float32 then scale (the DeepSeek/T5 formulation, same rounding as transformers)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``norm(x + residual)``, ``x + residual``) in one kernel on the GPU."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)

    def load_full(self, name: str, full: torch.Tensor) -> None:
        _check_shape(name, full, tuple(self.weight.shape))
        self.weight.copy_(full)


class ReplicatedLinear(nn.Module):
    """A linear layer every rank holds whole (e.g. the latent projection ``kv_a_proj_with_mqa``)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_full(self, name: str, full: torch.Tensor) -> None:
        target = self.bias if name.endswith(".bias") else self.weight
        assert target is not None
        _check_shape(name, full, tuple(target.shape))
        target.copy_(full)


class ColumnParallelLinear(nn.Module):
    """Output features split over ``tp_size`` ranks; no communication (the next row-parallel layer sums)."""

    def __init__(
        self,
        in_features: int,
        full_out_features: int,
        bias: bool,
        tp_rank: int,
        tp_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        if full_out_features % tp_size:
            raise ValueError(f"{full_out_features} output features cannot be split over {tp_size} ranks")
        self.in_features = in_features
        self.full_out_features = full_out_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        out_local = full_out_features // tp_size
        self.weight = nn.Parameter(torch.empty(out_local, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_local, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_full(self, name: str, full: torch.Tensor) -> None:
        is_bias = name.endswith(".bias")
        expected = (self.full_out_features,) if is_bias else (self.full_out_features, self.in_features)
        _check_shape(name, full, expected)
        target = self.bias if is_bias else self.weight
        assert target is not None
        target.copy_(full.chunk(self.tp_size, dim=0)[self.tp_rank])


class RowParallelLinear(nn.Module):
    """Input features split over ranks; partial outputs are summed with an all-reduce.

    ``reduce_results=False`` leaves the partial sum to the caller, which reduces several partial sums
    at once (the MoE block adds the shared experts' partial output to the routed output first).
    """

    def __init__(
        self,
        full_in_features: int,
        out_features: int,
        bias: bool,
        tp_rank: int,
        tp_size: int,
        group: Any,
        dtype: torch.dtype,
        device: torch.device | str,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        if full_in_features % tp_size:
            raise ValueError(f"{full_in_features} input features cannot be split over {tp_size} ranks")
        self.full_in_features = full_in_features
        self.out_features = out_features
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.reduce_results = reduce_results
        self.weight = nn.Parameter(
            torch.empty(out_features, full_in_features // tp_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        # The bias is added once, after the reduction, not on every rank.
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.reduce_results:
            out = all_reduce(out, self.group, self.tp_size)
        return out if self.bias is None else out + self.bias

    def load_full(self, name: str, full: torch.Tensor) -> None:
        if name.endswith(".bias"):
            assert self.bias is not None
            _check_shape(name, full, (self.out_features,))
            self.bias.copy_(full)
            return
        _check_shape(name, full, (self.out_features, self.full_in_features))
        self.weight.copy_(full.chunk(self.tp_size, dim=1)[self.tp_rank])


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split over ranks; each rank embeds the ids it owns, an all-reduce fills the rest."""

    def __init__(
        self, vocab_size: int, dim: int, tp_rank: int, tp_size: int, group: Any, dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.per_rank = -(-vocab_size // tp_size)
        self.start = tp_rank * self.per_rank
        self.end = min(vocab_size, self.start + self.per_rank)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        owned = (ids >= self.start) & (ids < self.end)
        out = F.embedding(torch.where(owned, ids - self.start, 0), self.weight)
        out = out * owned.unsqueeze(-1).to(out.dtype)
        return all_reduce(out, self.group, self.tp_size)

    def load_full(self, name: str, full: torch.Tensor) -> None:
        _check_shape(name, full, (self.vocab_size, self.dim))
        self.weight.zero_()
        self.weight[: self.end - self.start].copy_(full[self.start : self.end])


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection: each rank scores its vocabulary shard, then an all-gather."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = F.linear(hidden, self.weight)
        logits = all_gather_last_dim(logits, self.group, self.tp_size)
        return logits[..., : self.vocab_size]
