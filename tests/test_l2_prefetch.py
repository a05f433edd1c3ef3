"""The decode step's L2 prefetch of each layer's dense weights (kernels/l2_prefetch.py): its plan on CPU, the
weights a layer hands it, and what the launch compiles to on sm90. The GPU test that graphs with the launch give
the same logits is in tests/test_cuda_graph.py."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.model import DeepseekForCausalLM
from engine.moe import MoEBlock
from engine.tiny_model import write_tiny_model
from kernels import backend
from kernels.l2_prefetch import ALIGN, BUDGET_ENV, LayerPrefetch, PrefetchPlan, budget_bytes, byte_ranges, plan_chunks


def test_ranges_hold_each_byte_once_in_first_use_order_on_the_16_byte_grain() -> None:
    buffer = torch.empty(4096, dtype=torch.uint8)
    base = buffer.data_ptr()
    assert base % 64 == 0
    parts = [buffer[1000:1100], buffer[0:1024], buffer[3000:3100], buffer[1040:1060], buffer[3050:3300]]
    ranges = byte_ranges(parts)
    # The first part, widened to the grain; the buffer's head around it; a later part; nothing for a part
    # inside earlier ones; the tail of an overlapping one.
    assert [(s - base, e - base) for s, e in ranges] == [(992, 1104), (0, 992), (2992, 3104), (3104, 3312)]
    covered = sorted(ranges)
    assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:], strict=False))  # disjoint
    assert all(s % ALIGN == 0 and e % ALIGN == 0 for s, e in ranges)


def test_a_non_contiguous_or_empty_tensor_adds_no_range() -> None:
    matrix = torch.empty(64, 64)
    assert byte_ranges([matrix.t(), matrix[:, :3], torch.empty(0)]) == []
    assert byte_ranges([matrix[:2]]) == [(matrix.data_ptr(), matrix.data_ptr() + 2 * 64 * 4)]


def test_chunks_cover_the_ranges_in_order_up_to_the_budget() -> None:
    ranges = [(4096, 4096 + 100_000), (1 << 20, (1 << 20) + 48)]
    chunks = plan_chunks(ranges, budget=1 << 30, chunk=16 << 10)
    assert sum(size for _, size in chunks) == 100_000 + 48
    assert chunks[0] == (4096, 16 << 10) and chunks[-1] == (1 << 20, 48)
    assert all(a % ALIGN == 0 and s % ALIGN == 0 and 0 < s <= 16 << 10 for a, s in chunks)
    starts = [a for a, _ in chunks]
    assert starts == sorted(starts)  # first use first
    capped = plan_chunks(ranges, budget=40_000, chunk=16 << 10)
    assert sum(size for _, size in capped) == 40_000 // ALIGN * ALIGN
    assert capped == chunks[:2] + [(chunks[2][0], 40_000 - 2 * (16 << 10))]
    assert plan_chunks(ranges, budget=0) == []
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_chunks(ranges, budget=100, chunk=1000)


def test_the_budget_is_whole_megabytes_and_refuses_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert budget_bytes() == 0
    monkeypatch.setenv(BUDGET_ENV, "24")
    assert budget_bytes() == 24 << 20
    for bad in ("-1", "2.5", "lots", ""):
        monkeypatch.setenv(BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=BUDGET_ENV):
            budget_bytes()


def test_a_layer_hands_over_every_weight_but_the_routed_experts_and_nothing_launches_on_cpu(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig.from_dir(write_tiny_model(tmp_path, "v3", seed=1))
    model = DeepseekForCausalLM(config)
    for layer in model.model.layers:
        weights = {id(w) for w in layer.dense_weights()}
        everything = {id(p): name for name, p in layer.named_parameters()}
        left_out = sorted(everything[i] for i in set(everything) - weights)
        routed = ["mlp.w13", "mlp.w2"] if isinstance(layer.mlp, MoEBlock) else []
        assert left_out == routed
        assert layer.dense_weights()[0] is layer.input_layernorm.weight  # first use first
    monkeypatch.setenv(BUDGET_ENV, "64")
    assert PrefetchPlan.of(model.model.layers[0].dense_weights(), 64 << 20) is None
    assert model.model.layers[1].l2_prefetch.plan(torch.device("cpu")) is None
    assert LayerPrefetch(lambda: []).plan(torch.device("cpu")) is None


def test_the_launch_asks_l2_before_it_waits_on_the_kernel_ahead_when_compiled_for_sm90() -> None:
    """The order that makes it useful: the prefetches issue while the kernel ahead still drains, the wait after
    them, so the kernels behind it keep stream order. Compiled to PTX and through ptxas on this machine."""
    if not backend.triton_importable():
        pytest.skip("needs Triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.triton_l2_prefetch import LANES, _l2_prefetch_kernel

    signature = {"addr_ptr": "*i64", "size_ptr": "*i32", "count": "i32", "LANES": "constexpr", "PDL": "constexpr"}
    try:
        compiled = triton.compile(ASTSource(_l2_prefetch_kernel, signature, constexprs={"LANES": LANES, "PDL": True}),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    except RuntimeError as exc:  # no ptxas on this machine
        pytest.skip(f"cannot compile for sm90 here: {exc}")
    lines = [line.strip() for line in compiled.asm["ptx"].splitlines()]
    prefetch = next(i for i, line in enumerate(lines) if "cp.async.bulk.prefetch.L2.global" in line)
    wait = next(i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait"))
    assert prefetch < wait
    assert compiled.asm["cubin"]
