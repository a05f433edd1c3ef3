"""RMSNorm: the fused Triton kernel against the torch reference (`kernels.norm.rms_norm`).

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess), float32 only: the
interpreter truncates when it casts to bfloat16 where the GPU rounds to nearest, so bfloat16 is checked on
the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import kernels
from kernels import backend, norm

pytestmark = pytest.mark.skipif(not backend.triton_importable(), reason="needs Triton")


def _rows(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype=dtype, device=device)


def test_reference_is_the_transformers_formula() -> None:
    x, w = _rows((4, 64), torch.bfloat16, "cpu"), _rows((64,), torch.bfloat16, "cpu", seed=1)
    x32 = x.float()
    expected = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm.rms_norm(x, w, 1e-6), expected)


def _interpreted(code: str) -> dict[str, Any]:
    """Run `code` (which prints one JSON object) in a fresh interpreter under TRITON_INTERPRET=1: the mode is
    fixed when `@triton.jit` decorates, Triton's own library included, so it cannot be switched in-process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=240, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_triton_matches_reference_in_float32_interpreted() -> None:
    result = _interpreted(
        """
        import json, torch
        from kernels import norm
        from kernels.triton_norm import rms_norm_triton
        g = torch.Generator().manual_seed(0)
        out = {}
        for name, shape in {"latent": (5, 512), "v3-hidden": (1, 7168), "odd": (3, 100), "3d": (2, 3, 48)}.items():
            x, w = torch.randn(shape, generator=g) * 3, torch.randn(shape[-1:], generator=g)
            got, ref = rms_norm_triton(x, w, 1e-6), norm.rms_norm(x, w, 1e-6)
            out[name] = [list(got.shape) == list(shape), float((got - ref).abs().max() / ref.abs().max())]
        kv_a = torch.randn(6, 576, generator=g) * 3  # latent (512) + rope (64), sliced as the model does
        before, w = kv_a.clone(), torch.randn(512, generator=g)
        got, ref = rms_norm_triton(kv_a[:, :512], w, 1e-6), norm.rms_norm(kv_a[:, :512], w, 1e-6)
        out["strided"] = [torch.equal(kv_a, before), float((got - ref).abs().max() / ref.abs().max())]
        print(json.dumps(out))
        """
    )
    for name, (shape_ok, rel_err) in result.items():
        assert shape_ok, name
        assert rel_err < 1e-6, (name, rel_err)


def test_inputs_the_kernel_does_not_take_get_the_reference() -> None:
    from kernels.triton_norm import rms_norm_triton  # these never launch the kernel

    x = _rows((4, 32), torch.float32, "cpu")
    bf16_w = _rows((32,), torch.bfloat16, "cpu")
    assert torch.equal(rms_norm_triton(x, bf16_w, 1e-6), norm.rms_norm(x, bf16_w, 1e-6))  # weight dtype differs
    columns, w = x.t(), _rows((4,), torch.float32, "cpu")  # last stride is not 1
    assert torch.equal(rms_norm_triton(columns, w, 1e-6), norm.rms_norm(columns, w, 1e-6))
    assert rms_norm_triton(x[:0], _rows((32,), torch.float32, "cpu"), 1e-6).shape == (0, 32)


def test_the_op_picks_the_reference_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    x, w = _rows((2, 16), torch.float32, "cpu"), _rows((16,), torch.float32, "cpu", seed=1)
    assert kernels.get_op("rms_norm", x) is norm.rms_norm
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_matches_reference_and_replays_in_a_cuda_graph(dtype: torch.dtype) -> None:
    from kernels.triton_norm import rms_norm_triton

    x, w = _rows((64, 2048), dtype, "cuda"), _rows((2048,), dtype, "cuda", seed=1)
    ref = norm.rms_norm(x, w, 1e-6)
    got = rms_norm_triton(x, w, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
    else:  # only the float32 sum's order differs: a rounding may land one bf16 ulp away, rarely
        ulp = ref.float().abs() * 2.0**-7
        assert bool(((got.float() - ref.float()).abs() <= ulp + 1e-30).all())
        assert float((got != ref).float().mean()) < 0.01
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = rms_norm_triton(static_x, w, 1e-6)
    static_x.copy_(_rows((64, 2048), dtype, "cuda", seed=5))
    graph.replay()
    torch.testing.assert_close(static_out.float(), rms_norm_triton(static_x, w, 1e-6).float(), rtol=0, atol=0)
