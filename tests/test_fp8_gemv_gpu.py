"""The one-row dense FP8 GEMV on the GPU (``kernels.triton_fp8_gemv``): what the kernel before wrote is read after
the PDL wait, the weights before it, over CUDA-graph replays.

    python -m pytest -q tests/test_fp8_gemv_gpu.py        (skipped without CUDA + Triton)
"""

from __future__ import annotations

import pytest
import torch
from fp8_cases import BF16_TOL, gpu_test, rel_err

from kernels import fp8


@gpu_test
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_chain_reads_what_the_kernel_before_wrote_over_graph_replays(rows: int) -> None:
    """``kernels.triton_fp8_gemv`` loads its weights before the PDL wait and its activation after: three GEMVs
    in a chain, each reading the row the one before wrote (V2-Lite's fused q + kv_a shape, then K = 3648 with a
    partial K block), captured in a graph and replayed on new inputs, give the eager chain's bits every time, and
    stay within bf16 rounding of the dequantized reference (at 1 row, what the model runs, and at 3)."""
    from kernels.triton_fp8_gemv import fp8_gemv_triton

    gen = torch.Generator(device="cuda").manual_seed(rows)
    shapes = [(3648, 2048), (2048, 3648), (2048, 2048)]
    weights = [fp8.quantize_fp8_weight(torch.randn(n, k, device="cuda", generator=gen) / k**0.5) for n, k in shapes]

    def chain(x: torch.Tensor) -> torch.Tensor:
        for w, ws in weights:
            x = fp8_gemv_triton(x, w, ws, None)
        return x

    x = torch.randn(rows, 2048, device="cuda", generator=gen).bfloat16()
    ref = x.float()
    for w, ws in weights:
        ref = fp8.fp8_linear(ref.bfloat16().float(), w, ws)
    assert rel_err(chain(x), ref) < 3 * BF16_TOL
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        chain(x)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = [chain(x) for _ in range(4)]
    for _ in range(20):
        x.copy_(torch.randn(rows, 2048, device="cuda", generator=gen))
        want = chain(x)
        graph.replay()
        torch.cuda.synchronize()
        for out in outs:
            assert torch.equal(out, want)

