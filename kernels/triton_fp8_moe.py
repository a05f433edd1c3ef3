"""FP8 block-scaled grouped GEMMs for the experts in Triton (the dense GEMM and the quantizer:
``kernels.triton_fp8``).

Same functions and contracts as ``kernels.fp8``:
  - ``fp8_moe_forward_triton``: contiguous (DeepEP high-throughput) layout, rows sorted by expert and
    padded per expert to the row tile (``kernels.triton_moe.sort_by_expert``).
  - ``fp8_moe_forward_masked_triton``: masked (DeepEP low-latency) layout, fixed grid and no host sync
    (CUDA-graph safe).
  - ``fp8_gated_mlp_triton``: a dense MLP or the shared experts as one expert of the masked layout.

The first GEMM runs gate and up in two accumulators with SiLU(gate) * up in the epilogue; the result is
stored in the activation dtype and, where activations are quantized (``kernels.fp8.quantizes_activations``:
prefill sizes), re-quantized per token group for the second. At decode sizes both GEMMs take their
activations in the model dtype against the dequantized weight tile (W8A16): no quantizer launches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kernels.backend import check_expert_range, check_masked_layout
from kernels.f16_groups import F16Rows, empty_f16_groups, f16_decode_wanted
from kernels.fp8 import (
    BLOCK,
    BlockSize,
    check_expert_weights,
    masked_rows_hint,
    quantizes_activations,
)
from kernels.triton_f16_groups import f16_groups_active, f16_groups_masked, f16_rows
from kernels.triton_fp8 import (
    Fp8GemmConfig,
    _check_device,
    _promote_every,
    _round_to_bf16,
    decode_tile_override,
    dot_precision,
    quantize_fp8_act_triton,
    w8a16_bits,
    w8a16_tile,
)
from kernels.triton_grid import grouped_tile, masked_expert
from kernels.triton_moe import ExpertSort, combine_slots, sort_by_expert
from kernels.triton_moe_fused_decode import fused_decode_applies, moe_fused_decode
from kernels.triton_pdl import pdl_args, pdl_begin

# A decode-size tile set by hand for a GPU the defaults were not measured on (tests/fp8_moe_one_token.py --sweep
# prints the best in this form): "BLOCK_N,WARPS,STAGES[,KB_STEP]" for the masked launches of <= 16 rows per
# expert.
MOE_DECODE_TILE_ENV = "TANDEM_FP8_MOE_DECODE_TILE"


def grouped_gemm_config(rows_per_expert: int, gated: bool = True) -> Fp8GemmConfig:
    """Grouped tiles by the expected rows per expert and by launch: the gated GEMM (gate and up, two weight
    tiles a program) and the down GEMM take their own at prefill sizes, where a gated 64 x 256 tile's two
    weight tiles fit only 2 pipeline stages in an H100's shared memory under Triton 3.6.
    Many rows: 64 x 256 tiles (8 warps), the fastest of bench.gemm --sweep on an H100 at V3's 4096-token expert
    shapes, 3 stages for the gated launch and 4 for the down one (the launches swept apart: down 7.80 -> 7.51 ms
    contiguous, 6.92 -> 6.77 masked; 64 x 128 and 128-row tiles were slower for both, 128 x 128 gated ones
    2-2.6x slower, bench/results/gemm_grouped_sweep_h100_s34.log). Decode's few rows: 16 x 32 tiles, 4 warps,
    4 stages, the fastest of a graph-timed sweep of one V2-Lite layer's two masked W8A16 launches at one token
    on an H100 over 32/64-wide tiles, 2-4 stages, 128/256/512-wide K steps and both weight conversions
    (tests/fp8_moe_one_token.py --sweep, bench/results/fp8_one_token_sweep_h100_s41.log): 36.9 us with the
    "bits" conversion where 3 stages took 39.4 (45.9 with "cvt", whose best, 4 stages, took 41.4); 22.9 us moves
    their bytes at copy_'s rate."""
    if rows_per_expert <= 16:
        tile = decode_tile_override(MOE_DECODE_TILE_ENV)
        if tile is not None:
            return Fp8GemmConfig(block_m=16, block_n=tile[0], group_m=1, num_warps=tile[1], num_stages=tile[2],
                                 kb_step=tile[3] if len(tile) > 3 else 1)
        return Fp8GemmConfig(block_m=16, block_n=32, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return Fp8GemmConfig(block_m=32, block_n=64, group_m=4, num_warps=4, num_stages=4)
    return Fp8GemmConfig(block_m=64, block_n=256, group_m=8, num_warps=8, num_stages=3 if gated else 4)


def _launch_configs(rows_per_expert: int, config: Fp8GemmConfig | None,
                    down_config: Fp8GemmConfig | None) -> tuple[Fp8GemmConfig, Fp8GemmConfig]:
    """(gated launch's, down launch's) tiles: ``config`` alone sets both (as callers timing one tile do)."""
    gated = config or grouped_gemm_config(rows_per_expert, gated=True)
    down = down_config or config or grouped_gemm_config(rows_per_expert, gated=False)
    return gated, down


@triton.jit
def _scaled_dot(a, b, a_s, b_s, PROMOTE: tl.constexpr):
    """One K block's product with both scales: FP8 x FP8 (fp32 promotion every PROMOTE products), or f16
    activations (``kernels.triton_f16_groups``) against the FP8 weight tile converted to f16."""
    if a.dtype == tl.float16:
        return tl.dot(a, b.to(tl.float16)) * a_s[:, None] * b_s[None, :]
    else:
        return tl.dot(a, b, max_num_imprecise_acc=PROMOTE) * a_s[:, None] * b_s[None, :]


@triton.jit
def _fp8_k_loop(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, row_mask, n_mask, k_dim, n_cols, up_scale_row, stride_bn,
                stride_bsn, NUM_KB: tl.constexpr, GATED: tl.constexpr, W8A16: tl.constexpr, PROMOTE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                KB_STEP: tl.constexpr, BITS: tl.constexpr, KB_PER_SCALE: tl.constexpr):
    """The gate (or only) and up accumulators of one output tile over ``NUM_KB`` K blocks of ``BLOCK_K``,
    ``KB_STEP`` of them an iteration (each with its own load and scale, so the sums are the same in the same
    order; more bytes in flight a pipeline stage: one 128-wide FP8 block moves half a bf16 block's bytes).
    ``KB_PER_SCALE`` K blocks share a weight scale: activations scaled per narrower group than the weight's
    (f16 ones written by a 32-wide tile) walk K in their groups."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # NUM_KB = cdiv(K, BLOCK_K), a compile-time constant (one variant per projection's K, a handful per
    # model): Triton 3.6's interpreter cannot loop to a runtime bound under numpy 2.
    for step in range(0, (NUM_KB + KB_STEP - 1) // KB_STEP):
        for j in tl.static_range(KB_STEP):
            kb = step * KB_STEP + j
            # Blocks past NUM_KB (the last step's tail when KB_STEP does not divide it) load nothing.
            k_mask = offs_k < k_dim - kb * BLOCK_K
            s_mask = n_mask
            r_mask = row_mask
            if NUM_KB % KB_STEP != 0:  # vectors compared, never a scalar ANDed in (Triton 3.9's interpreter)
                s_mask = n_mask & (tl.full([BLOCK_N], kb, tl.int32) < NUM_KB)
                r_mask = row_mask & (tl.full([BLOCK_M], kb, tl.int32) < NUM_KB)
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            b_s = tl.load(bs_ptrs + kb // KB_PER_SCALE, mask=s_mask, other=0.0)
            if W8A16:  # a in the model dtype: the weight tile converted to it, only the weight's scale applies
                acc += tl.dot(a, w8a16_tile(b, a, BITS), input_precision=DOT_PRECISION) * b_s[None, :]
            else:
                a_s = tl.load(as_ptrs + kb, mask=r_mask, other=0.0)
                acc += _scaled_dot(a, b, a_s, b_s, PROMOTE)
            if GATED:
                # w13 holds the gate rows then the up rows: the up partner of column n is row n_cols + n, and
                # its scales start at block row up_scale_row (the gate half's block rows, ceil-divided).
                b_up = tl.load(b_ptrs + n_cols * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                bs_up = tl.load(bs_ptrs + up_scale_row * stride_bsn + kb // KB_PER_SCALE, mask=s_mask, other=0.0)
                if W8A16:
                    acc_up += tl.dot(a, w8a16_tile(b_up, a, BITS), input_precision=DOT_PRECISION) * bs_up[None, :]
                else:
                    acc_up += _scaled_dot(a, b_up, a_s, bs_up, PROMOTE)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    return acc, acc_up


@triton.jit
def _fp8_moe_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, sorted_rows_ptr, block_expert_ptr, rows_padded_ptr, counts_ptr,
    num_valid_rows, N, K, capacity, up_scale_row,
    stride_ae, stride_am, stride_ase, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn,
    stride_ce, stride_cm,
    num_experts, x_a_ptr, x_b_ptr, x_bs_ptr, x_c_ptr, x_n, x_k, x_up_scale_row,
    stride_xam, stride_xbn, stride_xbsn, stride_xcm, tile_n, active_ptr, active_slots,
    x_as_ptr, stride_xasm, cs_ptr, stride_cse, stride_csm, x_cs_ptr, stride_xcsm,
    NUM_KB: tl.constexpr, NUM_KB_X: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    MASKED: tl.constexpr, ZERO_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROMOTE: tl.constexpr, W8A16: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EXTRA: tl.constexpr, ACTIVE: tl.constexpr, KB_STEP: tl.constexpr,
    BITS: tl.constexpr, KB_PER_SCALE: tl.constexpr, OUT_F16: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    # EXTRA (masked layout, W8A16 or f16 activations): grid column `num_experts` runs one more "expert" with its
    # own operands (x_*: activation [capacity, x_k] whose rows are all valid and its scales, FP8 weight [x_n (x2 if
    # GATED), x_k] and its block scales, output [capacity, x_n] and its scales): a layer's shared experts ride in
    # the routed experts' launch, as in kernels.triton_moe. `tile_n` columns are tiled (the wider of the two);
    # programs past their expert's width return at once.
    # OUT_F16: the output is f16 with a power-of-two scale per row and BLOCK_N columns (cs, x_cs:
    # kernels.triton_f16_groups), the next launch's activations.
    pid = tl.program_id(0)
    num_n = tl.cdiv(tile_n, BLOCK_N)
    if MASKED:
        num_m = tl.cdiv(capacity, BLOCK_M)
    else:
        num_m = tl.num_programs(0) // num_n
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols = offs_n.to(tl.int64)

    n_cols = N
    k_dim = K
    up_row = up_scale_row
    a_stride = stride_am
    # Tensors, not the constants Triton makes of integer arguments equal to 1 (a scale array of one group a row),
    # so the extra expert's branch may reassign them.
    as_stride = stride_asm + tl.zeros([], tl.int32)
    b_stride = stride_bn
    bs_stride = stride_bsn
    c_stride = stride_cm
    cs_stride = stride_csm + tl.zeros([], tl.int32)
    cs_base = cs_ptr
    is_extra = False
    if MASKED:
        expert = masked_expert(tl.program_id(1), active_ptr, num_experts, active_slots, ACTIVE)
        if expert < 0:
            return
        count = tl.load(counts_ptr + expert, mask=expert < num_experts, other=0).to(tl.int32)
        a_base = a_ptr + expert * stride_ae
        as_base = as_ptr + expert * stride_ase
        b_base = b_ptr + expert * stride_be
        bs_base = bs_ptr + expert * stride_bse
        c_base = c_ptr + expert * stride_ce
        cs_base = cs_ptr + expert * stride_cse
        if EXTRA:
            if expert == num_experts:
                is_extra = True
                count = tl.zeros_like(count) + capacity  # a tensor either way (capacity 1 is a constant)
                a_base = x_a_ptr
                as_base = x_as_ptr
                as_stride = stride_xasm + tl.zeros([], tl.int32)
                cs_base = x_cs_ptr
                cs_stride = stride_xcsm + tl.zeros([], tl.int32)
                b_base = x_b_ptr
                bs_base = x_bs_ptr
                c_base = x_c_ptr
                n_cols = x_n
                k_dim = x_k
                up_row = x_up_scale_row
                a_stride = stride_xam
                b_stride = stride_xbn
                bs_stride = stride_xbsn
                c_stride = stride_xcm
        if pid_n * BLOCK_N >= n_cols:
            return
        n_mask = offs_n < n_cols
        a_rows = offs_m.to(tl.int64)
        c_rows = a_rows
        row_mask = offs_m < count
        store_mask = offs_m < capacity
        if pid_m * BLOCK_M >= count:
            # Skipped: the final output's rows past the count are defined as zero; the intermediate's
            # are never read, so the first GEMM writes nothing there.
            if ZERO_TAIL:
                zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=c_ptr.dtype.element_ty)
                tl.store(c_base + c_rows[:, None] * c_stride + cols[None, :], zero,
                         mask=store_mask[:, None] & n_mask[None, :])
            return
    else:
        n_mask = offs_n < N
        if pid_m * BLOCK_M >= tl.load(rows_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        rows = tl.load(sorted_rows_ptr + offs_m)
        row_mask = rows < num_valid_rows
        a_base = a_ptr
        as_base = as_ptr
        b_base = b_ptr + expert * stride_be
        bs_base = bs_ptr + expert * stride_bse
        c_base = c_ptr
        a_rows = (rows // A_ROW_DIV).to(tl.int64)
        c_rows = rows.to(tl.int64)
        store_mask = row_mask

    a_ptrs = a_base + a_rows[:, None] * a_stride + offs_k[None, :]
    as_ptrs = as_base + a_rows * as_stride
    b_ptrs = b_base + cols[None, :] * b_stride + offs_k[:, None]
    bs_ptrs = bs_base + (offs_n // SCALE_BLOCK_N) * bs_stride
    if is_extra:  # its K (the shared experts' width, for the down projection) has its own trip count
        acc, acc_up = _fp8_k_loop(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, row_mask, n_mask, k_dim, n_cols, up_row,
                                  b_stride, bs_stride, NUM_KB_X, GATED, W8A16, PROMOTE, DOT_PRECISION, BLOCK_M,
                                  BLOCK_N, BLOCK_K, KB_STEP, BITS, KB_PER_SCALE)
    else:
        acc, acc_up = _fp8_k_loop(a_ptrs, as_ptrs, b_ptrs, bs_ptrs, row_mask, n_mask, k_dim, n_cols, up_row,
                                  b_stride, bs_stride, NUM_KB, GATED, W8A16, PROMOTE, DOT_PRECISION, BLOCK_M,
                                  BLOCK_N, BLOCK_K, KB_STEP, BITS, KB_PER_SCALE)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if OUT_F16:
        # Rounded to bf16 first (the W8A16 launch's intermediate), so the f16 values times their scales are
        # exactly what the bf16 path would store.
        q, s = f16_rows(tl.where(n_mask[None, :], _round_to_bf16(acc), 0.0))
        tl.store(c_base + c_rows[:, None] * c_stride + cols[None, :], q.to(tl.float16),
                 mask=store_mask[:, None] & n_mask[None, :])
        tl.store(cs_base + c_rows * cs_stride + pid_n, s, mask=store_mask)
    else:
        tl.store(c_base + c_rows[:, None] * c_stride + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=store_mask[:, None] & n_mask[None, :])


# (config, gated, W8A16, extra) -> the pipeline stages that fit the device's shared memory, once found smaller
_STAGES_THAT_FIT: dict[tuple[Fp8GemmConfig, bool, bool, bool], int] = {}


def _launch_fitting(launch: Callable[[int], object], key: tuple[Fp8GemmConfig, bool, bool, bool],
                    stages: int) -> None:
    """``launch(stages)``, or with the most stages (down to 1) whose buffers fit the device's shared memory.
    A tile's need depends on the compiler as well as the tile (the gated 64 x 256 prefill tile fit 3 stages in
    an H100's 227 KiB under one Triton and needs 240 KiB under Triton 3.6); Triton raises OutOfResources
    before anything is launched, so a retry is safe, and the answer is kept for the next launch."""
    stages = _STAGES_THAT_FIT.get(key, stages)
    while True:
        try:
            launch(stages)
            break
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _STAGES_THAT_FIT[key] = stages


def _launch_contiguous(aq: torch.Tensor, a_s: torch.Tensor | None, w: torch.Tensor, w_s: torch.Tensor,
                       out: torch.Tensor, sort: ExpertSort, a_row_div: int, gated: bool, cfg: Fp8GemmConfig,
                       block_size: BlockSize) -> None:
    """``a_s`` None: ``aq`` is unquantized (W8A16)."""
    n = w.shape[1] // 2 if gated else w.shape[1]
    grid = (sort.max_blocks * triton.cdiv(n, cfg.block_n),)
    _launch_fitting(lambda stages: _fp8_moe_gemm_kernel[grid](
        aq, a_s if a_s is not None else w_s, w, w_s, out,
        sort.sorted_rows, sort.block_expert, sort.rows_padded, sort.rows_padded,
        sort.num_rows, n, w.shape[2], 0, triton.cdiv(n, block_size[0]),
        0, aq.stride(0), 0, a_s.stride(0) if a_s is not None else 0, w.stride(0), w.stride(1), w_s.stride(0),
        w_s.stride(1), 0, out.stride(0),
        *_no_extra(aq, w, w_s, out, n, w.shape[0]), sort.rows_padded, 0, *_no_f16(w_s),
        NUM_KB=triton.cdiv(w.shape[2], block_size[1]), NUM_KB_X=1, SCALE_BLOCK_N=block_size[0],
        A_ROW_DIV=a_row_div, GATED=gated,
        MASKED=False, ZERO_TAIL=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_size[1],
        GROUP_M=cfg.group_m, PROMOTE=_promote_every(block_size), W8A16=a_s is None,
        DOT_PRECISION=dot_precision(aq.dtype), EXTRA=False, ACTIVE=False, KB_STEP=cfg.kb_step,
        BITS=a_s is None and w8a16_bits(aq), KB_PER_SCALE=1, OUT_F16=False,
        num_warps=cfg.num_warps, num_stages=stages, **pdl_args(aq),
    ), (cfg, gated, a_s is None, False), cfg.num_stages)  # fmt: skip


def _no_f16(any_tensor: torch.Tensor) -> tuple:
    """The kernel's extra-activation-scale and output-scale arguments where neither is read."""
    return (any_tensor, 0, any_tensor, 0, 0, any_tensor, 0)


def _no_extra(a: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out: torch.Tensor, n: int,
              num_experts: int) -> tuple:
    """The kernel's EXTRA arguments when there is no extra expert (num_experts bounds the masked layout's
    count loads; the x_* are never read; tile_n = n)."""
    return (num_experts, a, w, w_s, out, 0, 0, 0, 0, 0, 0, 0, n)


def _active_args(active: tuple[torch.Tensor, int] | None, counts: torch.Tensor, num_experts: int) -> tuple:
    """(active list, grid slots) for the kernel: every expert's column without ``active``."""
    return (counts, num_experts) if active is None else (active[0], min(active[1], num_experts))


def _activations(x: torch.Tensor, quantize: bool, block_size: BlockSize) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 rows, scales) for a GEMM that quantizes its activations, else (the rows as they are, None)."""
    return quantize_fp8_act_triton(x, block_size[1]) if quantize else (x, None)


def _check_moe_inputs(hidden_dim: int, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                      w2_scale: torch.Tensor, block_size: BlockSize) -> int:
    num_experts = check_expert_weights(hidden_dim, w13, w13_scale, w2, w2_scale, block_size)
    for t in (w13, w2, w13_scale, w2_scale):
        if t.stride(-1) != 1:
            raise ValueError("expert weights and scales must be contiguous in their last dim")
    return num_experts


def fp8_moe_forward_triton(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                           block_size: BlockSize = (BLOCK, BLOCK), config: Fp8GemmConfig | None = None,
                           down_config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """Contiguous-layout FP8 MoE (same contract as ``kernels.fp8.fp8_moe_forward``). ``config`` sets the tiles
    of both launches, ``down_config`` the down GEMM's apart (``grouped_gemm_config`` where not given)."""
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [T, D], topk_ids/weights [T, K]")
    if topk_ids.shape[0] != hidden.shape[0] or topk_ids.dtype.is_floating_point:
        raise ValueError(f"{hidden.shape[0]} tokens but routing {topk_ids.dtype} {tuple(topk_ids.shape)}")
    num_experts = _check_moe_inputs(hidden.shape[1], w13, w13_scale, w2, w2_scale, block_size)
    _check_device(hidden)
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0 or top_k == 0 or num_experts == 0:
        return torch.zeros_like(hidden)
    check_expert_range(topk_ids, num_experts)
    rows_hint = num_tokens * top_k // max(1, num_experts)
    cfg, down_cfg = _launch_configs(rows_hint, config, down_config)
    quant = quantizes_activations(rows_hint)
    # Both launches walk the same sorted, padded rows: the down GEMM keeps the gated one's row tile.
    down_cfg = replace(down_cfg, block_m=cfg.block_m)
    sort = sort_by_expert(topk_ids, num_experts, cfg.block_m)
    hq, hs = _activations(hidden.contiguous(), quant, block_size)
    inter = torch.empty((num_tokens * top_k, w2.shape[2]), dtype=hidden.dtype, device=hidden.device)
    _launch_contiguous(hq, hs, w13, w13_scale, inter, sort, top_k, True, cfg, block_size)
    # Rows routed elsewhere hold garbage in `inter` and get garbage scales; the second GEMM never reads them.
    iq, is_ = _activations(inter, quant, block_size)
    per_slot = torch.empty((num_tokens * top_k, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    _launch_contiguous(iq, is_, w2, w2_scale, per_slot, sort, 1, False, down_cfg, block_size)
    return combine_slots(per_slot, topk_ids, topk_weights)


def _launch_masked(aq: torch.Tensor, a_s: torch.Tensor | None, w: torch.Tensor, w_s: torch.Tensor,
                   out: torch.Tensor, counts: torch.Tensor, gated: bool, cfg: Fp8GemmConfig,
                   block_size: BlockSize, extra: tuple[torch.Tensor, ...] | None = None,
                   active: tuple[torch.Tensor, int] | None = None, a_group: int | None = None,
                   out_scales: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
    """aq ``[E, cap, K]`` fp8 or f16, a_s ``[E, cap, ceil(K / a_group)]`` (None: aq unquantized, W8A16), out
    ``[E, cap, N]``. ``a_group``: the columns one activation scale covers (the weight's K block where not
    given; a narrower one must divide it). ``extra`` = (activation ``[cap, K']``, FP8 weight ``[N' (x2 gated),
    K']``, its block scales, output ``[cap, N']``, and with ``a_s`` the activation's scales) adds one more expert
    whose every row is valid (the kernel's EXTRA). ``active`` = (``kernels.active_experts(counts)``, slots): a
    grid of the active experts alone (the others' rows are left unwritten). ``out_scales`` = (out's scales
    ``[E, cap, ceil(N / block_n)]``, the extra output's ``[cap, ceil(N' / block_n)]`` or None): out and the extra
    output are f16 with a power-of-two scale per row and tile (``kernels.triton_f16_groups``)."""
    n = w.shape[1] // 2 if gated else w.shape[1]
    capacity = aq.shape[1]
    group = a_group or block_size[1]
    assert block_size[1] % group == 0, f"activation groups of {group} do not divide K blocks of {block_size[1]}"
    if extra is None:
        extra_args = _no_extra(aq, w, w_s, out, n, aq.shape[0])
        num_kb_x = 1
    else:
        assert (a_s is None) == (len(extra) == 4), "the extra expert's activations take scales where the others do"
        xa, xw, xws, xc = extra[:4]
        x_n = xw.shape[0] // 2 if gated else xw.shape[0]
        extra_args = (aq.shape[0], xa, xw, xws, xc, x_n, xa.shape[1], triton.cdiv(x_n, block_size[0]),
                      xa.stride(0), xw.stride(0), xws.stride(0), xc.stride(0), max(n, x_n))
        num_kb_x = triton.cdiv(xa.shape[1], group)
    tile_n = extra_args[-1]
    f16_args = list(_no_f16(w_s))
    if extra is not None and len(extra) > 4:
        f16_args[0:2] = [extra[4], extra[4].stride(0)]
    if out_scales is not None:
        f16_args[2:5] = [out_scales[0], out_scales[0].stride(0), out_scales[0].stride(1)]
        if out_scales[1] is not None:
            f16_args[5:7] = [out_scales[1], out_scales[1].stride(0)]
    active_list, slots = _active_args(active, counts, aq.shape[0])
    grid = (triton.cdiv(capacity, cfg.block_m) * triton.cdiv(tile_n, cfg.block_n), slots + (extra is not None))
    _launch_fitting(lambda stages: _fp8_moe_gemm_kernel[grid](
        aq, a_s if a_s is not None else w_s, w, w_s, out, counts, counts, counts, counts,
        0, n, w.shape[2], capacity, triton.cdiv(n, block_size[0]),
        aq.stride(0), aq.stride(1), a_s.stride(0) if a_s is not None else 0, a_s.stride(1) if a_s is not None else 0,
        w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1), out.stride(0), out.stride(1),
        *extra_args, active_list, slots, *f16_args,
        NUM_KB=triton.cdiv(w.shape[2], group), NUM_KB_X=num_kb_x, SCALE_BLOCK_N=block_size[0], A_ROW_DIV=1,
        GATED=gated, MASKED=True, ZERO_TAIL=not gated,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=group, GROUP_M=cfg.group_m,
        PROMOTE=_promote_every(block_size), W8A16=a_s is None, DOT_PRECISION=dot_precision(aq.dtype),
        EXTRA=extra is not None, ACTIVE=active is not None, KB_STEP=cfg.kb_step * (block_size[1] // group),
        BITS=a_s is None and w8a16_bits(aq), KB_PER_SCALE=block_size[1] // group, OUT_F16=out_scales is not None,
        num_warps=cfg.num_warps, num_stages=stages, **pdl_args(aq),
    ), (cfg, gated, a_s is None, extra is not None), cfg.num_stages)  # fmt: skip


def fp8_moe_forward_masked_triton(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                                  w2: torch.Tensor, w2_scale: torch.Tensor, block_size: BlockSize = (BLOCK, BLOCK),
                                  config: Fp8GemmConfig | None = None,
                                  expected_rows_per_expert: int | None = None,
                                  down_config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """Masked-layout FP8 MoE (same contract as ``kernels.fp8.fp8_moe_forward_masked``), CUDA-graph safe.

    ``expected_rows_per_expert`` is a tile hint as in ``kernels.triton_moe.moe_forward_masked_triton``;
    ``config`` / ``down_config`` as in ``fp8_moe_forward_triton``.
    """
    num_experts = _check_moe_inputs(x.shape[-1], w13, w13_scale, w2, w2_scale, block_size)
    check_masked_layout(x, counts, num_experts)
    _check_device(x)
    capacity, hidden_dim = x.shape[1], x.shape[2]
    out = torch.empty_like(x)
    if num_experts == 0 or capacity == 0:
        return out
    hint = masked_rows_hint(capacity, expected_rows_per_expert)
    cfg, down_cfg = _launch_configs(hint, config, down_config)
    inter_dim = w2.shape[2]
    if not quantizes_activations(hint):  # decode sizes: both GEMMs on the rows as they are (W8A16)
        x = x if x.stride(2) == 1 else x.contiguous()
        if _f16_decode_applies(x, cfg, block_size):  # or on their f16 form (a dense MLP's one expert among them)
            xq, xs = f16_groups_masked(x, counts, block_size[1])
            inter16, inter_s = empty_f16_groups((num_experts, capacity), inter_dim, cfg.block_n, x.device)
            _launch_masked(xq, xs, w13, w13_scale, inter16, counts, True, cfg, block_size, out_scales=(inter_s, None))
            _launch_masked(inter16, inter_s, w2, w2_scale, out, counts, False, down_cfg, block_size,
                           a_group=cfg.block_n)
            return out
        inter = torch.empty((num_experts, capacity, inter_dim), dtype=x.dtype, device=x.device)
        _launch_masked(x, None, w13, w13_scale, inter, counts, True, cfg, block_size)
        _launch_masked(inter, None, w2, w2_scale, out, counts, False, down_cfg, block_size)
        return out
    inter = torch.empty((num_experts, capacity, inter_dim), dtype=x.dtype, device=x.device)
    x2 = x.reshape(num_experts * capacity, hidden_dim)  # a view for the contiguous layouts callers build
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    xq, xs = quantize_fp8_act_triton(x2, block_size[1], counts, capacity)
    _launch_masked(xq.view(num_experts, capacity, hidden_dim), xs.view(num_experts, capacity, -1), w13, w13_scale,
                   inter, counts, True, cfg, block_size)
    iq, is_ = quantize_fp8_act_triton(inter.view(num_experts * capacity, inter_dim), block_size[1], counts, capacity)
    _launch_masked(iq.view(num_experts, capacity, inter_dim), is_.view(num_experts, capacity, -1), w2, w2_scale,
                   out, counts, False, down_cfg, block_size)
    return out


def fp8_moe_forward_masked_shared_triton(
        x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
        w2_scale: torch.Tensor, hidden: torch.Tensor, shared_gate_up: torch.Tensor, shared_gate_up_scale: torch.Tensor,
        shared_down: torch.Tensor, shared_down_scale: torch.Tensor, block_size: BlockSize = (BLOCK, BLOCK),
        active: tuple[torch.Tensor, int] | None = None, f16: F16Rows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.fp8.fp8_moe_forward_masked_shared``: the masked FP8 MoE with the layer's FP8 shared experts
    (one gated MLP over every token of ``hidden`` ``[capacity, D]``) as one more expert of the same two launches,
    CUDA-graph safe: two launches where the routed and shared experts took four (one over the active experts
    where ``kernels.triton_moe_fused_decode`` applies). At decode sizes (W8A16); elsewhere (or on shapes it
    does not take) the two run apart."""
    num_experts = _check_moe_inputs(x.shape[2], w13, w13_scale, w2, w2_scale, block_size)
    capacity = x.shape[1]
    inter_dim = shared_down.shape[1]
    hint = masked_rows_hint(capacity, None)
    fits = (x.shape[0] == num_experts and hidden.shape == (capacity, x.shape[2]) and hidden.stride(1) == 1
            and x.stride(2) == 1 and shared_gate_up.shape == (2 * inter_dim, x.shape[2])
            and shared_gate_up.stride(1) == 1 and shared_down.stride(1) == 1
            and shared_gate_up_scale.stride(1) == 1 and shared_down_scale.stride(1) == 1)
    if not fits or quantizes_activations(hint) or capacity == 0:  # apart, as the reference computes them
        out = fp8_moe_forward_masked_triton(x, counts, w13, w13_scale, w2, w2_scale, block_size)
        one = torch.full((1,), hidden.shape[0], dtype=torch.int32, device=hidden.device)
        shared = fp8_moe_forward_masked_triton(hidden.unsqueeze(0), one, shared_gate_up.unsqueeze(0),
                                               shared_gate_up_scale.unsqueeze(0), shared_down.unsqueeze(0),
                                               shared_down_scale.unsqueeze(0), block_size,
                                               expected_rows_per_expert=hint)
        return out, shared.squeeze(0)
    _check_device(x)
    cfg, down_cfg = _launch_configs(hint, None, None)
    takes_f16 = active is not None and _f16_decode_applies(x, cfg, block_size)
    if takes_f16 and f16 is None:  # a caller without the scatter's f16 rows: one launch writes them
        f16 = f16_groups_active(x, counts, active, hidden, block_size[1])
    if active is not None and cfg == down_cfg and fused_decode_applies(x, cfg.block_m, cfg.kb_step):
        fused = moe_fused_decode(x, counts, w13, w2, hidden, shared_gate_up, shared_down, active,
                                 (cfg.block_m, cfg.block_n, block_size[1]), cfg.num_warps, cfg.num_stages,
                                 dot_precision(x.dtype),
                                 (w13_scale, w2_scale, shared_gate_up_scale, shared_down_scale), block_size[0],
                                 f16 if takes_f16 else None)
        if fused is not None:
            return fused
    if takes_f16:
        assert f16 is not None
        return _masked_shared_f16(x, counts, w13, w13_scale, w2, w2_scale, shared_gate_up, shared_gate_up_scale,
                                  shared_down, shared_down_scale, block_size, active, cfg, down_cfg, f16)
    inter = torch.empty((num_experts, capacity, w2.shape[2]), dtype=x.dtype, device=x.device)
    shared_inter = torch.empty((capacity, inter_dim), dtype=x.dtype, device=x.device)
    _launch_masked(x, None, w13, w13_scale, inter, counts, True, cfg, block_size,
                   (hidden, shared_gate_up, shared_gate_up_scale, shared_inter), active)
    out = torch.empty_like(x)
    shared_out = torch.empty_like(hidden)
    _launch_masked(inter, None, w2, w2_scale, out, counts, False, down_cfg, block_size,
                   (shared_inter, shared_down, shared_down_scale, shared_out), active)
    return out, shared_out


def _f16_decode_applies(x: torch.Tensor, cfg: Fp8GemmConfig, block_size: BlockSize) -> bool:
    """Whether the two decode launches take f16 activations (``kernels.triton_f16_groups``): switched on, bf16
    rows (whose f16 form is exact) or the interpreter's checks, and gated tiles that divide a weight K block
    (the down launch walks K in their scale groups)."""
    return (f16_decode_wanted() and (x.dtype == torch.bfloat16 or not x.is_cuda)
            and block_size[1] % cfg.block_n == 0 and cfg.kb_step == 1)


def _masked_shared_f16(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                       w2: torch.Tensor, w2_scale: torch.Tensor, shared_gate_up: torch.Tensor,
                       shared_gate_up_scale: torch.Tensor, shared_down: torch.Tensor, shared_down_scale: torch.Tensor,
                       block_size: BlockSize, active: tuple[torch.Tensor, int], cfg: Fp8GemmConfig,
                       down_cfg: Fp8GemmConfig, f16: F16Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_moe_forward_masked_shared_triton``'s two decode launches on f16 activations: ``f16`` holds the
    routed rows and the shared experts' rows in f16 with a scale per 128 columns, the gated launch writes its
    output in f16 with a scale per row and tile, and the down launch walks K in those tiles."""
    num_experts, capacity, _ = x.shape
    inter_dim, shared_inter_dim = w2.shape[2], shared_down.shape[1]
    xq, xs, hq, hs = f16
    inter, inter_s = empty_f16_groups((num_experts, capacity), inter_dim, cfg.block_n, x.device)
    shared_inter, shared_inter_s = empty_f16_groups((capacity,), shared_inter_dim, cfg.block_n, x.device)
    _launch_masked(xq, xs, w13, w13_scale, inter, counts, True, cfg, block_size,
                   (hq, shared_gate_up, shared_gate_up_scale, shared_inter, hs), active,
                   out_scales=(inter_s, shared_inter_s))
    out = torch.empty_like(x)
    shared_out = torch.empty((capacity, x.shape[2]), dtype=x.dtype, device=x.device)
    _launch_masked(inter, inter_s, w2, w2_scale, out, counts, False, down_cfg, block_size,
                   (shared_inter, shared_down, shared_down_scale, shared_out, shared_inter_s), active,
                   a_group=cfg.block_n)
    return out, shared_out


def fp8_gated_mlp_triton(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor,
                         down_scale: torch.Tensor, block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """``kernels.fp8.fp8_gated_mlp``: four launches (quantize, gated GEMM, quantize, GEMM; two at decode sizes)
    where three FP8 linears and the SiLU-multiply took up to eleven (split-K partial sums and casts included)."""
    rows = x.shape[0]
    counts = torch.full((1,), rows, dtype=torch.int32, device=x.device)
    # One expert: the grid is N / block_n programs, so decode batches take 16-column tiles (a 64-wide tile
    # gives a 2816-row shared expert 44 programs to stream its weight with).
    config = Fp8GemmConfig(block_m=16, block_n=16, group_m=1, num_warps=4, num_stages=4) if rows <= 16 else None
    out = fp8_moe_forward_masked_triton(x.unsqueeze(0), counts, gate_up.unsqueeze(0), gate_up_scale.unsqueeze(0),
                                        down.unsqueeze(0), down_scale.unsqueeze(0), block_size, config,
                                        expected_rows_per_expert=rows)
    return out.squeeze(0)
