"""MoE expert compute as grouped GEMMs on the GPU: Triton kernels and a `torch._grouped_mm` path.

Same functions as `kernels.moe`:
  - `moe_forward_triton` / `moe_forward_grouped_mm`: the contiguous (DeepEP high-throughput) layout.
    Routed (token, slot) pairs are sorted by expert on the device; each expert's run is padded to a
    multiple of BLOCK_M so every row block of the grouped GEMM belongs to one expert.
  - `moe_forward_masked_triton`: DeepEP's low-latency layout `[E, capacity, D]` with per-expert counts.
    Fixed grid and shapes, no host sync: safe to capture in a CUDA graph. Row blocks past an expert's
    count skip the matmul and only write zeros, so the work follows the real token count, not capacity.

Both use one kernel, `_moe_gemm_kernel`, run twice: first `x @ w13[e]^T` with the gate and up halves
in two accumulators and SiLU(gate) * up fused into the epilogue (the [*, 2I] intermediate never
reaches memory), then `h @ w2[e]^T`. The contiguous layout's per-slot rows are weighted and summed by
`combine_slots` (the decode combine, float32). DeepGEMM's FP8 grouped GEMMs live in `kernels.fp8_deepgemm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import check_expert_range, check_masked_layout
from kernels.triton_decode_fused import moe_combine_triton, silu_mul_triton
from kernels.triton_grid import grouped_tile, masked_expert
from kernels.triton_moe_fused_decode import fused_decode_applies, moe_fused_decode
from kernels.triton_pdl import pdl_args, pdl_begin


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sorted_rows_ptr,
    block_expert_ptr,
    rows_padded_ptr,
    counts_ptr,
    num_valid_rows,
    N,
    K,
    capacity,
    stride_ae,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_ce,
    stride_cm,
    stride_cn,
    num_experts,
    x_a_ptr,
    x_b_ptr,
    x_c_ptr,
    x_n,
    x_k,
    stride_xam,
    stride_xbn,
    stride_xcm,
    tile_n,
    active_ptr,
    active_slots,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    MASKED: tl.constexpr,
    ZERO_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EXTRA: tl.constexpr,
    ACTIVE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    # EXTRA (masked layout only): grid column `num_experts` runs one more "expert" with its own operands
    # (x_*: activation [capacity, x_k] whose rows are all valid, weight [x_n (x2 if GATED), x_k], output
    # [capacity, x_n]): a layer's shared experts ride in the routed experts' launch. `tile_n` columns are
    # tiled (the wider of the two); programs past their expert's width return at once.
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
    n_mask = offs_n < N

    n_cols = N
    k_dim = K
    a_stride = stride_am
    b_stride = stride_bn
    c_stride = stride_cm
    if MASKED:
        expert = masked_expert(tl.program_id(1), active_ptr, num_experts, active_slots, ACTIVE)
        if expert < 0:  # a column past the active experts (ACTIVE)
            return
        a_base = a_ptr + expert * stride_ae
        b_base = b_ptr + expert * stride_be
        c_base = c_ptr + expert * stride_ce
        count = tl.load(counts_ptr + expert, mask=expert < num_experts, other=0).to(tl.int32)
        if EXTRA:
            if expert == num_experts:
                count = tl.zeros_like(count) + capacity  # a tensor either way (capacity 1 is a constant)
                a_base = x_a_ptr
                b_base = x_b_ptr
                c_base = x_c_ptr
                n_cols = x_n
                k_dim = x_k
                a_stride = stride_xam
                b_stride = stride_xbn
                c_stride = stride_xcm
        if pid_n * BLOCK_N >= n_cols:
            return
        n_mask = offs_n < n_cols
        a_rows = offs_m.to(tl.int64)
        c_rows = a_rows
        row_mask = offs_m < count
        store_mask = offs_m < capacity
        if pid_m * BLOCK_M >= count:
            # The matmul is skipped. The final output's rows past the count are defined as zero;
            # the intermediate's are never read, so the first GEMM writes nothing there.
            if ZERO_TAIL:
                zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=c_ptr.dtype.element_ty)
                tl.store(
                    c_base + c_rows[:, None] * c_stride + offs_n[None, :] * stride_cn,
                    zero,
                    mask=store_mask[:, None] & n_mask[None, :],
                )
            return
    else:
        if pid_m * BLOCK_M >= tl.load(rows_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        rows = tl.load(sorted_rows_ptr + offs_m)
        row_mask = rows < num_valid_rows
        a_base = a_ptr
        b_base = b_ptr + expert * stride_be
        c_base = c_ptr
        a_rows = (rows // A_ROW_DIV).to(tl.int64)
        c_rows = rows.to(tl.int64)
        store_mask = row_mask

    a_ptrs = a_base + a_rows[:, None] * a_stride + offs_k[None, :] * stride_ak
    b_ptrs = b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * b_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(k_dim, BLOCK_K)):
        k_mask = offs_k < k_dim - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            # w13 holds the gate rows then the up rows: the up partner of column n is row N + n.
            b_up = tl.load(b_ptrs + n_cols * b_stride, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(
        c_base + c_rows[:, None] * c_stride + offs_n[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=store_mask[:, None] & n_mask[None, :],
    )


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape of one grouped-GEMM launch (compile-time constants)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def default_gemm_config(rows_per_expert: int, dtype: torch.dtype) -> GemmConfig:
    """Tiles by the expected rows per expert (a shape, never a device value).

    Few rows (decode): a 16-row tile wastes the least padding, the GEMM is bound by reading weights.
    Many rows (prefill): 64 x 128 tiles with 8 warps hold both gate and up accumulators in registers.
    fp32 (the tiny test model) uses small K tiles so two operand stages fit in shared memory.
    """
    if dtype == torch.float32:
        return GemmConfig(block_m=16 if rows_per_expert <= 16 else 32, block_n=64, block_k=32, group_m=8,
                          num_warps=4, num_stages=2)
    if rows_per_expert <= 2:  # batch 1-2: twice the programs per expert, the weight stream spread wider
        return GemmConfig(block_m=16, block_n=32, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 16:
        return GemmConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return GemmConfig(block_m=32, block_n=64, block_k=128, group_m=4, num_warps=4, num_stages=4)
    return GemmConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _validate_weights(hidden_dim: int, w13: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype) -> int:
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} must be [E, *, *]")
    num_experts, two_i, d = w13.shape
    if d != hidden_dim or two_i % 2 or w2.shape != (num_experts, hidden_dim, two_i // 2):
        raise ValueError(
            f"weights do not fit hidden size {hidden_dim}: w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if w13.dtype != dtype or w2.dtype != dtype:
        raise ValueError(f"weights are {w13.dtype}/{w2.dtype}, activations {dtype}")
    return num_experts


@dataclass(frozen=True)
class ExpertSort:
    """Routed (token, slot) rows sorted by expert, each expert's run padded to a multiple of block_m.

    sorted_rows: flat row index `token * top_k + slot` per padded position (padding = num_rows);
    block_expert: the expert of each row block; rows_padded: one-element total of padded rows.
    """

    sorted_rows: torch.Tensor
    block_expert: torch.Tensor
    rows_padded: torch.Tensor
    num_rows: int
    max_blocks: int


def expert_order(key: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The stable argsort of expert ids in [0, num_experts]. Sorted as int16 where they fit: the GPU's radix
    sort makes a pass per key byte, eight for int64 (a 4096-token prefill spent 1.4 of its 55 ms there)."""
    return torch.argsort(key.to(torch.int16) if num_experts < 2**15 else key, stable=True)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertSort:
    """Builds the padded expert-sorted row list on the device with no host sync."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_rows = flat.numel()
    # Rows routed elsewhere (-1) go to a sentinel expert E that sorts last and gets no blocks.
    flat = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts[num_experts] = 0  # the sentinel's rows are dropped
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    padded_starts = padded_ends - padded
    unpadded_starts = torch.cumsum(counts, 0) - counts

    max_blocks = triton.cdiv(num_rows + min(num_experts, num_rows) * (block_m - 1), block_m)
    dump = max_blocks * block_m  # scatter target for dropped rows, past everything the kernel reads
    order = expert_order(flat, num_experts)
    sorted_expert = flat[order]
    rank_in_expert = torch.arange(num_rows, device=device) - unpadded_starts[sorted_expert]
    dest = torch.where(
        sorted_expert < num_experts, padded_starts[sorted_expert] + rank_in_expert, torch.full_like(order, dump)
    )
    sorted_rows = torch.full((dump + 1,), num_rows, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_ends[:num_experts], block_starts, right=True).to(torch.int32)
    return ExpertSort(
        sorted_rows=sorted_rows,
        block_expert=block_expert,
        rows_padded=padded_ends[num_experts - 1 : num_experts].to(torch.int32),
        num_rows=num_rows,
        max_blocks=max_blocks,
    )


def _launch_contiguous(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    sort: ExpertSort,
    a_row_div: int,
    gated: bool,
    cfg: GemmConfig,
) -> None:
    n = w.shape[1] // 2 if gated else w.shape[1]
    grid = (sort.max_blocks * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, w, out,
        sort.sorted_rows, sort.block_expert, sort.rows_padded, sort.rows_padded,
        sort.num_rows, n, w.shape[2], 0,
        0, a.stride(0), a.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        0, out.stride(0), out.stride(1),
        w.shape[0], a, w, out, 0, 0, 0, 0, 0, n, sort.rows_padded, 0,
        A_ROW_DIV=a_row_div, GATED=gated, MASKED=False, ZERO_TAIL=False,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION=_dot_precision(a.dtype), EXTRA=False, ACTIVE=False, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_args(a),
    )  # fmt: skip


def moe_forward_triton(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Contiguous-layout MoE (same contract as `kernels.moe.moe_forward`) with the Triton grouped GEMM."""
    num_tokens, top_k = _validate_routing(hidden, topk_ids, topk_weights)
    num_experts = _validate_weights(hidden.shape[1], w13, w2, hidden.dtype)
    if num_tokens == 0 or top_k == 0 or num_experts == 0:
        return torch.zeros_like(hidden)
    cfg = config or default_gemm_config(num_tokens * top_k // max(1, num_experts), hidden.dtype)
    sort = sort_by_expert(topk_ids, num_experts, cfg.block_m)
    inter = torch.empty((num_tokens * top_k, w2.shape[2]), dtype=hidden.dtype, device=hidden.device)
    _launch_contiguous(hidden, w13, inter, sort, top_k, True, cfg)
    per_slot = torch.empty((num_tokens * top_k, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    _launch_contiguous(inter, w2, per_slot, sort, 1, False, cfg)
    return combine_slots(per_slot, topk_ids, topk_weights)


def combine_slots(per_slot: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The contiguous layout's combine: row ``t * K + k`` of ``per_slot`` is token t's output of its k-th expert.
    Each token's valid slots are weighted and summed in float32 in ascending expert order (the reference's) by
    the decode combine; slots routed elsewhere (-1) are never read, so ``per_slot`` needs no zero fill (a
    [T * K, D] memset, 470 MB at V3's 4096 tokens) and no sum over a padded view."""
    flat_ids = topk_ids.reshape(-1)
    slot = torch.arange(flat_ids.numel(), device=per_slot.device)
    dest = torch.where(flat_ids >= 0, slot, -1)
    return moe_combine_triton(per_slot, dest, topk_ids.contiguous(), topk_weights.float().contiguous())


def grouped_mm_available(dtype: torch.dtype, device: torch.device) -> bool:
    """`torch._grouped_mm` runs bf16 on Hopper (sm90) and newer; other cases use the Triton kernel."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16 or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def moe_forward_grouped_mm(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Contiguous-layout MoE through `torch._grouped_mm` (bf16, sm90+): sort, two grouped GEMMs with SiLU * up
    between them in one kernel, and the weighted top-k sum read straight from the sorted rows (one
    kernel, fp32, the reference's order), without a host sync. A slot whose expert is not in [0, E) (not on
    this rank) contributes nothing."""
    num_tokens, top_k = _validate_routing(hidden, topk_ids, topk_weights)
    num_experts = _validate_weights(hidden.shape[1], w13, w2, hidden.dtype)
    if num_tokens == 0 or top_k == 0 or num_experts == 0:
        return torch.zeros_like(hidden)
    flat = topk_ids.reshape(-1).long()
    local = (flat >= 0) & (flat < num_experts)
    key = torch.where(local, flat, num_experts)
    order = expert_order(key, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=hidden.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:num_experts], 0).to(torch.int32)
    x = hidden[order // top_k]
    gate_up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(silu_mul_triton(gate_up), w2.transpose(1, 2), offs=offs)
    # Where each (token, slot) row went; rows past offs[-1] (not local) hold unspecified values (maybe NaN)
    # and are never read: their slots point nowhere (-1).
    dest = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    dest = torch.where(local, dest, -1)
    return moe_combine_triton(y, dest, topk_ids.contiguous(), topk_weights.contiguous())


def moe_forward_masked_triton(
    x: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: GemmConfig | None = None,
    expected_rows_per_expert: int | None = None,
) -> torch.Tensor:
    """Masked-layout MoE (same contract as `kernels.moe.moe_forward_masked`), CUDA-graph safe.

    `expected_rows_per_expert` (a shape hint, e.g. batch * top_k / experts) picks the tile; without it
    16 is assumed (decode: the capacity is a worst case, real counts are small). Measured on one H100
    with V2-Lite experts in a CUDA graph: 16-row tiles stream the weights at 94 % of copy_ bandwidth at
    6 rows per expert; at 24 rows per expert 32-row tiles are 8 % faster, so pass the hint when known. Counts above the capacity are refused outside graph capture (the check
    needs a host sync); inside a capture they are clamped by the kernel's row mask.
    """
    num_experts = _validate_weights(x.shape[-1], w13, w2, x.dtype)
    check_masked_layout(x, counts, num_experts)
    capacity = x.shape[1]
    out = torch.empty_like(x)
    if num_experts == 0 or capacity == 0:
        return out
    hint = min(capacity, 16) if expected_rows_per_expert is None else expected_rows_per_expert
    cfg = config or default_gemm_config(hint, x.dtype)
    inter = torch.empty((num_experts, capacity, w2.shape[2]), dtype=x.dtype, device=x.device)
    _launch_masked(x, w13, inter, counts, True, cfg)
    _launch_masked(inter, w2, out, counts, False, cfg)
    return out


def moe_forward_masked_shared_triton(
    x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, hidden: torch.Tensor,
    shared_gate_up: torch.Tensor, shared_down: torch.Tensor, expected_rows_per_expert: int | None = None,
    active: tuple[torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.moe.moe_forward_masked_shared`: the masked MoE with the layer's shared experts (one dense
    gated MLP over every token of `hidden` ``[capacity, D]``) as one more expert of the same two launches,
    CUDA-graph safe. Two launches where the routed and shared experts took four (one over the active experts
    where ``kernels.triton_moe_fused_decode`` applies)."""
    num_experts = _validate_weights(x.shape[2], w13, w2, x.dtype)
    capacity = x.shape[1]
    inter_dim = shared_down.shape[1]
    if (x.shape[0] != num_experts or hidden.shape != (capacity, x.shape[2]) or hidden.stride(1) != 1
            or shared_gate_up.shape != (2 * inter_dim, x.shape[2]) or shared_gate_up.dtype != x.dtype
            or shared_down.dtype != x.dtype or shared_gate_up.stride(1) != 1 or shared_down.stride(1) != 1):
        from kernels.moe import moe_forward_masked_shared

        return moe_forward_masked_shared(x, counts, w13, w2, hidden, shared_gate_up, shared_down)
    hint = min(capacity, 16) if expected_rows_per_expert is None else expected_rows_per_expert
    cfg = default_gemm_config(hint, x.dtype)
    if active is not None and fused_decode_applies(x, cfg.block_m):
        fused = moe_fused_decode(x, counts, w13, w2, hidden, shared_gate_up, shared_down, active,
                                 (cfg.block_m, cfg.block_n, cfg.block_k), cfg.num_warps, cfg.num_stages,
                                 _dot_precision(x.dtype))
        if fused is not None:
            return fused
    inter = torch.empty((num_experts, capacity, w2.shape[2]), dtype=x.dtype, device=x.device)
    shared_inter = torch.empty((capacity, inter_dim), dtype=x.dtype, device=x.device)
    _launch_masked(x, w13, inter, counts, True, cfg, (hidden, shared_gate_up, shared_inter), active)
    out = torch.empty_like(x)
    shared_out = torch.empty_like(hidden)
    _launch_masked(inter, w2, out, counts, False, cfg, (shared_inter, shared_down, shared_out), active)
    return out, shared_out


def _launch_masked(
    a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, counts: torch.Tensor, gated: bool, cfg: GemmConfig,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    active: tuple[torch.Tensor, int] | None = None,
) -> None:
    """One masked launch; ``extra`` = (activation ``[cap, K']``, weight ``[N' (x2 gated), K']``, output
    ``[cap, N']``) adds one more expert whose every row is valid (the kernel's EXTRA); ``active`` =
    (``kernels.active_experts(counts)``, slots) launches ``slots`` expert columns that run the active experts
    alone (the others' rows are left unwritten)."""
    n = w.shape[1] // 2 if gated else w.shape[1]
    capacity = a.shape[1]
    xa, xw, xc = extra if extra is not None else (a, w, out)
    x_n = (xw.shape[0] // 2 if gated else xw.shape[0]) if extra is not None else n
    tile_n = max(n, x_n)
    slots = a.shape[0] if active is None else min(active[1], a.shape[0])
    grid = (triton.cdiv(capacity, cfg.block_m) * triton.cdiv(tile_n, cfg.block_n), slots + (extra is not None))
    _moe_gemm_kernel[grid](
        a, w, out,
        counts, counts, counts, counts,
        0, n, w.shape[2], capacity,
        a.stride(0), a.stride(1), a.stride(2),
        w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        a.shape[0], xa, xw, xc, x_n, xa.shape[-1], xa.stride(-2), xw.stride(-2), xc.stride(-2), tile_n,
        active[0] if active is not None else counts, slots,
        A_ROW_DIV=1, GATED=gated, MASKED=True, ZERO_TAIL=not gated,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION=_dot_precision(a.dtype), EXTRA=extra is not None, ACTIVE=active is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(a),
    )  # fmt: skip


def _validate_routing(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[int, int]:
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [T, D], topk_ids {tuple(topk_ids.shape)} and "
            f"topk_weights {tuple(topk_weights.shape)} [T, K]"
        )
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} tokens but {topk_ids.shape[0]} routing rows")
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be integers, got {topk_ids.dtype}")
    if hidden.stride(1) != 1:
        raise ValueError("hidden must be contiguous in its last dim")
    return topk_ids.shape[0], topk_ids.shape[1]


def moe_forward_gpu(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """The contiguous path the backend selector routes to: the faster of the two measured on H100."""
    if PREFER_GROUPED_MM and grouped_mm_available(hidden.dtype, hidden.device):
        return moe_forward_grouped_mm(hidden, topk_ids, topk_weights, w13, w2)
    check_expert_range(topk_ids, w13.shape[0])
    return moe_forward_triton(hidden, topk_ids, topk_weights, w13, w2)


# Measured on one H100 (bench/results/kernels_gpu.json, V2-Lite experts): torch._grouped_mm beat the
# Triton grouped GEMM at 4096 tokens (1.74 vs 1.87 ms) and at 512 tokens (0.65 vs 1.02 ms).
PREFER_GROUPED_MM = True


# Past this many rows a dense MLP runs on cuBLAS rather than as one expert of the masked grouped GEMM.
MASKED_MLP_MAX_ROWS = 256


def gated_mlp_triton(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`kernels.moe.gated_mlp` as one expert of the masked grouped GEMM (gate, up and SiLU in one kernel, the
    down projection in a second): the decode batch's rows are the expert's rows. Prefill's rows: one GEMM for
    gate and up, `silu_mul_triton`, the down GEMM (torch's separate products, silu and product were four
    launches)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype != gate_up.dtype or x.shape[0] == 0:
        from kernels.moe import gated_mlp

        return gated_mlp(x, gate_up, down)
    rows = x.shape[0]
    if rows > MASKED_MLP_MAX_ROWS:  # prefill sizes: cuBLAS for gate and up as one GEMM, SiLU * up in one pass
        return F.linear(silu_mul_triton(F.linear(x, gate_up)), down)
    counts = torch.full((1,), rows, dtype=torch.int32, device=x.device)
    # One expert: the grid is N / block_n programs, so narrow tiles for decode batches (64-column tiles gave
    # 22 programs for a 1408-wide shared expert, and the GEMM read its weights at a fraction of copy_).
    # 32 columns: V2-Lite's shared experts (2816) at batch 1 took 14.8 + 13.2 us against 17.9 + 12.1 with
    # 16 (one H200, bench/results/tune_gpu_moe_dense.json).
    config = None
    if rows <= 16 and x.dtype != torch.float32:
        config = GemmConfig(block_m=16, block_n=32, block_k=256, group_m=1, num_warps=4, num_stages=4)
    out = moe_forward_masked_triton(x.unsqueeze(0), counts, gate_up.unsqueeze(0), down.unsqueeze(0), config=config,
                                    expected_rows_per_expert=rows)
    return out.squeeze(0)
