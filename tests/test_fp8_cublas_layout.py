"""kernels.fp8_cublas on any machine: the weight-scale layouts cuBLAS reads, and when the dense FP8 GEMM goes
there (the GEMM itself runs in tests/test_fp8_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from kernels import fp8_cublas


@pytest.mark.parametrize("blocks", [3, 4, 11, 56])
def test_every_weight_scale_layout_holds_the_transposed_scales(blocks: int) -> None:
    scales = torch.rand(5, blocks) + 0.5  # [N/128, K/128]
    l4 = -(-blocks // 4) * 4  # cuBLAS's L4: each N block's row of K-block scales padded to 4n blocks
    t_view = fp8_cublas.cublas_weight_scale(scales, "t_view")
    assert t_view.shape == (blocks, 5) and t_view.stride() == (1, blocks) and torch.equal(t_view, scales.t())
    padded = fp8_cublas.cublas_weight_scale(scales, "padded")
    assert padded.shape == (l4, 5) and padded.stride() == (1, l4)
    assert torch.equal(padded[:blocks], scales.t()) and not padded[blocks:].any()


def test_cpu_tensors_never_go_to_cublas_and_the_switch_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.zeros(256, 512), torch.zeros(256, 512, dtype=torch.float8_e4m3fn)
    monkeypatch.delenv(fp8_cublas.GEMM_ENV, raising=False)
    assert fp8_cublas.DEFAULT_CHOICE == "auto" and not fp8_cublas.use_cublas(x, w, (128, 128))
    for choice in ("auto", "triton", "cublas", "deepgemm"):
        monkeypatch.setenv(fp8_cublas.GEMM_ENV, choice)
        assert not fp8_cublas.use_cublas(x, w, (128, 128))
    monkeypatch.setenv(fp8_cublas.GEMM_ENV, "cutlass")
    with pytest.raises(ValueError, match="auto, triton, cublas or deepgemm"):
        fp8_cublas.use_cublas(x, w, (128, 128))
