"""kernels.f16_groups: bf16 activations as f16 with a power-of-two scale per group, exactly."""

from __future__ import annotations

import pytest
import torch

from kernels.f16_groups import f16_groups


@pytest.mark.parametrize("magnitude", [1.0, 3e4, 1e-4, 1e30])
def test_bf16_rows_come_back_exactly_from_their_f16_groups(magnitude: float) -> None:
    """Every value within 2^-29 of its group's largest survives ``q * s`` bit for bit, past f16's range (3e4 x
    a normal row reaches 1e5), deep in its subnormals unscaled (1e-4) and far past both (1e30); a last group cut
    short (200 columns) and an all-zero group too."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 200, generator=gen) * magnitude).bfloat16()
    x[1, 128:] = 0.0
    q, s = f16_groups(x, 128)
    assert q.dtype == torch.float16 and q.shape == x.shape and s.shape == (5, 2)
    back = q.float() * s.repeat_interleave(128, dim=-1)[:, :200]

    def group_max(v: torch.Tensor) -> torch.Tensor:  # [5, 2]: each row's two groups (the second padded)
        return torch.nn.functional.pad(v.float().abs(), (0, 56)).unflatten(-1, (2, 128)).amax(-1)

    big = x.float().abs() > group_max(x).repeat_interleave(128, -1)[:, :200] * 2.0**-29
    assert torch.equal(back[big], x.float()[big])
    assert bool((back[1, 128:] == 0).all()) and bool(torch.isfinite(back).all())
    # The largest magnitude of each group lands in [2^14, 2^15): f16's top binade but one, never overflowing.
    top = group_max(q)
    assert bool(((top >= 2**14) & (top < 2**15) | (top == 0)).all())
