"""FP8 block-scaled kernels on CPU: the activation quantizer, the torch references, Triton's interpreter.

The references must compute "quantize activations per 1x128 group, dequantize both operands, matmul":
checked here against float64 written out independently; the MoE ones against the bf16 MoE references
(kernels/moe.py) on the same dequantized weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fp8_cases import random_fp8_experts

import kernels
from kernels import fp8
from kernels.moe import moe_forward

ROOT = Path(__file__).resolve().parents[1]


def _blocks_f64(q: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
                                                                 .double() * scale[i, j].double())
    return out


def test_activation_groups_map_their_amax_to_448_and_round_to_nearest() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=gen) * torch.logspace(-3, 3, 5)[:, None]
    x[2, 128:256] = 0.0  # an all-zero group
    q, s = fp8.quantize_fp8_act(x)
    assert q.dtype == fp8.FP8_DTYPE and q.shape == x.shape and s.shape == (5, 3)
    for g in range(3):
        part = x[:, g * 128 : (g + 1) * 128]
        amax = part.abs().amax(dim=1)
        live = amax > 0
        # amax times float32(1/448): torch's own arithmetic for a tensor over a scalar on CUDA (kernels.fp8)
        torch.testing.assert_close(s[live, g], amax[live] * (1.0 / 448.0), rtol=0, atol=0)
        assert (q[live, g * 128 : (g + 1) * 128].float().abs().amax(dim=1) == 448.0).all()
    assert (q[2, 128:256].float() == 0).all()
    deq = fp8.dequantize_fp8_act(q, s)
    # e4m3 keeps 3 mantissa bits: normal values are within 2^-4 relative, subnormals within 2^-10 * scale.
    bound = torch.maximum(x.abs() * 2**-4, s.repeat_interleave(128, dim=1)[:, :300] * 2**-10)
    assert ((deq - x).abs() <= bound * (1 + 1e-6)).all()
    # Nearest, not truncation: the error is much smaller on average than the bound.
    assert ((deq - x).abs() / bound.clamp(min=1e-30)).mean() < 0.35


def test_each_group_has_its_own_scale() -> None:
    x = torch.ones(1, 256)
    x[0, 200] = 1000.0
    _, s = fp8.quantize_fp8_act(x)
    assert s[0, 0] == pytest.approx(1 / 448) and s[0, 1] == pytest.approx(1000 / 448)


def test_weight_quantization_round_trips_within_fp8_precision_on_partial_blocks() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=gen)
    q, s = fp8.quantize_fp8_weight(w)
    assert s.shape == (3, 2)
    deq = fp8.dequantize_fp8_weight(q, s)
    assert torch.equal(deq, _blocks_f64(q, s, 128, 128).float())
    assert ((deq - w).abs() <= w.abs() * 2**-4 + s.max() * 2**-9).all()
    gate_up = torch.cat([q, q])
    assert torch.equal(fp8.dequantize_fp8_gated(gate_up, torch.cat([s, s])), torch.cat([deq, deq]))


@pytest.mark.parametrize("act", ["fp8", "bf16"])
@pytest.mark.parametrize(("m", "n", "k", "block"), [(1, 256, 128, (128, 128)), (7, 300, 200, (128, 128)),
                                                   (33, 96, 160, (64, 32))])
def test_fp8_linear_reference_is_quantized_x_times_dequantized_w_in_float64(
        m: int, n: int, k: int, block: tuple[int, int], act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``act`` bf16 (W8A16) x goes in unquantized."""
    monkeypatch.setenv(fp8.ACT_ENV, act)
    gen = torch.Generator().manual_seed(m)
    w, ws = fp8.quantize_fp8_weight(torch.randn(n, k, generator=gen), block)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    xq, xs = fp8.quantize_fp8_act(x, block[1])
    x64 = xq.double() * xs.double().repeat_interleave(block[1], dim=1)[:, :k] if act == "fp8" else x.double()
    want = x64 @ _blocks_f64(w, ws, *block).T + bias.double()
    got = kernels.fp8_linear(x, w, ws, bias, block)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert kernels.fp8_linear(x.bfloat16(), w, ws, None, block).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scales"):
        kernels.fp8_linear(x, w, ws[:1], None, block)


@pytest.mark.parametrize("act", ["fp8", "bf16"])
def test_fp8_moe_reference_is_the_bf16_moe_on_dequantized_weights_within_fp8_noise(
        act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fp8.ACT_ENV, act)
    gen = torch.Generator().manual_seed(2)
    experts, hidden, inter, tokens, top_k = 6, 256, 192, 40, 2
    w13, s13, w2, s2 = random_fp8_experts(experts, hidden, inter, gen)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[::5, 0] = -1
    weights = torch.rand(tokens, top_k, generator=gen)
    got = kernels.fp8_moe_forward(x, ids, weights, w13, s13, w2, s2)
    ref = moe_forward(x, ids, weights, fp8.dequantize_fp8_gated(w13, s13), fp8.dequantize_fp8_weight(w2, s2))
    rel = ((got - ref).norm() / ref.norm()).item()
    if act == "fp8":
        assert 1e-4 < rel < 0.05, rel  # activation quantization noise, nothing more
    else:
        assert rel < 1e-5, rel  # W8A16: the dequantized weights, summed in another order


def test_fp8_masked_reference_equals_the_contiguous_one_on_the_same_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    experts, hidden, inter, capacity = 4, 256, 192, 6
    w13, s13, w2, s2 = random_fp8_experts(experts, hidden, inter, gen)
    counts = torch.tensor([0, 6, 2, 5])
    x = torch.randn(experts, capacity, hidden, generator=gen)
    got = kernels.fp8_moe_forward_masked(x, counts, w13, s13, w2, s2)
    for e, c in enumerate(counts.tolist()):
        rows = x[e, :c]
        ids = torch.full((c, 1), e)
        want = fp8.fp8_moe_forward(rows, ids, torch.ones(c, 1), w13, s13, w2, s2)
        torch.testing.assert_close(got[e, :c], want, rtol=1e-6, atol=1e-6)
        assert (got[e, c:] == 0).all()


def test_the_cpu_backend_runs_the_fp8_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_KERNELS", raising=False)
    for op in ("quantize_fp8_act", "fp8_linear", "fp8_moe_forward", "fp8_moe_forward_masked"):
        assert kernels.get_op(op, torch.zeros(1)) is getattr(fp8, op)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_the_weight_conversion_switch_takes_cvt_or_bits_and_moves_bits_only_for_bf16_on_sm90(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import triton_fp8 as tf

    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    monkeypatch.setenv(tf.W8A16_CONVERT_ENV, "bits")
    assert not tf.w8a16_bits(x)  # CPU tensors (the interpreter) run Triton's conversion
    monkeypatch.setenv(tf.W8A16_CONVERT_ENV, "fast")
    with pytest.raises(ValueError, match="expected cvt or bits"):
        tf.w8a16_bits(x)
    monkeypatch.delenv(tf.W8A16_CONVERT_ENV)
    assert not tf.w8a16_bits(x)

    class OnGpu:  # what w8a16_bits reads of a CUDA tensor, on a machine without one
        is_cuda, dtype, device = True, torch.bfloat16, torch.device("cuda", 0)

    for capability, bits in (((9, 0), True), ((8, 9), False)):  # sm89 has FP8 but not sm90's mul.rn.bf16x2
        monkeypatch.setattr(tf, "device_facts", lambda _index, c=capability: (c, 132))
        assert tf.w8a16_bits(OnGpu()) is bits  # type: ignore[arg-type]
        monkeypatch.setenv(tf.W8A16_CONVERT_ENV, "cvt")
        assert not tf.w8a16_bits(OnGpu())  # type: ignore[arg-type]
        monkeypatch.delenv(tf.W8A16_CONVERT_ENV)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_triton_fp8_kernels_match_the_references_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fp8_interpret_check.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_gemm_bench_quick_runs_on_cpu_and_writes_json_and_png(tmp_path: Path) -> None:
    from bench.gemm import main

    results = main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert (tmp_path / "gemm_cpu_quick.png").stat().st_size > 0
    saved = json.loads((tmp_path / "gemm_cpu_quick.json").read_text())
    assert saved["dense"] and {r["layout"] for r in saved["grouped"]} == {"contiguous", "masked"}
    for row in results["dense"] + results["grouped"]:
        ref = row["torch_reference"]
        assert ref["ms"] > 0 and row["bf16"]["ms"] > 0 and ref["ratio"] == pytest.approx(row["bf16"]["ms"] / ref["ms"])
        assert ref["rel_err"] < 0.05  # bf16 inputs against the float32 reference: rounding only
        if row.get("layout") == "masked":  # also beside torch's bmm over the capacity rows
            assert ref["ratio_torch"] == pytest.approx(row["bf16_torch"]["ms"] / ref["ms"])


def test_gemm_bench_lays_the_masked_experts_out_at_a_backends_row_multiple(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that stores whole row tiles (DeepGEMM: 128) gets the masked layout at a capacity of whole tiles,
    padded outside the timing; its output's rows past the bench's capacity are left out of the comparison."""
    import bench.gemm

    monkeypatch.setattr(bench.gemm, "MASKED_LAYOUT_MULTIPLE", {"torch_reference": 128})
    results = bench.gemm.main(["--quick", "--device", "cpu", "--grouped-only", "--out-dir", str(tmp_path)])
    masked = [row for row in results["grouped"] if row["layout"] == "masked"]
    assert masked
    for row in masked:
        assert row["capacity"] % 128 and row["torch_reference"]["capacity"] == 128 * -(-row["capacity"] // 128)
        assert row["torch_reference"]["rel_err"] < 0.05
    assert all("capacity" not in row["torch_reference"] for row in results["grouped"] if row["layout"] != "masked")


def test_the_gemm_benchs_torch_masked_experts_equal_the_masked_reference() -> None:
    from bench.gemm import masked_bmm
    from kernels.moe import moe_forward_masked

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    counts = torch.tensor([5, 2, 0])
    x[1, 2:] = 0.0  # the layout's rows past each count are zeros
    x[2] = 0.0
    w13, w2 = torch.randn(3, 24, 16, generator=g), torch.randn(3, 16, 12, generator=g)
    torch.testing.assert_close(masked_bmm(x, w13, w2), moe_forward_masked(x, counts, w13, w2))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_a_grouped_launch_steps_its_pipeline_down_until_the_tile_fits_shared_memory() -> None:
    """Triton refuses a tile whose buffers exceed the device's shared memory before launching anything: the
    grouped FP8 launches retry with one stage fewer, remember what fitted, and give up below one stage."""
    from triton.runtime.errors import OutOfResources

    from kernels import triton_fp8_moe
    from kernels.triton_fp8 import Fp8GemmConfig

    cfg = Fp8GemmConfig(block_m=64, block_n=256, group_m=8, num_warps=8, num_stages=4)
    key = (cfg, True, False, False)
    triton_fp8_moe._STAGES_THAT_FIT.pop(key, None)
    tried: list[int] = []

    def launch(stages: int) -> None:
        tried.append(stages)
        if stages > 2:
            raise OutOfResources(stages * 81920, 232448, "shared memory")

    triton_fp8_moe._launch_fitting(launch, key, cfg.num_stages)
    assert tried == [4, 3, 2] and triton_fp8_moe._STAGES_THAT_FIT[key] == 2
    tried.clear()
    triton_fp8_moe._launch_fitting(launch, key, cfg.num_stages)  # the next launch starts where it fitted
    assert tried == [2]
    never = (Fp8GemmConfig(16, 32, 1, 4, 2), False, True, False)
    with pytest.raises(OutOfResources):
        triton_fp8_moe._launch_fitting(lambda stages: launch(stages + 9), never, 2)
    triton_fp8_moe._STAGES_THAT_FIT.pop(key, None)
    triton_fp8_moe._STAGES_THAT_FIT.pop(never, None)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_decode_tile_overrides_set_the_few_row_tiles_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's decode tiles (a sweep's pick for another GPU) replace the few-row defaults of the dense
    and the grouped FP8 GEMMs, split K as asked, leave prefill tiles alone, and refuse what is not integers."""
    from kernels import triton_fp8, triton_fp8_moe

    default_dense = triton_fp8.dense_gemm_config(1)
    default_grouped = triton_fp8_moe.grouped_gemm_config(1)
    monkeypatch.setenv(triton_fp8.DENSE_DECODE_TILE_ENV, "64,2,3,4")
    monkeypatch.setenv(triton_fp8_moe.MOE_DECODE_TILE_ENV, "16,2,3")
    dense = triton_fp8.dense_gemm_config(1)
    assert (dense.block_m, dense.block_n, dense.num_warps, dense.num_stages) == (16, 64, 2, 3) != default_dense
    assert triton_fp8.choose_split_k(1, 3648, 16, dense, 132) == 4
    assert triton_fp8.choose_split_k(1, 3648, 2, dense, 132) == 2  # never more splits than K blocks
    grouped = triton_fp8_moe.grouped_gemm_config(1)
    assert (grouped.block_n, grouped.num_warps, grouped.num_stages) == (16, 2, 3) != default_grouped
    assert triton_fp8.dense_gemm_config(4096).block_m == 128
    assert triton_fp8_moe.grouped_gemm_config(512).block_n == 256
    monkeypatch.setenv(triton_fp8.DENSE_DECODE_TILE_ENV, "64,two")
    # Prefill sizes: the down launch's own stages; a config given alone sets both launches, down_config the down.
    gated, down = triton_fp8_moe._launch_configs(512, None, None)
    assert (gated.num_stages, down.num_stages) == (3, 4) and gated.block_n == down.block_n == 256
    one, two = triton_fp8.Fp8GemmConfig(16, 32, 1, 4, 2), triton_fp8.Fp8GemmConfig(32, 64, 1, 4, 3)
    assert triton_fp8_moe._launch_configs(512, one, None) == (one, one)
    assert triton_fp8_moe._launch_configs(512, one, two) == (one, two)
    with pytest.raises(ValueError, match="TANDEM_FP8_DENSE_DECODE_TILE"):
        triton_fp8.dense_gemm_config(1)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_gemv_tile_caps_the_preload_and_takes_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-row GEMV: on unless switched off, for one row only; 4 columns a program and the most K blocks (a
    power of two) within PRELOAD_BYTES; a hand-set tile replaces the choice or is refused when it is not three
    integers; operands not contiguous in their last dim are refused."""
    from kernels import triton_fp8_gemv as tfg

    assert tfg.gemv_max_rows() == 1
    monkeypatch.setenv(tfg.GEMV_ENV, "0")
    assert tfg.gemv_max_rows() == 0
    monkeypatch.setenv(tfg.GEMV_ENV, "yes")
    with pytest.raises(ValueError, match=tfg.GEMV_ENV):
        tfg.gemv_max_rows()
    assert tfg.gemv_config(16, 128) == tfg.GemvConfig(4, 4, 16)  # V2-Lite: K = 2048, all of it before the wait
    v3_qa = tfg.gemv_config(56, 128)  # V3's fused q_a + kv_a: K = 7168
    assert v3_qa == tfg.GemvConfig(4, 4, 32) and 4 * v3_qa.chunk_kb * 128 <= tfg.PRELOAD_BYTES
    assert tfg.gemv_config(11, 128).chunk_kb == 8 and tfg.gemv_config(1, 128).chunk_kb == 1
    monkeypatch.setenv(tfg.GEMV_TILE_ENV, "16,8,2")
    assert tfg.gemv_config(16, 128) == tfg.GemvConfig(16, 8, 2)
    assert tfg.gemv_config(1, 128).chunk_kb == 1  # never more than K has
    monkeypatch.setenv(tfg.GEMV_TILE_ENV, "16,8")
    with pytest.raises(ValueError, match=tfg.GEMV_TILE_ENV):
        tfg.gemv_config(16, 128)
    # Scales read as rows of K blocks: a transposed view is refused, not read wrong.
    w, ws = fp8.quantize_fp8_weight(torch.randn(256, 384))
    with pytest.raises(ValueError, match="contiguous"):
        tfg.fp8_gemv_triton(torch.randn(1, 384), w, ws.t().contiguous().t(), None)
