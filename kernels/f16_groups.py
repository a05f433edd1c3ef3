"""Activations as f16 with a power-of-two scale per row and column group: the torch side (the switch, the
rows' container, the reference). The GPU kernels and why: ``kernels.triton_f16_groups``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.backend import env_flag

# "1": the two-launch masked FP8 expert GEMMs at decode sizes take f16 activations where they would take bf16
# ones (W8A16); "0": never.
F16_DECODE_ENV = "TANDEM_FP8_DECODE_F16"


def f16_decode_wanted() -> bool:
    return env_flag(F16_DECODE_ENV)


class F16Rows(NamedTuple):
    """A decode MoE layer's inputs in f16 groups, written by the scatter: the masked rows ``[E, T, D]`` and
    their scales ``[E, T, ceil(D / group)]`` (rows past an expert's count unspecified), and the layer's
    tokens ``[T, D]`` (the shared experts' input) with theirs ``[T, ceil(D / group)]``."""

    rows: torch.Tensor
    row_scales: torch.Tensor
    hidden: torch.Tensor
    hidden_scales: torch.Tensor


def empty_f16_groups(lead: tuple[int, ...], width: int, group: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized f16 rows ``[*lead, width]`` and their float32 scales ``[*lead, ceil(width / group)]``."""
    return (torch.empty((*lead, width), dtype=torch.float16, device=device),
            torch.empty((*lead, -(-width // group)), dtype=torch.float32, device=device))


def f16_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` -> (f16 ``[..., K]``, float32 scales ``[..., ceil(K / group)]``): each group divided by
    the power of two that puts its largest magnitude in [2^14, 2^15) (2^-126 for groups below 2^-112), so
    ``q * s`` gives a bf16 ``x`` back exactly wherever a value is above 2^-29 of its group's largest."""
    k = x.shape[-1]
    pad = -k % group
    v = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, group))
    amax = v.abs().amax(-1)
    exponent = ((amax.view(torch.int32) >> 23) & 0xFF).clamp(15, 254)
    s = ((exponent - 14) << 23).view(torch.float32)
    q = (v * ((268 - exponent) << 23).view(torch.float32)[..., None]).to(torch.float16)
    return q.flatten(-2)[..., :k], s
