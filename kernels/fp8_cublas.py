"""FP8 block-scaled dense GEMM through cuBLASLt (torch's ``_scaled_mm``): DeepSeek-V3's recipe on Hopper.

cuBLASLt 12.9+ takes 1 x 128 activation scales and 128 x 128 weight scales natively on sm90, with the
block-wise fp32 promotion DeepSeek's recipe asks for, at a rate our Triton kernel does not reach on
prefill-sized M. ``kernels.triton_fp8.fp8_linear_triton`` calls ``fp8_linear_cublas`` where
``use_cublas`` says so; the Triton GEMM stays the path for everything else (grouped experts, other GPUs,
a torch whose ``_scaled_mm`` refuses block scales).

Layouts cuBLAS wants (torch checks them in ``is_blockwise_1x128_scaling`` / ``..._128x128_scaling``):
activation scales ``[M, K/128]`` M-major (stride ``(1, M)``: the quantizer writes them so), weight
``[K, N]`` column-major (our ``[N, K]`` row-major weight, transposed) and its scales ``[K/128, N/128]``
as the transpose of ``[N/128, K/128]``. Newer torch releases want that weight-scale row padded to a
multiple of 4 blocks (cuBLAS's ``L4``), and torch 2.10+ also offers ``F.scaled_mm`` with explicit recipes;
which entry point and layouts this torch takes is probed once per device (``probe_recipe``, every try
kept in ``PROBE_LOG``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from kernels.fp8 import BLOCK, FP8_DTYPE, BlockSize

GEMM_ENV = "TANDEM_FP8_GEMM"
# deepgemm: DeepGEMM (kernels.fp8_deepgemm, a separate build) wherever it takes the shape, Triton elsewhere.
# auto: DeepGEMM from kernels.fp8_deepgemm.AUTO_MIN_ROWS rows where a build runs, cuBLAS from CUBLAS_MIN_ROWS,
# Triton below (and for the shapes the others refuse).
GEMM_CHOICES = ("auto", "triton", "cublas", "deepgemm")
# From this many rows cuBLAS runs the dense FP8 GEMM under `auto` (below it the Triton GEMM quantizes its
# activation tiles itself and splits K, which suits decode's few rows). bench.gemm measures both sides.
CUBLAS_MIN_ROWS = int(os.environ.get("TANDEM_FP8_CUBLAS_MIN_ROWS", "128"))
ROW_MULTIPLE = 16  # the row counts cuBLAS's block-scaled FP8 GEMM runs: others are padded up
# cuBLAS from CUBLAS_MIN_ROWS rows: bench.gemm on an H100 (torch 2.11, bench/results/gemm_h100_s31_console.log)
# put it ahead of our Triton GEMM on all seven V3 dense shapes at 128 rows (0.80-1.56x bf16 against 0.53-1.05x)
# and at 4096 (1.07-1.57x against 0.63-0.95x); at 1 row Triton's split-K leads (1.14x against 0.71x).
DEFAULT_CHOICE = "auto"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CublasRecipe:
    """How this torch takes DeepSeek's block scales: the entry point, the weight scales' layout, and whether a
    K that is not a multiple of 4 blocks runs right (cuBLAS pads each row of K-block scales to 4, ``L4``)."""

    api: str  # "scaled_mm_v2" (F.scaled_mm, explicit recipes) or "scaled_mm" (inferred from the scales' shapes)
    b_scales: str  # "padded": [L4, N/128] M-major, the padding zero; "t_view": [K/128, N/128], no padding
    any_k: bool = False


# Per device: every recipe the probe tried and what happened (an error's first line or the relative error),
# for bench.gemm to record: a torch that refuses block scales says why.
PROBE_LOG: dict[int, list[str]] = {}


def cublas_weight_scale(weight_scale: torch.Tensor, layout: str) -> torch.Tensor:
    """``[N/128, K/128]`` weight scales as cuBLAS's ``scale_b``: their transpose, K-block-major in memory;
    ``padded``: each N block's row padded with zeros to a multiple of 4 K blocks (shape ``[L4, N/128]``)."""
    rows, blocks = weight_scale.shape
    if layout == "t_view" or blocks % 4 == 0:
        return weight_scale.contiguous().t()
    padded = torch.zeros((rows, _cdiv(blocks, 4) * 4), dtype=torch.float32, device=weight_scale.device)
    padded[:, :blocks] = weight_scale
    return padded.t()


def _scaled_mm(recipe: CublasRecipe, xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
               scale_b: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """xs: the 1 x 128 activation scales ``[M, K/128]`` M-major (stride ``(1, M)``), as the quantizer writes them."""
    if recipe.api == "scaled_mm_v2":
        import torch.nn.functional as F

        return F.scaled_mm(xq, weight.t(), xs, F.ScalingType.BlockWise1x128, scale_b,
                           F.ScalingType.BlockWise128x128, bias=bias, output_dtype=out_dtype)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale_b, bias=bias, out_dtype=out_dtype)


def _recipes() -> list[CublasRecipe]:
    import torch.nn.functional as F

    v2 = hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
    return ([CublasRecipe("scaled_mm_v2", "padded"), CublasRecipe("scaled_mm_v2", "t_view")] if v2 else []) + [
        CublasRecipe("scaled_mm", "padded"), CublasRecipe("scaled_mm", "t_view")]


@functools.cache
def probe_recipe(device_index: int) -> CublasRecipe | None:
    """The first recipe under which this torch's cuBLAS runs block-scaled FP8 right on this GPU, or None.

    Each recipe runs a small GEMM with K of 4 blocks against the dequantized matmul (it must pass), then one
    with K of 3 (``any_k`` when it passes too: torch 2.11 on an H100 ran the latter with an unpadded layout and
    returned garbage, so a K it cannot pad goes to Triton). Once per device, outside any graph capture;
    ``PROBE_LOG`` keeps every outcome.
    """
    device = torch.device("cuda", device_index)
    log = PROBE_LOG.setdefault(device_index, [])
    if torch.cuda.get_device_capability(device) != (9, 0):
        log.append(f"sm {torch.cuda.get_device_capability(device)}: cuBLAS block scaling is sm90 only")
        return None
    from kernels.fp8 import dequantize_fp8_act, dequantize_fp8_weight, quantize_fp8_weight
    from kernels.triton_fp8 import quantize_fp8_act_triton

    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    for k_blocks in (4, 3):
        x = torch.randn(32, k_blocks * BLOCK, device=device, generator=gen, dtype=torch.bfloat16)
        w, ws = quantize_fp8_weight(torch.randn(256, k_blocks * BLOCK, device=device, generator=gen) / 20)
        xq, xs = quantize_fp8_act_triton(x, BLOCK, scales_m_major=True)
        ref = dequantize_fp8_act(xq, xs.contiguous()) @ dequantize_fp8_weight(w, ws, (BLOCK, BLOCK),
                                                                              torch.float32).t()
        cases.append((xq, xs, w, ws, ref))
    for recipe in _recipes():
        errors: list[float | str] = []
        for xq, xs, w, ws, ref in cases:
            try:
                out = _scaled_mm(recipe, xq, xs, w, cublas_weight_scale(ws, recipe.b_scales), torch.bfloat16, None)
                errors.append(((out.float() - ref).norm() / ref.norm()).item())
            except Exception as exc:  # noqa: BLE001 - any refusal is an outcome to record, not a crash
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        log.append(f"{recipe}: K of 4 blocks {errors[0]}, K of 3 blocks {errors[1]}")
        ok = [isinstance(e, float) and e < 2e-2 for e in errors]
        if ok[0]:
            return CublasRecipe(recipe.api, recipe.b_scales, any_k=ok[1])
    return None


def gemm_choice() -> str:
    """``TANDEM_FP8_GEMM``, checked: which backend runs the dense FP8 GEMMs at prefill sizes (read per call)."""
    choice = os.environ.get(GEMM_ENV, DEFAULT_CHOICE).strip().lower()
    if choice not in GEMM_CHOICES:
        raise ValueError(f"{GEMM_ENV} must be auto, triton, cublas or deepgemm, got {choice!r}")
    return choice


def use_cublas(x: torch.Tensor, weight: torch.Tensor, block_size: BlockSize) -> bool:
    """Whether the dense FP8 GEMM of ``x [M, K]`` by ``weight [N, K]`` goes to cuBLAS.

    ``TANDEM_FP8_GEMM``: ``triton`` never, ``cublas`` wherever the shape allows (an error where the GPU or torch
    cannot), ``auto`` (default) from ``CUBLAS_MIN_ROWS`` rows on a GPU where the probe passed (callers ask
    ``kernels.fp8_deepgemm.use_deepgemm`` first: under ``auto`` it takes the largest row counts where a DeepGEMM
    build runs), ``deepgemm`` never.
    """
    choice = gemm_choice()
    if choice in ("triton", "deepgemm") or not x.is_cuda:
        return False
    shape_ok = tuple(block_size) == (BLOCK, BLOCK) and x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0
    capturing = torch.cuda.is_current_stream_capturing()
    # The probe runs kernels and syncs: never inside a capture (an unprobed device stays on Triton there).
    probed = not capturing or probe_recipe.cache_info().currsize > 0
    recipe = probe_recipe(x.device.index or 0) if shape_ok and probed else None
    if recipe is not None and not recipe.any_k and _cdiv(x.shape[1], BLOCK) % 4:
        recipe = None  # this torch cannot pad a K of other than 4n blocks
    if choice == "cublas":
        if recipe is None:
            raise RuntimeError(f"{GEMM_ENV}=cublas but cuBLAS block-scaled FP8 does not run this GEMM here "
                               f"(sm {torch.cuda.get_device_capability(x.device)}, torch {torch.__version__}, "
                               f"K {x.shape[1]}, N {weight.shape[0]}, blocks {tuple(block_size)})")
        return True
    return recipe is not None and x.shape[0] >= CUBLAS_MIN_ROWS


# Weight scales in cuBLAS's layout, made once per weight-scale tensor at its first call (a small copy) and
# reused every step, graph replays included. The entry holds the source tensor, so its storage cannot be
# freed and reused: a later tensor with the same pointer, shape and strides views the same scales, and the
# version counter catches an in-place change (a weight reload).
_SCALE_B: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, int, torch.Tensor]] = {}


def _scale_b(weight_scale: torch.Tensor) -> torch.Tensor:
    device = weight_scale.device.index or 0
    key = (weight_scale.data_ptr(), device, tuple(weight_scale.shape), weight_scale.stride())
    hit = _SCALE_B.get(key)
    if hit is None or hit[1] != weight_scale._version:
        recipe = probe_recipe(device)
        assert recipe is not None
        hit = (weight_scale, weight_scale._version, cublas_weight_scale(weight_scale, recipe.b_scales))
        _SCALE_B[key] = hit
    return hit[2]


def fp8_linear_cublas(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``y = x2 W^T (+ bias)`` for a 2-D ``x2 [M, K]``: quantize x2 per 1 x 128 group, then cuBLASLt."""
    from kernels.triton_fp8 import quantize_fp8_act_triton

    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be {FP8_DTYPE}, got {weight.dtype}")
    recipe = probe_recipe(x2.device.index or 0)
    assert recipe is not None, "fp8_linear_cublas called where the probe found no recipe"
    rows = x2.shape[0]
    if rows % ROW_MULTIPLE:
        # cuBLAS finds no block-scaled algorithm for other row counts (CUBLAS_STATUS_NOT_SUPPORTED on an H100
        # at 1, 7 and 333 rows; 32, 64 and 4096 ran): zero rows pad it, quantized to zeros, sliced off after.
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, ROW_MULTIPLE - rows % ROW_MULTIPLE))
    xq, xs = quantize_fp8_act_triton(x2, BLOCK, scales_m_major=True)
    out = _scaled_mm(recipe, xq, xs, weight, _scale_b(weight_scale), out_dtype,
                     None if bias is None else bias.to(out_dtype))
    return out[:rows]
