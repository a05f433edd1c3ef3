"""What the FP8 kernel tests share (tests/test_fp8_kernels_ref.py on the CPU, tests/test_fp8_gpu.py and
tests/test_fp8_deepgemm_gpu.py on the GPU): random block-quantized experts, the error measure, its bf16 bound,
the NaN poisoning that makes an unwritten output element fail, and the GPU tests' marker."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels import backend, fp8

BF16_TOL = 1e-2  # ||out - ref|| / ||ref||: bf16 output rounding (2^-9) plus accumulation order


def gpu_test(fn: Callable[..., None]) -> Callable[..., None]:
    """Marks a test ``gpu`` and skips it without CUDA or Triton."""
    fn = pytest.mark.skipif(not backend.triton_importable(), reason="needs Triton")(fn)
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn)
    return pytest.mark.gpu(fn)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def poison_freed_cuda_memory() -> None:
    # NaN in freed cache blocks: an output element a kernel forgets to write cannot pass.
    torch.empty(1 << 28, dtype=torch.float32, device="cuda").fill_(float("nan"))


def random_fp8_experts(num: int, hidden: int, inter: int,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13, its scales, w2, its scales) of ``num`` experts on ``gen``'s device, gate and up quantized apart (each
    half keeps its own block rows, as the checkpoint's separate gate_proj / up_proj do)."""
    device = gen.device
    parts = [fp8.quantize_fp8_weight(torch.randn(num, inter, hidden, device=device, generator=gen) / hidden**0.5)
             for _ in range(2)]
    w13 = torch.cat([parts[0][0], parts[1][0]], dim=1)
    s13 = torch.cat([parts[0][1], parts[1][1]], dim=1)
    w2, s2 = fp8.quantize_fp8_weight(torch.randn(num, hidden, inter, device=device, generator=gen) / inter**0.5)
    return w13, s13, w2, s2


def random_routed_tokens(tokens: int, hidden: int, experts: int, top_k: int,
                         gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bf16 tokens ``[T, D]``, their ``top_k`` distinct experts with every third token's first slot on another
    rank (-1), float32 routing weights) on ``gen``'s device: the contiguous layout's input."""
    device = gen.device
    x = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16()
    ids = torch.rand(tokens, experts, device=device, generator=gen).topk(top_k, dim=1).indices
    ids[::3, 0] = -1  # experts on other ranks
    return x, ids, torch.rand(tokens, top_k, device=device, generator=gen)


