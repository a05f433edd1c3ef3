"""DeepGEMM's FP8 GEMMs (kernels.fp8_deepgemm) against the torch references, on an sm90 GPU.

    python -m pytest -q tests/test_fp8_deepgemm_gpu.py     (GPU tests skip without CUDA or a DeepGEMM build)

DeepGEMM is built from carried sources by scripts/build_deepgemm.sh (its env file puts it on PYTHONPATH). It
multiplies FP8 by FP8 at every size, so the references run with TANDEM_FP8_ACT=fp8 (activations quantized
per 1 x 128 group, as ours are). Dense: V3 projections at 1, 64 and 4096 rows against ``fp8.fp8_linear``
(tolerance as tests/test_fp8_gpu.py's: bf16 output rounding plus accumulation order). Grouped (32 local
experts = EP8, hidden 7168, intermediate 2048; V2-Lite's 64 x 2048 / 1408): against the references at
GROUPED_REF_TOL, because DeepGEMM writes the first GEMM's gate and up in bf16 before SiLU * up (Triton keeps
them in fp32; a CPU emulation of that rounding put V3's expert output 1.55 % from the reference), and
against that emulation (``_deepgemm_expert``, built from the same references) at BF16_TOL.
The first call of each shape JIT-compiles DeepGEMM's kernels (seconds each, cached in DG_JIT_CACHE_DIR).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fp8_cases import (
    BF16_TOL,
    poison_freed_cuda_memory,
    random_fp8_experts,
    random_routed_tokens,
    rel_err,
)

from kernels import fp8, fp8_deepgemm, moe
from kernels.fp8_cublas import GEMM_ENV

GROUPED_REF_TOL = 3 * BF16_TOL  # plus DeepGEMM's bf16 gate/up (1.55 % at V3's expert shape, CPU emulation)
DENSE_SHAPES = [(18432, 7168), (7168, 18432), (2112, 7168), (24576, 1536)]  # V3: dense gate/up, down, qkv_a, q_b
ROWS = [1, 64, 4096]
gpu = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fp8_activations(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU tests need DeepGEMM running here; every test's references quantize activations as DeepGEMM's do."""
    monkeypatch.setenv(fp8.ACT_ENV, "fp8")
    if request.node.get_closest_marker("gpu") and not fp8_deepgemm.available():
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        pytest.skip(f"DeepGEMM does not run here: {'; '.join(fp8_deepgemm.PROBE_LOG.get(index, ['no CUDA']))}")


def _deepgemm_expert(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor,
                     s2: torch.Tensor) -> torch.Tensor:
    """One expert as DeepGEMM's path computes it (bf16 rows in, bf16 out): the gate/up GEMM written in bf16,
    SiLU(gate) * up rounded as silu_mul_triton rounds it, the down GEMM; fp32 math inside each GEMM."""
    return fp8.fp8_linear(moe.silu_mul(fp8.fp8_linear(x, w13, s13)), w2, s2)


@gpu
@pytest.mark.parametrize("nk", DENSE_SHAPES, ids=lambda nk: f"N{nk[0]}xK{nk[1]}")
@pytest.mark.parametrize("m", ROWS)
def test_deepgemm_fp8_linear_matches_the_reference(nk: tuple[int, int], m: int) -> None:
    n, k = nk
    gen = torch.Generator(device="cuda").manual_seed(m * 3 + n)
    w, ws = fp8.quantize_fp8_weight(torch.randn(n, k, device="cuda", generator=gen) / k**0.5)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    bias = torch.randn(n, device="cuda", generator=gen) if m == 64 else None
    ref = fp8.fp8_linear(x.float(), w, ws, bias)  # float32: the reference without bf16 rounding
    poison_freed_cuda_memory()
    out = fp8_deepgemm.fp8_linear_deepgemm(x, w, ws, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, ref) < BF16_TOL


@gpu
def test_fp8_gemm_deepgemm_sends_the_models_dense_gemms_to_deepgemm_where_it_takes_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """TANDEM_FP8_GEMM=deepgemm: fp8_linear_triton (what the model calls) runs DeepGEMM for bf16 rows of a shape
    it takes, Triton for a partial block or float32 rows; every result matches the reference."""
    from kernels.triton_fp8 import fp8_linear_triton

    calls: list[tuple[int, int]] = []
    real_gemm = fp8_deepgemm.fp8_gemm_deepgemm

    def counting_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        calls.append((xq.shape[0], w.shape[0]))
        return real_gemm(xq, xs, w, ws)

    monkeypatch.setattr(fp8_deepgemm, "fp8_gemm_deepgemm", counting_gemm)
    monkeypatch.setenv(GEMM_ENV, "deepgemm")
    gen = torch.Generator(device="cuda").manual_seed(7)
    for (n, k), dtype, goes in [((2112, 7168), torch.bfloat16, True), ((200, 300), torch.bfloat16, False),
                                ((2112, 7168), torch.float32, False), ((2048, 10944), torch.bfloat16, False)]:
        w, ws = fp8.quantize_fp8_weight(torch.randn(n, k, device="cuda", generator=gen) / k**0.5)
        x = torch.randn(2, 333, k, device="cuda", generator=gen).to(dtype)  # 666 rows: activations quantized
        before = len(calls)
        out = fp8_linear_triton(x, w, ws)
        assert (len(calls) > before) == goes, (n, k, dtype)
        assert out.shape == (2, 333, n) and out.dtype == dtype
        assert rel_err(out, fp8.fp8_linear(x.float(), w, ws)) < BF16_TOL


MOE_CASES = [(32, 7168, 2048, 8, 128), (32, 7168, 2048, 8, 4096), (64, 2048, 1408, 6, 333)]


@gpu
@pytest.mark.parametrize(("experts", "hidden", "inter", "top_k", "tokens"), MOE_CASES)
def test_deepgemm_contiguous_moe_matches_the_reference(experts: int, hidden: int, inter: int, top_k: int,
                                                        tokens: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    w13, s13, w2, s2 = random_fp8_experts(experts, hidden, inter, gen)
    x, ids, weights = random_routed_tokens(tokens, hidden, experts, top_k, gen)
    ref = fp8.fp8_moe_forward(x, ids, weights, w13, s13, w2, s2)
    emulated = torch.zeros(x.shape, dtype=torch.float32, device="cuda")
    for e in torch.unique(ids[ids >= 0]).tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        y = _deepgemm_expert(x[token], w13[e], s13[e], w2[e], s2[e])
        emulated.index_add_(0, token, y.float() * weights[token, slot, None])
    poison_freed_cuda_memory()
    out = fp8_deepgemm.fp8_moe_forward_deepgemm(x, ids, weights, w13, s13, w2, s2)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    print(f"contiguous E{experts} T{tokens}: rel to the reference {rel_err(out, ref):.2e}, "
          f"to the bf16-intermediate emulation {rel_err(out, emulated):.2e}")
    assert rel_err(out, ref) < GROUPED_REF_TOL
    assert rel_err(out, emulated) < BF16_TOL


@gpu
@pytest.mark.parametrize(("experts", "hidden", "inter", "capacity", "hint"),
                         [(32, 7168, 2048, 128, None), (32, 7168, 2048, 256, 128), (64, 2048, 1408, 40, None)])
def test_deepgemm_masked_moe_matches_the_reference_zeroes_rows_past_the_count_and_is_capturable(
        experts: int, hidden: int, inter: int, capacity: int, hint: int | None) -> None:
    """Capacity 40 is padded to DeepGEMM's 128-row tile inside; the last expert is full, the first empty."""
    gen = torch.Generator(device="cuda").manual_seed(capacity)
    w13, s13, w2, s2 = random_fp8_experts(experts, hidden, inter, gen)
    counts = torch.randint(0, capacity + 1, (experts,), device="cuda", generator=gen)
    counts[0] = 0
    counts[-1] = capacity
    x = torch.randn(experts, capacity, hidden, device="cuda", generator=gen).bfloat16()
    for e, c in enumerate(counts.tolist()):
        x[e, c:] = float("nan")  # never read
    ref = fp8.fp8_moe_forward_masked(x, counts, w13, s13, w2, s2)
    emulated = torch.zeros_like(x)
    for e, c in enumerate(counts.tolist()):
        if c:
            emulated[e, :c] = _deepgemm_expert(x[e, :c], w13[e], s13[e], w2[e], s2[e])
    poison_freed_cuda_memory()
    out = fp8_deepgemm.fp8_moe_forward_masked_deepgemm(x, counts, w13, s13, w2, s2,
                                                       expected_rows_per_expert=hint)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    print(f"masked E{experts} cap{capacity}: rel to the reference {rel_err(out.nan_to_num(1e6), ref):.2e}, "
          f"to the bf16-intermediate emulation {rel_err(out.nan_to_num(1e6), emulated):.2e}")
    assert rel_err(out.nan_to_num(1e6), ref) < GROUPED_REF_TOL
    assert rel_err(out.nan_to_num(1e6), emulated) < BF16_TOL
    for e, c in enumerate(counts.tolist()):
        assert (out[e, c:] == 0).all()
    graph = torch.cuda.CUDAGraph()  # compiled by the eager call above; no host sync inside
    with torch.cuda.graph(graph):
        captured = fp8_deepgemm.fp8_moe_forward_masked_deepgemm(x, counts, w13, s13, w2, s2,
                                                                expected_rows_per_expert=hint)
    graph.replay()
    assert torch.equal(captured, out)


def test_deepgemm_choice_is_accepted_and_keeps_cpu_tensors_and_other_choices_off_deepgemm(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.zeros(256, 512, dtype=torch.bfloat16), torch.zeros(256, 512, dtype=fp8.FP8_DTYPE)
    for choice in ("deepgemm", "auto", "triton", "cublas"):
        monkeypatch.setenv(GEMM_ENV, choice)
        assert not fp8_deepgemm.use_deepgemm(x, w, (128, 128))
    monkeypatch.setenv(GEMM_ENV, "cutlass")
    with pytest.raises(ValueError, match="auto, triton, cublas or deepgemm"):
        fp8_deepgemm.use_deepgemm(x, w, (128, 128))


def test_shapes_deepgemm_cannot_take_are_refused_before_any_launch() -> None:
    """Checked on the CPU: a partial K block, an intermediate size whose up half would start mid-block, float32
    activations; never a launch with a layout DeepGEMM would misread."""
    assert fp8_deepgemm.dense_shape_supported(7168, 18432) and fp8_deepgemm.dense_shape_supported(576, 7168)
    assert not fp8_deepgemm.dense_shape_supported(2048, 10944)  # K 85.5 blocks
    assert not fp8_deepgemm.dense_shape_supported(200, 384) and not fp8_deepgemm.dense_shape_supported(256, 384, (64, 64))
    gen = torch.Generator().manual_seed(0)
    w, ws = fp8.quantize_fp8_weight(torch.randn(256, 300, generator=gen))
    with pytest.raises(ValueError, match="bf16 activations"):
        fp8_deepgemm.fp8_linear_deepgemm(torch.zeros(4, 300, dtype=torch.bfloat16), w, ws)
    w13, s13, w2, s2 = random_fp8_experts(4, 256, 192, gen)
    x = torch.zeros(4, 8, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="intermediate 192"):
        fp8_deepgemm.fp8_moe_forward_masked_deepgemm(x, torch.ones(4, dtype=torch.int32), w13, s13, w2, s2)
    w13, s13, w2, s2 = random_fp8_experts(4, 256, 256, gen)
    ids = torch.zeros(8, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="must be bf16"):
        fp8_deepgemm.fp8_moe_forward_deepgemm(x[0].float(), ids, torch.ones(8, 2), w13, s13, w2, s2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_wrappers_keep_deepgemms_layout_contract_on_a_cpu_stand_in() -> None:
    """tests/deepgemm_fake_check.py: our wrappers against tests/fake_deep_gemm (DeepGEMM's host checks and row
    coverage, float32 math), under the Triton interpreter: gather, -1 padding rows, combine, capacity padding,
    zero rows past the counts, scale layouts."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_deep_gemm"), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "deepgemm_fake_check.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_a_probe_that_kills_its_child_is_reported_with_the_signal_and_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU: the child probe reports a crashing DeepGEMM (signal 11, what 2.6.1 did without the preload)
    instead of dying with it, returns "" for a child that exits, and a child never spawns another."""
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    why = fp8_deepgemm.probe_crash_in_child(0, crash)
    assert "signal 11" in why and "libstdc++" in why
    assert fp8_deepgemm.probe_crash_in_child(0, "import sys; sys.exit(0)") == ""
    assert fp8_deepgemm.probe_crash_in_child(0, "import sys; sys.exit(3)") == ""  # an error of its own: the
    # in-process probe reports it
    assert fp8_deepgemm.probe_crash_in_child(0) == ""  # the real probe on a CPU machine: no DeepGEMM, no crash
    monkeypatch.setenv("TANDEM_DEEPGEMM_PROBE_CHILD", "1")
    assert fp8_deepgemm.probe_crash_in_child(0, crash) == ""


def test_the_dense_gemm_plan_names_what_runs_at_each_row_count_and_refuses_a_forced_backend_that_cannot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, with the probes' answers stubbed: the start-up log line for each TANDEM_FP8_GEMM choice."""
    from kernels import fp8_cublas

    cuda = torch.device("cuda", 0)
    assert fp8_deepgemm.dense_gemm_plan(torch.device("cpu")).startswith("the torch references")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(fp8.ACT_ENV, raising=False)

    def stub(deepgemm_built: bool, deepgemm_runs: bool, cublas_runs: bool) -> None:
        fp8_deepgemm.PROBE_LOG[0] = [] if deepgemm_runs else ["probe GEMM failed: a reason"]
        monkeypatch.setattr(fp8_deepgemm, "_import", lambda: (object(), "") if deepgemm_built else (None, "no"))
        monkeypatch.setattr(fp8_deepgemm, "available", lambda index=None: deepgemm_runs)
        monkeypatch.setattr(fp8_cublas, "probe_recipe", lambda index: object() if cublas_runs else None)

    monkeypatch.setenv(GEMM_ENV, "auto")
    stub(True, True, True)
    assert fp8_deepgemm.dense_gemm_plan(cuda) == (
        f"Triton W8A16 up to {fp8.W8A16_MAX_ROWS} rows, DeepGEMM from {fp8_deepgemm.AUTO_MIN_ROWS} rows, "
        f"cuBLAS from {fp8_cublas.CUBLAS_MIN_ROWS} rows, Triton for the rest")
    stub(True, False, True)
    assert "no DeepGEMM (probe GEMM failed: a reason), cuBLAS from" in fp8_deepgemm.dense_gemm_plan(cuda)
    stub(False, False, False)
    assert fp8_deepgemm.dense_gemm_plan(cuda) == f"Triton W8A16 up to {fp8.W8A16_MAX_ROWS} rows, Triton for the rest"
    monkeypatch.setenv(GEMM_ENV, "deepgemm")
    with pytest.raises(RuntimeError, match="DeepGEMM does not run here: probe GEMM failed"):
        fp8_deepgemm.dense_gemm_plan(cuda)
    monkeypatch.setenv(GEMM_ENV, "cublas")
    with pytest.raises(RuntimeError, match="cuBLAS's block-scaled FP8 GEMM does not run here"):
        fp8_deepgemm.dense_gemm_plan(cuda)
    monkeypatch.setenv(fp8.ACT_ENV, "fp8")  # every size quantized: no W8A16 segment
    monkeypatch.setenv(GEMM_ENV, "triton")
    assert fp8_deepgemm.dense_gemm_plan(cuda) == "Triton at every row count"
    fp8_deepgemm.PROBE_LOG.pop(0, None)
