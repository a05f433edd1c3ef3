"""FP8 (e4m3) block-scaled GEMMs as DeepSeek-V3 ships them: torch references.

Weights are quantized per ``block_n x block_k`` block (128 x 128 in V3) with one float32 dequantization
scale per block (the checkpoints' ``*.weight_scale_inv``, ceil-divided, so edge blocks may be partial);
activations are quantized on the fly per ``1 x block_k`` token group, scale = group amax / 448.

Activations are quantized where that pays (``quantizes_activations``): many rows (prefill) run on the FP8
tensor cores; few rows (decode) only stream the weight, so they stay in the model dtype against the
dequantized weight tile (W8A16) and skip a quantizer launch per GEMM. ``TANDEM_FP8_ACT`` forces either.

The references compute exactly what the fast kernels compute, in float32: quantize the activations (where
the kernels do), dequantize both operands, matmul. That keeps the GPU-vs-reference tolerance down to accumulation order
(and a rare one-ulp difference of a quantized activation) instead of FP8's ~3 % quantization noise.

Layouts:
  - dense ``fp8_linear``: weight ``[N, K]`` fp8, scale ``[ceil(N/bn), ceil(K/bk)]``.
  - experts: w13 ``[E, 2I, D]`` (gate rows then up rows), scale ``[E, 2*ceil(I/bn), ceil(D/bk)]``: the gate
    half's block rows then the up half's, each ceil-divided on its own as the checkpoint's separate
    gate_proj / up_proj scales are; w2 ``[E, D, I]``, scale ``[E, ceil(D/bn), ceil(I/bk)]``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels.f16_groups import F16Rows

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# Floor of a group's amax: an all-zero group gets a tiny positive scale instead of 0/0.
AMAX_EPS = 1e-10
BLOCK = 128
BlockSize = tuple[int, int]

# How the FP8 GEMMs take their activations: "fp8" quantized per 1 x 128 token group (DeepSeek's recipe, the
# FP8 tensor cores), "bf16" in the model dtype against the dequantized weight tile (W8A16), "auto" (default)
# W8A16 up to W8A16_MAX_ROWS rows (per expert, for the grouped GEMMs), FP8 above. Why: up to a few dozen
# rows a GEMM is bound by reading its weight, never by the MMA, so FP8 activations only add a quantizer launch
# per GEMM (187 of the V2-Lite FP8 decode step's 783 kernels, 18 % of its time at batch 1 on an H100) and
# their rounding; at prefill sizes the FP8 MMA's rate is the point.
ACT_ENV = "TANDEM_FP8_ACT"
W8A16_MAX_ROWS = 64


def quantizes_activations(rows: int) -> bool:
    """Whether an FP8 GEMM over ``rows`` activation rows (rows per expert for the grouped GEMMs, as their tile
    hint counts them) quantizes them (``ACT_ENV``); the references and the kernels ask the same question."""
    mode = os.environ.get(ACT_ENV, "auto")
    if mode not in ("auto", "fp8", "bf16"):
        raise ValueError(f"{ACT_ENV}={mode!r}: choose auto, fp8 or bf16")
    return mode == "fp8" or (mode == "auto" and rows > W8A16_MAX_ROWS)


def masked_rows_hint(capacity: int, expected_rows_per_expert: int | None) -> int:
    """Rows per expert a masked-layout GEMM plans for: the caller's hint, else up to 16 (decode)."""
    return min(capacity, 16) if expected_rows_per_expert is None else expected_rows_per_expert


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(rows: int, cols: int, block_size: BlockSize = (BLOCK, BLOCK)) -> tuple[int, int]:
    """Shape of the block-scale grid of a ``[rows, cols]`` weight (ceil-divided)."""
    return _cdiv(rows, block_size[0]), _cdiv(cols, block_size[1])


def quantize_fp8_act(x: torch.Tensor, group_size: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group quantization: x ``[..., K]`` -> (fp8 ``[..., K]``, float32 scales ``[..., ceil(K/g)]``).

    The scale of each ``1 x group_size`` group is its amax / 448, so the group's largest element maps to
    +-448; dequantized value = fp8 * scale. A last partial group is padded with zeros for the amax.
    """
    k = x.shape[-1]
    groups = _cdiv(k, group_size)
    xf = x.float()
    if groups * group_size != k:
        xf = F.pad(xf, (0, groups * group_size - k))
    g = xf.view(*x.shape[:-1], groups, group_size)
    # Times the float32 reciprocal, not a division: that is what torch computes for a tensor divided by a
    # scalar on CUDA, so this reference gives the same bits on every device (and the Triton kernels match it).
    scale = g.abs().amax(dim=-1).clamp(min=AMAX_EPS) * (1.0 / FP8_MAX)
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(*x.shape[:-1], groups * group_size)[..., :k].contiguous()
    return q, scale


def dequantize_fp8_act(q: torch.Tensor, scale: torch.Tensor, group_size: int = BLOCK) -> torch.Tensor:
    """float32 values of per-token-group quantized activations."""
    k = q.shape[-1]
    if scale.shape != (*q.shape[:-1], _cdiv(k, group_size)):
        raise ValueError(f"scales {tuple(scale.shape)} do not fit activations {tuple(q.shape)} in groups of {group_size}")
    return q.float() * scale.repeat_interleave(group_size, dim=-1)[..., :k]


def quantize_fp8_weight(w: torch.Tensor,
                        block_size: BlockSize = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantization of w ``[..., N, K]``: (fp8 ``[..., N, K]``, float32 ``[..., ceil(N/bn), ceil(K/bk)]``).

    What DeepSeek's checkpoints hold (scale = block amax / 448); used for dummy FP8 weights and for
    quantizing a bf16 checkpoint at load under ``--quantization fp8``.
    """
    bn, bk = block_size
    *lead, n, k = w.shape
    nb, kb = _cdiv(n, bn), _cdiv(k, bk)
    wf = F.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n))
    blocks = wf.view(*lead, nb, bn, kb, bk)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_EPS) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, nb * bn, kb * bk)[..., :n, :k].contiguous(), scale


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int,
                       block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """The per-element scale of a ``[..., rows, cols]`` weight from its block grid."""
    bn, bk = block_size
    if tuple(scale.shape[-2:]) != scale_shape(rows, cols, block_size):
        raise ValueError(f"block scales {tuple(scale.shape)} do not fit a [{rows}, {cols}] weight in "
                         f"{bn}x{bk} blocks (expected {scale_shape(rows, cols, block_size)})")
    return scale.repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)[..., :cols]


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor, block_size: BlockSize = (BLOCK, BLOCK),
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale`` expanded per block, in float32 (exact: one rounding), then cast to ``dtype``."""
    full = expand_block_scale(scale.float(), q.shape[-2], q.shape[-1], block_size)
    return (q.float() * full).to(dtype)


def dequantize_fp8_gated(w13: torch.Tensor, scale: torch.Tensor, block_size: BlockSize = (BLOCK, BLOCK),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a packed gate+up weight ``[..., 2I, D]`` whose halves carry their own block grids."""
    inter = w13.shape[-2] // 2
    half = _cdiv(inter, block_size[0])
    if scale.shape[-2] != 2 * half:
        raise ValueError(f"gate+up scales {tuple(scale.shape)} need {2 * half} block rows for 2 x {inter} rows")
    gate = dequantize_fp8_weight(w13[..., :inter, :], scale[..., :half, :], block_size, dtype)
    up = dequantize_fp8_weight(w13[..., inter:, :], scale[..., half:, :], block_size, dtype)
    return torch.cat([gate, up], dim=-2)


def _fp8_matmul_f32(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    block_size: BlockSize, quant_act: bool = True) -> torch.Tensor:
    """float32 ``qdq(x) @ deq(weight)^T`` (``x @ deq(weight)^T`` without ``quant_act``): the math of the fast
    kernels (fp32 accumulate)."""
    if quant_act:
        xq, xs = quantize_fp8_act(x, block_size[1])
        xf = dequantize_fp8_act(xq, xs, block_size[1])
    else:
        xf = x.float()
    return xf @ dequantize_fp8_weight(weight, weight_scale, block_size).T


def _check_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block_size: BlockSize) -> None:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D {FP8_DTYPE} tensor, got {weight.dtype} {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if tuple(weight_scale.shape) != scale_shape(weight.shape[0], weight.shape[1], block_size):
        raise ValueError(f"weight scales {tuple(weight_scale.shape)} do not fit weight {tuple(weight.shape)} in "
                         f"{block_size} blocks")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """``F.linear`` with an FP8 block-quantized weight: x ``[..., K]`` -> ``[..., N]`` in x's dtype."""
    _check_linear(x, weight, weight_scale, block_size)
    x2 = x.reshape(-1, x.shape[-1])
    y = _fp8_matmul_f32(x2, weight, weight_scale, block_size, quantizes_activations(x2.shape[0]))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _split_gated_scale(scale: torch.Tensor, inter: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = _cdiv(inter, block_n)
    return scale[:half], scale[half:]


def _expert_mlp_fp8(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                    block_size: BlockSize, quant_act: bool) -> torch.Tensor:
    """One expert: gate/up in fp32, SiLU(gate)*up rounded to x's dtype (the intermediate the kernels
    store), re-quantized per token group (with ``quant_act``) for the down projection. Returns float32."""
    inter = w2.shape[-1]
    s_gate, s_up = _split_gated_scale(s13, inter, block_size[0])
    gate = _fp8_matmul_f32(x, w13[:inter], s_gate, block_size, quant_act)
    up = _fp8_matmul_f32(x, w13[inter:], s_up, block_size, quant_act)
    h = (F.silu(gate) * up).to(x.dtype)
    return _fp8_matmul_f32(h, w2, s2, block_size, quant_act)


def check_expert_weights(hidden_dim: int, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                         w2_scale: torch.Tensor, block_size: BlockSize) -> int:
    """Validates FP8 expert weights and their scale grids; returns the number of experts."""
    if w13.dim() != 3 or w2.dim() != 3 or w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"w13 {w13.dtype} {tuple(w13.shape)} / w2 {w2.dtype} {tuple(w2.shape)} must be 3-D "
                         f"{FP8_DTYPE}")
    num_experts, two_i, d = w13.shape
    inter = two_i // 2
    if d != hidden_dim or two_i % 2 or w2.shape != (num_experts, hidden_dim, inter):
        raise ValueError(f"weights do not fit hidden size {hidden_dim}: w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    bn, bk = block_size
    want13 = (num_experts, 2 * _cdiv(inter, bn), _cdiv(d, bk))
    want2 = (num_experts, _cdiv(d, bn), _cdiv(inter, bk))
    if tuple(w13_scale.shape) != want13 or tuple(w2_scale.shape) != want2:
        raise ValueError(f"expert scales w13 {tuple(w13_scale.shape)} / w2 {tuple(w2_scale.shape)}, expected "
                         f"{want13} / {want2} for {bn}x{bk} blocks")
    return num_experts


def fp8_moe_forward(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                    block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """``kernels.moe.moe_forward`` (contiguous layout) with FP8 block-quantized experts."""
    num_tokens, top_k = topk_ids.shape
    num_experts = check_expert_weights(hidden.shape[1], w13, w13_scale, w2, w2_scale, block_size)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()
    if flat_ids.numel() and int(flat_ids.max()) >= num_experts:
        raise ValueError(f"topk_ids holds expert {int(flat_ids.max())} but only {num_experts} are local")
    valid = flat_ids >= 0
    token_of = torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k)[valid]
    weight_of = topk_weights.reshape(-1)[valid].float()
    flat_ids = flat_ids[valid]
    quant_act = quantizes_activations(num_tokens * top_k // max(1, num_experts))  # the kernels' tile hint
    for expert in torch.unique(flat_ids).tolist():
        pick = flat_ids == expert
        tokens = token_of[pick]
        y = _expert_mlp_fp8(hidden[tokens], w13[expert], w13_scale[expert], w2[expert], w2_scale[expert], block_size,
                            quant_act)
        out.index_add_(0, tokens, y * weight_of[pick, None])
    return out.to(hidden.dtype)


def fp8_moe_forward_masked(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                           w2: torch.Tensor, w2_scale: torch.Tensor, block_size: BlockSize = (BLOCK, BLOCK),
                           expected_rows_per_expert: int | None = None) -> torch.Tensor:
    """``kernels.moe.moe_forward_masked`` (DeepEP low-latency layout) with FP8 block-quantized experts."""
    num_experts, capacity, _ = x.shape
    quant_act = quantizes_activations(masked_rows_hint(capacity, expected_rows_per_expert))
    check_expert_weights(x.shape[2], w13, w13_scale, w2, w2_scale, block_size)
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must be [{num_experts}], got {tuple(counts.shape)}")
    out = torch.zeros_like(x)
    for expert, count in enumerate(counts.tolist()):
        if count > capacity:
            raise ValueError(f"expert {expert} has {count} rows, capacity is {capacity}")
        if count > 0:
            y = _expert_mlp_fp8(x[expert, :count], w13[expert], w13_scale[expert], w2[expert], w2_scale[expert],
                                block_size, quant_act)
            out[expert, :count] = y.to(x.dtype)
    return out


def fp8_gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor,
                  down_scale: torch.Tensor, block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """A dense MLP ``down(silu(gate(x)) * up(x))`` with FP8 weights as one expert of the masked layout:
    ``gate_up`` ``[2I, D]`` (gate rows, then up rows) with scales ``[2 * ceil(I/bn), ceil(D/bk)]``."""
    counts = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
    return fp8_moe_forward_masked(x.unsqueeze(0), counts, gate_up.unsqueeze(0), gate_up_scale.unsqueeze(0),
                                  down.unsqueeze(0), down_scale.unsqueeze(0), block_size,
                                  expected_rows_per_expert=x.shape[0]).squeeze(0)


def fp8_moe_forward_masked_shared(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                                  w2: torch.Tensor, w2_scale: torch.Tensor, hidden: torch.Tensor,
                                  shared_gate_up: torch.Tensor, shared_gate_up_scale: torch.Tensor,
                                  shared_down: torch.Tensor, shared_down_scale: torch.Tensor,
                                  block_size: BlockSize = (BLOCK, BLOCK),
                                  active: tuple[torch.Tensor, int] | None = None,
                                  f16: F16Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked FP8 MoE and the layer's FP8 shared experts over every token of ``hidden`` ``[capacity, D]``:
    (routed output ``[E, capacity, D]``, shared output ``[capacity, D]``). The shared experts take the
    routed GEMMs' activation mode (their rows are the decode batch, like the masked layout's). ``active``: the
    GPU kernels' grid of active experts; the reference computes every expert. ``f16``: ``x`` and ``hidden`` in
    f16 groups, which the GPU launches may take; the same values, so the reference reads ``x``."""
    out = fp8_moe_forward_masked(x, counts, w13, w13_scale, w2, w2_scale, block_size)
    rows = masked_rows_hint(x.shape[1], None)
    one = torch.full((1,), hidden.shape[0], dtype=torch.int32, device=hidden.device)
    shared = fp8_moe_forward_masked(hidden.unsqueeze(0), one,
                                    shared_gate_up.unsqueeze(0), shared_gate_up_scale.unsqueeze(0),
                                    shared_down.unsqueeze(0), shared_down_scale.unsqueeze(0), block_size,
                                    expected_rows_per_expert=rows).squeeze(0)
    return out, shared
