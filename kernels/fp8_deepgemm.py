"""FP8 block-scaled GEMMs through DeepGEMM (deepseek-ai/DeepGEMM: CUDA kernels JIT-compiled per shape, sm90).

Same contracts as the Triton functions, for bf16 activations:
  - ``fp8_linear_deepgemm``: ``kernels.triton_fp8.fp8_linear_triton`` (x ``[..., K]`` -> ``[..., N]``) on
    ``deep_gemm.fp8_gemm_nt``; ``TANDEM_FP8_GEMM=deepgemm`` sends the model's dense FP8 GEMMs here
    (``use_deepgemm``) wherever DeepGEMM takes the shape, Triton elsewhere.
  - ``fp8_moe_forward_deepgemm``: ``fp8_moe_forward_triton`` (contiguous layout, prefill) on
    ``m_grouped_fp8_gemm_nt_contiguous``.
  - ``fp8_moe_forward_masked_deepgemm``: ``fp8_moe_forward_masked_triton`` (masked layout, CUDA-graph decode)
    on ``m_grouped_fp8_gemm_nt_masked``.

DeepGEMM multiplies FP8 by FP8 only: activations are quantized at every size, so these compute what the
references compute under ``TANDEM_FP8_ACT=fp8`` (the engine reaches ``fp8_linear_deepgemm`` only where it
quantizes anyway: W8A16 decode GEMMs stay Triton's). The quantizer is ours (``quantize_fp8_act_triton``:
amax / 448 per 1 x 128 group, the references' bits) with ``recipe = (1, 128, 128)``: float32 scales of 1 x 128
activation groups and 128 x 128 weight blocks, the checkpoint's ``weight_scale_inv`` as they are
(``[N/128, K/128]``, ``[E, N/128, K/128]`` for experts, contiguous). SM90 reads activation scales M-major with
M padded to 4 (TMA); the quantizer writes them M-major (stride ``(1, M)``), so only an M that is not a multiple
of 4 costs DeepGEMM a copy (the masked layout's 3-D scales it transposes itself, one small kernel). Its outputs are bf16 only, so the experts' first GEMM writes
gate and up in bf16 before SiLU(gate) * up (Triton keeps them in fp32): at V3's expert shape that moves the
expert output ~1.5 % from the reference (a CPU emulation; each bf16 rounding of an intermediate element that
crosses an e4m3 rounding boundary requantizes it a whole step apart).

Layouts DeepGEMM asks for, from its sources (csrc/apis/gemm.hpp, tests/generators.py):
  - contiguous: rows sorted by expert, each expert's run padded to ``get_mk_alignment_for_contiguous_layout()``
    rows (128 on SM90, its block M) and one int32 per row naming its expert, ``-1`` on padding rows (a 64-row
    half whose first row is -1 is skipped).
  - masked: ``[E, capacity, K]`` with ``masked_m`` = int32 rows per expert and ``expected_m`` a tile hint. The
    kernel stores whole 64- or 128-row tiles into ``[E * capacity, N]``, so a capacity that is not a multiple
    of 128 would let one expert's last tile overwrite the next expert's first rows: such a capacity is padded
    (a copy of x). Rows of that last tile past the count come out as garbage and are zeroed after.
Only on sm90 (SM100's kernels take power-of-two UE8M0 scales: V3's float32 ones would be rounded);
``available`` checks the import, the device and one small GEMM against the reference, once per device.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from kernels.backend import check_expert_range, check_masked_layout
from kernels.fp8 import (
    BLOCK,
    FP8_DTYPE,
    BlockSize,
    check_expert_weights,
    dequantize_fp8_act,
    dequantize_fp8_weight,
    masked_rows_hint,
    quantize_fp8_weight,
    scale_shape,
)
from kernels.fp8_cublas import GEMM_ENV, gemm_choice

# 1 x 128 activation scales, 128 x 128 weight scales (float32): DeepSeek-V3's recipe, SM90's only FP8 kernel (1D2D).
RECIPE = (1, BLOCK, BLOCK)
# Shapes taken: K in whole 128-blocks (DeepGEMM's FP8 tests never go below), N a multiple of 64 (the kernel
# traps on N % 8; every V3 / V2-Lite shape is a multiple of 64 anyway).
N_MULTIPLE = 64
MASKED_ROW_MULTIPLE = 128  # SM90's largest masked block M: capacities are padded to it (see the module note)
REQUIRED = ("fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
            "get_mk_alignment_for_contiguous_layout")
# Under TANDEM_FP8_GEMM=auto, dense FP8 GEMMs of this many rows or more run on DeepGEMM where it is built and
# runs. bench.gemm on an H100 (bench/results/gemm_deepgemm_h100_s32.json): at 4096 rows DeepGEMM led cuBLAS on
# all six V3 dense shapes it takes (1.19-1.66x bf16 against 1.04-1.51x); at 128 rows it led on four and trailed
# on two by 2.5-4x (0.19-1.61x against 0.44-0.95x). Between the two nothing was measured; prefill chunks live
# up here.
AUTO_MIN_ROWS = int(os.environ.get("TANDEM_FP8_DEEPGEMM_MIN_ROWS", "1024"))
_CHILD_ENV = "TANDEM_DEEPGEMM_PROBE_CHILD"  # set in the probe's child: it must not spawn one itself
_ROOT = Path(__file__).resolve().parents[1]  # the checkout, so the child imports this same package
# Per device: what the probe found (the import error, the device, the probe GEMM's error), for bench.gemm.
PROBE_LOG: dict[int, list[str]] = {}


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    """(deep_gemm, "") or (None, why not). Imported lazily: most machines have no DeepGEMM build."""
    try:
        import deep_gemm
    except Exception as exc:  # noqa: BLE001 - ImportError, or its import-time init failing (CUDA_HOME, libnvrtc)
        return None, f"deep_gemm does not import: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    missing = [name for name in REQUIRED if not hasattr(deep_gemm, name)]
    if missing:
        return None, f"deep_gemm {getattr(deep_gemm, '__version__', '?')} lacks {', '.join(missing)}"
    return deep_gemm, ""


def _require() -> ModuleType:
    module, why = _import()
    if module is None:
        raise RuntimeError(f"DeepGEMM is not usable here: {why} (scripts/build_deepgemm.sh builds it)")
    return module


def _quantize(x2: torch.Tensor, counts: torch.Tensor | None = None, capacity: int = 0,
              m_major: bool = True, silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.triton_fp8 import quantize_fp8_act_triton

    return quantize_fp8_act_triton(x2, BLOCK, counts, capacity, scales_m_major=m_major, silu_mul=silu_mul)


_PROBE_CODE = "import sys; from kernels import fp8_deepgemm as dg; dg.available(int(sys.argv[1]))"


def probe_crash_in_child(device_index: int, probe: str = _PROBE_CODE) -> str:
    """Why DeepGEMM's probe GEMM kills a process (its signal), tried in a child first; "" where the child
    returns. A build that segfaults (2.6.1 built by GCC 13 on torch 2.11 / CUDA 13, where the process had
    loaded an older libstdc++: ``tests/deepgemm_bisect.py``) must not end the caller - a serving worker or a
    benchmark - at its first GEMM; it is reported and DeepGEMM left out instead."""
    if os.environ.get(_CHILD_ENV) == "1":
        return ""  # this is the child
    child = subprocess.run([sys.executable, "-c", probe, str(device_index)], cwd=_ROOT, capture_output=True,
                           text=True, timeout=600, check=False, env=dict(os.environ, **{_CHILD_ENV: "1"}))
    if child.returncode >= 0:
        return ""
    return (f"its probe GEMM killed a child process (signal {-child.returncode}; a std::ostream crash inside "
            f"the extension wants the libstdc++ it was built against preloaded, as scripts/build_deepgemm.sh's "
            f"env.sh does): {child.stderr.strip()[-300:]}")


@functools.cache
def _probe(device_index: int) -> bool:
    """Whether DeepGEMM runs right on this GPU: importable, sm90, a child process survives the probe GEMM,
    and a 64 x 256 x 512 GEMM here lands within 2e-2 of the dequantized matmul. Once per device (it
    JIT-compiles a kernel and syncs), never inside a capture."""
    log = PROBE_LOG.setdefault(device_index, [])
    module, why = _import()
    if module is None:
        log.append(why)
        return False
    capability = torch.cuda.get_device_capability(device_index)
    if capability != (9, 0):
        log.append(f"sm {capability}: DeepGEMM's float32-scale FP8 kernels are sm90 only")
        return False
    crash = probe_crash_in_child(device_index)
    if crash:
        log.append(crash)
        return False
    device = torch.device("cuda", device_index)
    try:
        with torch.cuda.device(device):  # DeepGEMM launches on the current device
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(64, 512, device=device, generator=gen, dtype=torch.bfloat16)
            w, ws = quantize_fp8_weight(torch.randn(256, 512, device=device, generator=gen) / 20)
            xq, xs = _quantize(x)
            out = fp8_gemm_deepgemm(xq, xs, w, ws)
            ref = dequantize_fp8_act(xq, xs.contiguous()) @ dequantize_fp8_weight(w, ws).t()
            err = ((out.float() - ref).norm() / ref.norm()).item()
    except Exception as exc:  # noqa: BLE001 - a failing build or launch is an outcome to record
        log.append(f"probe GEMM failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return False
    log.append(f"deep_gemm {getattr(module, '__version__', '?')} ({module.__file__}): probe GEMM 64x256x512 "
               f"rel err {err:.2e}")
    return err < 2e-2


def available(device: torch.device | int | None = None) -> bool:
    """Whether DeepGEMM imports and runs right on ``device`` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        return False
    if isinstance(device, torch.device):
        device = device.index
    return _probe(torch.cuda.current_device() if device is None else device)


def dense_shape_supported(n: int, k: int, block_size: BlockSize = (BLOCK, BLOCK)) -> bool:
    """Whether DeepGEMM takes an ``[N, K]`` FP8 weight in ``block_size`` blocks."""
    return tuple(block_size) == (BLOCK, BLOCK) and n > 0 and k > 0 and n % N_MULTIPLE == 0 and k % BLOCK == 0


def use_deepgemm(x2: torch.Tensor, weight: torch.Tensor, block_size: BlockSize) -> bool:
    """Whether the dense FP8 GEMM of ``x2 [M, K]`` by ``weight [N, K]`` goes to DeepGEMM, for bf16 activations
    and a contiguous weight of a shape it takes (the others run elsewhere): under ``TANDEM_FP8_GEMM=deepgemm``
    at every row count (an error where DeepGEMM does not run on this GPU); under ``auto`` from
    ``AUTO_MIN_ROWS`` rows where a DeepGEMM build is importable and its probe passed (else cuBLAS or Triton,
    silently). Inside a CUDA-graph capture an unprobed device stays off it (the probe compiles and syncs)."""
    choice = gemm_choice()
    if choice not in ("deepgemm", "auto") or not x2.is_cuda:
        return False
    if choice == "auto" and (x2.shape[0] < AUTO_MIN_ROWS or _import()[0] is None):
        return False
    if (x2.dtype != torch.bfloat16 or not weight.is_contiguous()
            or not dense_shape_supported(weight.shape[0], x2.shape[1], block_size)):
        return False
    if torch.cuda.is_current_stream_capturing() and _probe.cache_info().currsize == 0:
        return False
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    if available(index):
        return True
    if choice == "auto":
        return False
    raise RuntimeError(f"{GEMM_ENV}=deepgemm but DeepGEMM does not run here: {_why_not(index)}")


def _why_not(index: int) -> str:
    """What the probe of device ``index`` found against DeepGEMM, for a log line or an error."""
    return "; ".join(PROBE_LOG.get(index, [])) or "no probe result"


def fp8_gemm_deepgemm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                      weight_scale: torch.Tensor) -> torch.Tensor:
    """The GEMM alone: ``xq [M, K]`` fp8 and its scales ``xs [M, K/128]`` (M-major and TMA-aligned spares
    DeepGEMM a transpose), weight ``[N, K]`` fp8 with ``[N/128, K/128]`` scales -> bf16 ``[M, N]``."""
    out = torch.empty((xq.shape[0], weight.shape[0]), dtype=torch.bfloat16, device=xq.device)
    if xq.shape[0] == 0:
        return out
    _require().fp8_gemm_nt((xq, xs), (weight, weight_scale.contiguous()), out, recipe=RECIPE,
                           disable_ue8m0_cast=True)
    return out


def fp8_linear_deepgemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """``kernels.fp8.fp8_linear`` (with FP8 activations) on DeepGEMM: x ``[..., K]`` bf16 -> ``[..., N]`` bf16."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {weight.dtype} {tuple(weight.shape)} do not fit")
    if tuple(weight_scale.shape) != scale_shape(weight.shape[0], weight.shape[1], block_size):
        raise ValueError(f"weight scales {tuple(weight_scale.shape)} do not fit weight {tuple(weight.shape)}")
    if x.dtype != torch.bfloat16 or not dense_shape_supported(weight.shape[0], weight.shape[1], block_size):
        raise ValueError(f"DeepGEMM takes bf16 activations and N % {N_MULTIPLE} = K % {BLOCK} = 0 in "
                         f"{BLOCK}x{BLOCK} blocks: got {x.dtype}, weight {tuple(weight.shape)}, blocks {block_size}")
    if weight.stride(1) != 1 or weight.stride(0) != weight.shape[1]:
        raise ValueError("the FP8 weight must be contiguous (DeepGEMM reads it through TMA, K-major)")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xq, xs = _quantize(x2)
    out = fp8_gemm_deepgemm(xq, xs, weight, weight_scale)
    if bias is not None:  # DeepGEMM's SM90 FP8 kernel has no epilogue input (its C): one add after
        out += bias.to(out.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


def _check_experts(hidden_dim: int, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                   w2_scale: torch.Tensor, block_size: BlockSize) -> int:
    """Validates FP8 expert weights for DeepGEMM; returns the number of experts. The gate/up weight runs as one
    ``[E, 2I, D]`` GEMM, so I must be whole 128-blocks (else the up half's scales start mid-block)."""
    num_experts = check_expert_weights(hidden_dim, w13, w13_scale, w2, w2_scale, block_size)
    inter = w2.shape[2]
    if not (dense_shape_supported(2 * inter, hidden_dim, block_size) and dense_shape_supported(hidden_dim, inter,
                                                                                               block_size)):
        raise ValueError(f"DeepGEMM's grouped GEMMs take hidden and intermediate sizes in whole {BLOCK}-blocks "
                         f"(and multiples of {N_MULTIPLE}): got hidden {hidden_dim}, intermediate {inter}")
    for t in (w13, w2):
        if not t.is_contiguous():
            raise ValueError("expert weights must be contiguous (DeepGEMM reads [E, N, K] through TMA)")
    return num_experts


def fp8_moe_forward_deepgemm(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                             w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                             block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """Contiguous-layout FP8 MoE on DeepGEMM (``kernels.fp8.fp8_moe_forward``'s contract, bf16 hidden):
    quantize each token once, gather its rows into the expert-sorted padded layout, gate/up GEMM, SiLU * up,
    quantize, down GEMM, weight and sum each token's slots. No host sync but the routing check outside capture."""
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [T, D], topk_ids/weights [T, K]")
    if topk_ids.shape[0] != hidden.shape[0] or topk_ids.dtype.is_floating_point:
        raise ValueError(f"{hidden.shape[0]} tokens but routing {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if hidden.dtype != torch.bfloat16:
        raise ValueError(f"DeepGEMM writes bf16: hidden must be bf16, got {hidden.dtype}")
    num_experts = _check_experts(hidden.shape[1], w13, w13_scale, w2, w2_scale, block_size)
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0 or top_k == 0 or num_experts == 0:
        return torch.zeros_like(hidden)
    check_expert_range(topk_ids, num_experts)
    from kernels.triton_moe import sort_by_expert

    dg = _require()
    align = int(dg.get_mk_alignment_for_contiguous_layout())
    sort = sort_by_expert(topk_ids, num_experts, align)
    m_pad = sort.max_blocks * align  # an upper bound of the padded rows, known without a host sync
    rows = sort.sorted_rows[:m_pad].long()  # routed slot (token * top_k + k) per padded row; padding: num_rows
    valid = rows < sort.num_rows
    expert_of_row = sort.block_expert.repeat_interleave(align)
    m_indices = torch.where(valid, expert_of_row, -1).to(torch.int32)
    token = torch.where(valid, rows // top_k, 0)  # padding rows copy token 0: computed or skipped, never read
    hq, hs = _quantize(hidden.contiguous())
    aq = hq.view(torch.uint8).index_select(0, token).view(FP8_DTYPE)
    # [K/128, T] -> [K/128, m_pad] -> its transpose: M-major scales, TMA-aligned (m_pad is a multiple of 128)
    a_s = hs.t().index_select(1, token).t()
    gate_up = torch.empty((m_pad, w13.shape[1]), dtype=torch.bfloat16, device=hidden.device)
    dg.m_grouped_fp8_gemm_nt_contiguous((aq, a_s), (w13, w13_scale.contiguous()), gate_up, m_indices,
                                        recipe=RECIPE, disable_ue8m0_cast=True)
    iq, is_ = _quantize(gate_up, silu_mul=True)  # SiLU(gate) * up quantized in the same pass
    y = torch.empty((m_pad, hidden.shape[1]), dtype=torch.bfloat16, device=hidden.device)
    dg.m_grouped_fp8_gemm_nt_contiguous((iq, is_), (w2, w2_scale.contiguous()), y, m_indices, recipe=RECIPE,
                                        disable_ue8m0_cast=True)
    slot_weights = torch.cat([topk_weights.reshape(-1).float(), topk_weights.new_zeros(1, dtype=torch.float32)])
    y.mul_(slot_weights[rows][:, None])
    # One row per routed slot (+ one that every padding row lands on); slots routed elsewhere stay zero.
    per_slot = torch.zeros((sort.num_rows + 1, hidden.shape[1]), dtype=torch.bfloat16, device=hidden.device)
    per_slot.index_copy_(0, rows, y)
    return per_slot[: sort.num_rows].view(num_tokens, top_k, -1).sum(dim=1)


def fp8_moe_forward_masked_deepgemm(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor,
                                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                                    block_size: BlockSize = (BLOCK, BLOCK),
                                    expected_rows_per_expert: int | None = None) -> torch.Tensor:
    """Masked-layout FP8 MoE on DeepGEMM (``kernels.fp8.fp8_moe_forward_masked``'s contract, bf16 x; rows past
    each count are zero), CUDA-graph safe once its kernels are compiled (a first eager call compiles them).
    ``expected_rows_per_expert`` is DeepGEMM's ``expected_m`` (default as Triton's hint: up to 16)."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"DeepGEMM writes bf16: x must be bf16, got {x.dtype}")
    num_experts = _check_experts(x.shape[-1], w13, w13_scale, w2, w2_scale, block_size)
    check_masked_layout(x, counts, num_experts)
    capacity, hidden_dim = x.shape[1], x.shape[2]
    if num_experts == 0 or capacity == 0:
        return torch.zeros_like(x)
    from kernels.triton_fp8 import zero_past_count_triton

    dg = _require()
    cap = -(-capacity // MASKED_ROW_MULTIPLE) * MASKED_ROW_MULTIPLE
    xp = x if cap == capacity else torch.nn.functional.pad(x, (0, 0, 0, cap - capacity))
    x2 = xp.reshape(num_experts * cap, hidden_dim)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    masked_m = counts.to(torch.int32)
    expected_m = max(1, masked_rows_hint(capacity, expected_rows_per_expert))
    # Row-major scales ([E, cap, K/128] contiguous): DeepGEMM transposes them into its layout itself (one small
    # kernel); the masked quantizer leaves rows past each count unwritten and nothing reads them back.
    xq, xs = _quantize(x2, counts, cap, m_major=False)
    gate_up = torch.empty((num_experts, cap, w13.shape[1]), dtype=torch.bfloat16, device=x.device)
    dg.m_grouped_fp8_gemm_nt_masked((xq.view(num_experts, cap, hidden_dim), xs.view(num_experts, cap, -1)),
                                    (w13, w13_scale.contiguous()), gate_up, masked_m, expected_m, recipe=RECIPE,
                                    disable_ue8m0_cast=True)
    # SiLU(gate) * up and its quantization in one pass over the counted rows (bf16 gate_up from DeepGEMM).
    iq, is_ = _quantize(gate_up.view(num_experts * cap, -1), counts, cap, m_major=False, silu_mul=True)
    out = torch.empty((num_experts, cap, hidden_dim), dtype=torch.bfloat16, device=x.device)
    dg.m_grouped_fp8_gemm_nt_masked((iq.view(num_experts, cap, -1), is_.view(num_experts, cap, -1)),
                                    (w2, w2_scale.contiguous()), out, masked_m, expected_m, recipe=RECIPE,
                                    disable_ue8m0_cast=True)
    # Rows past each count: the last tile's stores left garbage there and the rest were never written.
    zero_past_count_triton(out, counts)
    return out if cap == capacity else out[:, :capacity].contiguous()


def dense_gemm_plan(device: torch.device) -> str:
    """Which backend runs the dense FP8 GEMMs of a model kept in FP8 on ``device``, by row count, under
    ``TANDEM_FP8_GEMM`` and ``TANDEM_FP8_ACT``: what ``kernels.triton_fp8.fp8_linear_triton`` will choose. It probes
    cuBLAS and DeepGEMM now, so a worker pays for the probes (DeepGEMM's child process, a JIT compile) at
    start-up rather than in its first prefill, and logs what will run."""
    from kernels.fp8 import W8A16_MAX_ROWS, quantizes_activations
    from kernels.fp8_cublas import CUBLAS_MIN_ROWS, probe_recipe

    if device.type != "cuda" or not torch.cuda.is_available():
        return "the torch references (no CUDA device)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    choice = gemm_choice()
    parts = []
    if not quantizes_activations(W8A16_MAX_ROWS):
        parts.append(f"Triton W8A16 up to {W8A16_MAX_ROWS} rows")
    if choice == "deepgemm" or (choice == "auto" and _import()[0] is not None):
        if available(index):
            parts.append("DeepGEMM" + (f" from {AUTO_MIN_ROWS} rows" if choice == "auto" else ""))
        elif choice == "deepgemm":
            raise RuntimeError(f"{GEMM_ENV}=deepgemm but DeepGEMM does not run here: {_why_not(index)}")
        else:
            parts.append(f"no DeepGEMM ({_why_not(index)})")
    if choice in ("auto", "cublas"):
        if probe_recipe(index) is not None:
            parts.append("cuBLAS" + (f" from {CUBLAS_MIN_ROWS} rows" if choice == "auto" else ""))
        elif choice == "cublas":
            raise RuntimeError(f"{GEMM_ENV}=cublas but cuBLAS's block-scaled FP8 GEMM does not run here")
    return ", ".join([*parts, "Triton for the rest"]) if parts else "Triton at every row count"
