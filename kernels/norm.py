"""RMSNorm, the torch reference (DeepSeek/T5 formulation, transformers' rounding)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise each row of `x` (last dim) in float32, round to `x`'s dtype, then scale by `weight`."""
    in_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(in_dtype)
