"""A CPU stand-in for DeepGEMM's SM90 FP8 entry points, for tests/deepgemm_fake_check.py only.

It keeps what DeepGEMM's host code asserts (csrc/apis/gemm.hpp, csrc/apis/layout.hpp, csrc/utils/layout.hpp at
the pinned commit: K-major operands, packed [E, N, K] weights, bf16 N-major outputs, scale shapes, int32 row
and count tensors) and how its kernels cover rows: contiguous layout in 128-row blocks whose expert is the
block's first row's, 64-row halves skipped where their first row is -1; masked layout in whole 128-row tiles
stored into [E * M, N], so a tile that would cross into the next expert's rows is an error here. The math is
float32 with bf16 outputs. It checks tandem's wrappers (kernels.fp8_deepgemm) against that contract, not
DeepGEMM itself.
"""

from __future__ import annotations

import torch

__version__ = "cpu-stand-in"
BLOCK_M = 128
# (entry point, whether the activation scales came M-major and TMA-aligned, i.e. without a transpose inside)
CALLS: list[tuple[str, bool]] = []


def get_mk_alignment_for_contiguous_layout() -> int:
    return BLOCK_M


def _k_major(t: torch.Tensor, dims: int) -> None:
    assert t.dim() == dims and t.dtype == torch.float8_e4m3fn, (t.shape, t.dtype)
    if dims == 3:
        assert t.stride(0) == t.size(-2) * t.size(-1), "3-D operands must be packed (major_check)"
    assert t.stride(-1) == 1, "SM90 FP8 operands are K-major"


def _check_d(d: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert d.shape == shape and d.dtype == torch.bfloat16 and d.stride(-1) == 1, (d.shape, shape, d.dtype)


def _scales_a(sf: torch.Tensor, m: int, k: int, groups: int | None = None) -> bool:
    assert sf.dtype == torch.float32 and sf.shape == ((groups,) if groups else ()) + (m, -(-k // 128)), sf.shape
    return sf.stride(-2) == 1 and sf.stride(-1) == -(-m // 4) * 4


def _scales_b(sf: torch.Tensor, n: int, k: int, groups: int | None = None) -> None:
    assert sf.dtype == torch.float32 and sf.shape == ((groups,) if groups else ()) + (-(-n // 128), -(-k // 128))
    if groups:
        assert sf.stride(0) == sf.size(1) * sf.size(2)
    assert (sf.stride(-1) == 1 and sf.stride(-2) == sf.size(-1)) or (sf.stride(-1) == sf.size(-2) and sf.stride(-2) == 1)


def _deq_a(a: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    return a.float() * sf.repeat_interleave(128, dim=-1)[..., : a.shape[-1]]


def _deq_b(b: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    n, k = b.shape[-2:]
    return b.float() * sf.repeat_interleave(128, dim=-2)[..., :n, :].repeat_interleave(128, dim=-1)[..., :k]


def fp8_gemm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: torch.Tensor | None = None, recipe: tuple[int, int, int] | None = None, **_: object) -> None:
    assert c is None and recipe == (1, 128, 128)
    _k_major(a[0], 2)
    _k_major(b[0], 2)
    (m, k), n = a[0].shape, b[0].shape[0]
    _check_d(d, (m, n))
    CALLS.append(("fp8_gemm_nt", _scales_a(a[1], m, k)))
    _scales_b(b[1], n, k)
    d.copy_((_deq_a(*a) @ _deq_b(*b).t()).bfloat16())


def m_grouped_fp8_gemm_nt_contiguous(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, grouped_layout: torch.Tensor,
                                     recipe: tuple[int, int, int] | None = None, use_psum_layout: bool = False,
                                     **_: object) -> None:
    assert recipe == (1, 128, 128) and not use_psum_layout
    _k_major(a[0], 2)
    _k_major(b[0], 3)
    (m, k), (groups, n, _k) = a[0].shape, b[0].shape
    _check_d(d, (m, n))
    assert grouped_layout.dtype == torch.int32 and grouped_layout.is_contiguous() and grouped_layout.shape == (m,)
    assert m % BLOCK_M == 0, "each expert's run is padded to the block size"
    CALLS.append(("m_grouped_fp8_gemm_nt_contiguous", _scales_a(a[1], m, k)))
    _scales_b(b[1], n, k, groups)
    rows_a, weights = _deq_a(*a), _deq_b(*b)
    d.fill_(float("nan"))  # what the kernel leaves in skipped halves is nobody's to read
    for block in range(m // BLOCK_M):
        expert = max(0, int(grouped_layout[block * BLOCK_M]))
        for first in (block * BLOCK_M, block * BLOCK_M + 64):
            if int(grouped_layout[first]) >= 0:
                d[first:first + 64] = (rows_a[first:first + 64] @ weights[expert].t()).bfloat16()


def m_grouped_fp8_gemm_nt_masked(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                 d: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
                                 recipe: tuple[int, int, int] | None = None, **_: object) -> None:
    assert recipe == (1, 128, 128) and expected_m > 0
    _k_major(a[0], 3)
    _k_major(b[0], 3)
    (groups, m, k), n = a[0].shape, b[0].shape[1]
    _check_d(d, (groups, m, n))
    assert masked_m.dtype == torch.int32 and masked_m.is_contiguous() and masked_m.shape == (groups,)
    CALLS.append(("m_grouped_fp8_gemm_nt_masked", _scales_a(a[1], m, k, groups)))
    _scales_b(b[1], n, k, groups)
    rows_a, weights, flat_d = _deq_a(*a).reshape(groups * m, k), _deq_b(*b), d.view(groups * m, n)
    for expert in range(groups):
        count = int(masked_m[expert])
        for tile in range(-(-count // BLOCK_M)):
            first = expert * m + tile * BLOCK_M
            assert first + BLOCK_M <= (expert + 1) * m, "a tile store would cross into the next expert's rows"
            flat_d[first:first + BLOCK_M] = 1e4  # rows past the count: whatever the kernel made of unwritten rows
            valid = min(BLOCK_M, count - tile * BLOCK_M)
            flat_d[first:first + valid] = (rows_a[first:first + valid] @ weights[expert].t()).bfloat16()
