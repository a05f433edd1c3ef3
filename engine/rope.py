"""Rotary embedding for the rope part of MLA's q/k, with YaRN scaling (DeepSeek-V2/V3).

Pairs are rotated as in transformers: interleaved pairs ``(x0, x1), (x2, x3), ...`` when
``rope_interleave`` (DeepSeek's layout), halves otherwise. The output is always laid out as
``[rotated evens | rotated odds]``; q and k get the same permutation, so q·k is unchanged and the
KV pool stores k_pe in that layout.
"""

from __future__ import annotations

import math

import torch

from engine.config import RopeConfig, yarn_mscale


def rope_inv_freq_and_scale(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim/2]`` (float32) and the factor cos/sin are multiplied by."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables for positions ``[0, max_positions)``, grown on demand; applies the rotation."""

    def __init__(self, rope: RopeConfig, dim: int, interleave: bool, max_positions: int,
                 device: torch.device | str) -> None:
        self.dim = dim
        self.interleave = interleave
        self.inv_freq, self.scale = rope_inv_freq_and_scale(rope, dim)
        self.inv_freq = self.inv_freq.to(device)
        self.device = torch.device(device)
        self._cos = torch.empty(0, dim // 2, device=device)
        self._sin = torch.empty(0, dim // 2, device=device)
        self._grow(max_positions)

    def _grow(self, n: int) -> None:
        positions = torch.arange(n, dtype=torch.float32, device=self.device)
        freqs = positions[:, None] * self.inv_freq[None, :]
        self._cos = freqs.cos() * self.scale
        self._sin = freqs.sin() * self.scale

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for ``positions`` ``[T]`` -> two float32 tensors ``[T, dim/2]``."""
        if positions.numel() and int(positions.max()) >= self._cos.shape[0]:
            self._grow(max(int(positions.max()) + 1, 2 * self._cos.shape[0]))
        return self._cos[positions], self._sin[positions]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[T, ..., dim]`` with per-token ``cos``/``sin`` ``[T, dim/2]``."""
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2 :]
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        c = cos.view(shape).to(x.dtype)
        s = sin.view(shape).to(x.dtype)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
