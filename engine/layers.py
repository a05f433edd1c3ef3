"""Building blocks whose weights may be split over ranks: column-/row-parallel linear layers,
vocab-parallel embedding and LM head, RMSNorm.

Each parallel layer keeps only its shard and knows how to cut that shard from the full checkpoint
tensor (``load_full``), so the weight loader never needs to know the parallel layout.

Linear layers built with ``fp8`` (an ``Fp8Config``) hold an FP8 e4m3 ``weight`` and its float32 block
scales ``weight_scale_inv`` (DeepSeek-V3's names), sharded exactly like the bf16 weight, and run
``kernels.fp8_linear``. A shard must cut the weight on block boundaries to keep its scales; one that
does not (e.g. 96 rows per rank) is held in the model dtype instead, dequantized at load
(``fp8_fallback`` says why; the loader logs it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.config import Fp8Config
from engine.parallel import all_gather_last_dim, all_reduce
from engine.quant import Fp8Weight
from kernels.fp8 import FP8_DTYPE, scale_shape


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


def stacked_in(buffer: torch.Tensor | None, first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether ``first`` and ``second`` still sit back to back at the start of ``buffer`` (a fused weight whose
    parts layers hold as views; a loader that replaced a part breaks it, and callers then run the parts)."""
    return (buffer is not None and first.dtype == buffer.dtype and first.data_ptr() == buffer.data_ptr()
            and second.data_ptr() == buffer[first.shape[0]:].data_ptr())


class _LinearWeight(nn.Module):
    """The weight of a (possibly sharded) linear layer: model dtype, or FP8 + block scales."""

    fp8: Fp8Config | None
    fp8_fallback: str | None
    weight_scale_inv: nn.Parameter | None

    def _init_weight(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str,
                     fp8: Fp8Config | None, misaligned: str | None) -> None:
        self.fp8 = fp8 if fp8 is not None and misaligned is None else None
        # Set when FP8 was asked for but this layer holds the model dtype; the loader logs it.
        self.fp8_fallback = misaligned if fp8 is not None else None
        self.weight_scale_inv = None
        if self.fp8 is None:
            self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)
            return
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape(rows, cols, self.fp8.block_size), dtype=torch.float32, device=device),
            requires_grad=False)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, self.weight, bias)
        assert self.weight_scale_inv is not None
        return kernels.fp8_linear(x, self.weight, self.weight_scale_inv, bias, self.fp8.block_size)

    def _copy_fp8(self, name: str, shard: Fp8Weight) -> None:
        assert self.fp8 is not None and self.weight_scale_inv is not None
        if shard.block_size != self.fp8.block_size:
            raise ValueError(f"{name}: checkpoint blocks {shard.block_size}, model expects {self.fp8.block_size}")
        _check_shape(name, shard.q, tuple(self.weight.shape))
        self.weight.copy_(shard.q)
        self.weight_scale_inv.copy_(shard.scale)


def _misaligned(kind: str, local: int, block: int, tp_size: int) -> str | None:
    if tp_size == 1 or local % block == 0:
        return None
    return f"its tp shard of {local} {kind} does not cut on {block}-multiples"


class ReplicatedLinear(_LinearWeight):
    """A linear layer every rank holds whole (e.g. the latent projection ``kv_a_proj_with_mqa``)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str,
        fp8: Fp8Config | None = None,
    ) -> None:
        super().__init__()
        self._init_weight(out_features, in_features, dtype, device, fp8, None)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def load_full(self, name: str, full: torch.Tensor | Fp8Weight) -> None:
        if isinstance(full, Fp8Weight):
            if self.fp8 is not None:
                self._copy_fp8(name, full)
                return
            full = full.dequantize()
        target = self.bias if name.endswith(".bias") else self.weight
        assert target is not None
        _check_shape(name, full, tuple(target.shape))
        target.copy_(full)


class ColumnParallelLinear(_LinearWeight):
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
        fp8: Fp8Config | None = None,
    ) -> None:
        super().__init__()
        if full_out_features % tp_size:
            raise ValueError(f"{full_out_features} output features cannot be split over {tp_size} ranks")
        self.in_features = in_features
        self.full_out_features = full_out_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        out_local = full_out_features // tp_size
        self.out_local = out_local
        misaligned = _misaligned("output rows", out_local, fp8.block_n, tp_size) if fp8 else None
        self._init_weight(out_local, in_features, dtype, device, fp8, misaligned)
        self.bias = (nn.Parameter(torch.zeros(out_local, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def load_full(self, name: str, full: torch.Tensor | Fp8Weight) -> None:
        if isinstance(full, Fp8Weight):
            _check_shape(name, full.q, (self.full_out_features, self.in_features))
            if self.fp8 is not None:
                start = self.tp_rank * self.out_local
                self._copy_fp8(name, full.rows(start, start + self.out_local))
                return
            full = full.dequantize()  # exact, then cut: the same values as dequantizing the shard
        is_bias = name.endswith(".bias")
        expected = (self.full_out_features,) if is_bias else (self.full_out_features, self.in_features)
        _check_shape(name, full, expected)
        target = self.bias if is_bias else self.weight
        assert target is not None
        target.copy_(full.chunk(self.tp_size, dim=0)[self.tp_rank])


class RowParallelLinear(_LinearWeight):
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
        fp8: Fp8Config | None = None,
    ) -> None:
        super().__init__()
        if full_in_features % tp_size:
            raise ValueError(f"{full_in_features} input features cannot be split over {tp_size} ranks")
        self.full_in_features = full_in_features
        self.out_features = out_features
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.reduce_results = reduce_results
        self.in_local = full_in_features // tp_size
        # Block-aligned input shards also keep the activation groups of the unsharded layer, so the
        # partial sums add up to the unsharded FP8 product.
        misaligned = _misaligned("input features", self.in_local, fp8.block_k, tp_size) if fp8 else None
        self._init_weight(out_features, self.in_local, dtype, device, fp8, misaligned)
        # The bias is added once, after the reduction, not on every rank.
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x, None)
        if self.reduce_results:
            out = all_reduce(out, self.group, self.tp_size)
        return out if self.bias is None else out + self.bias

    def load_full(self, name: str, full: torch.Tensor | Fp8Weight) -> None:
        if isinstance(full, Fp8Weight):
            _check_shape(name, full.q, (self.out_features, self.full_in_features))
            if self.fp8 is not None:
                start = self.tp_rank * self.in_local
                self._copy_fp8(name, full.cols(start, start + self.in_local))
                return
            full = full.dequantize()
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
