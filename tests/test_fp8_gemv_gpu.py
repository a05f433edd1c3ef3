"""The decode GEMVs with FP8 weights on the GPU (``kernels.triton_fp8_gemv``, ``kernels.triton_fp8_moe_gemv``):
what the kernel before wrote is read after the PDL wait, the weights before it, over CUDA-graph replays.

    python -m pytest -q tests/test_fp8_gemv_gpu.py        (skipped without CUDA + Triton)
"""

from __future__ import annotations

import pytest
import torch
from fp8_cases import BF16_TOL, gpu_test, random_fp8_experts, rel_err, route_masked

from kernels import fp8


@gpu_test
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_chain_reads_what_the_kernel_before_wrote_over_graph_replays(rows: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernels.triton_fp8_gemv`` loads its weights before the PDL wait and its activation after: three GEMVs
    in a chain, each reading the row the one before wrote (V2-Lite's fused q + kv_a shape, then K = 3648 with a
    partial K block), captured in a graph and replayed on new inputs, give the eager chain's bits every time, and
    stay within bf16 rounding of the dequantized reference."""
    from kernels import triton_fp8_gemv as tfg
    from kernels.triton_fp8 import fp8_linear_triton

    monkeypatch.setenv(tfg.GEMV_ENV, "1")
    gen = torch.Generator(device="cuda").manual_seed(rows)
    shapes = [(3648, 2048), (2048, 3648), (2048, 2048)]
    weights = [fp8.quantize_fp8_weight(torch.randn(n, k, device="cuda", generator=gen) / k**0.5) for n, k in shapes]

    def chain(x: torch.Tensor) -> torch.Tensor:
        for w, ws in weights:
            x = fp8_linear_triton(x, w, ws)
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


@gpu_test
@pytest.mark.parametrize(("experts", "hidden", "inter", "shared_inter", "capacity", "active_count"),
                         [(64, 2048, 1408, 2816, 1, 6), (64, 2048, 1408, 2816, 4, 20), (32, 7168, 2048, 2048, 1, 8),
                          (8, 256, 192, 320, 3, 8)])  # V2-Lite at batch 1 and 4, V3 at EP8, odd blocks
def test_the_decode_moe_as_gemvs_matches_the_tiled_launches_over_graph_replays(
        experts: int, hidden: int, inter: int, shared_inter: int, capacity: int, active_count: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.triton_fp8_moe_gemv in a CUDA graph behind the launch that lists the active experts (the down
    launch reads that list before its PDL wait), replayed with new routings: every active expert's rows and the
    shared experts' within bf16 rounding of the tiled launches, rows past each count zero, and the eager GEMVs'
    bits."""
    from kernels import triton_fp8_moe_gemv as tfmg
    from kernels.triton_decode_fused import active_experts_triton
    from kernels.triton_fp8_moe import fp8_moe_forward_masked_shared_triton

    gen = torch.Generator(device="cuda").manual_seed(capacity + experts)
    w13, s13, w2, s2 = random_fp8_experts(experts, hidden, inter, gen)
    sw13, ss13, sw2, ss2 = random_fp8_experts(1, hidden, shared_inter, gen)
    counts = torch.zeros(experts, dtype=torch.int32, device="cuda")
    x = torch.randn(experts, capacity, hidden, device="cuda", generator=gen).bfloat16()
    hidden_rows = torch.randn(capacity, hidden, device="cuda", generator=gen).bfloat16()

    def moe() -> tuple[torch.Tensor, torch.Tensor]:
        active = (active_experts_triton(counts), active_count)
        return fp8_moe_forward_masked_shared_triton(x, counts, w13, s13, w2, s2, hidden_rows, sw13[0], ss13[0],
                                                    sw2[0], ss2[0], active=active)

    def rows_of_active(routed: torch.Tensor) -> torch.Tensor:
        return torch.where((counts > 0)[:, None, None], routed, 0.0)

    route_masked(counts, active_count, capacity, 0)
    monkeypatch.setenv(tfmg.GEMV_ENV, "1")
    moe()  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe()
    for seed in range(5):
        route_masked(counts, active_count, capacity, seed)
        graph.replay()
        torch.cuda.synchronize()
        eager = moe()
        monkeypatch.setenv(tfmg.GEMV_ENV, "0")
        routed, shared = moe()
        monkeypatch.setenv(tfmg.GEMV_ENV, "1")
        assert torch.equal(rows_of_active(captured[0]), rows_of_active(eager[0])), seed
        assert torch.equal(captured[1], eager[1]), seed
        assert rel_err(rows_of_active(captured[0]), rows_of_active(routed)) < BF16_TOL, seed
        assert rel_err(captured[1], shared) < BF16_TOL, seed
        for e in torch.nonzero(counts).flatten().tolist():
            assert not captured[0][e, int(counts[e]):].any(), (seed, e)
