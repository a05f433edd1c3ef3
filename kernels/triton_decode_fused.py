"""The fused decode-step ops of `kernels.decode_fused`, each one Triton kernel, CUDA-graph safe (fixed
grids from shapes, no host sync). Same arithmetic and roundings as the references; only float32 sums may
run in another order (and multiply-adds may fuse), so results agree to float32 rounding.

Replaced per V2-Lite MoE layer of a decode step (bench.decode_step --profile): residual add + RMSNorm
(2 -> 1, twice), latent norm + k RoPE + pool write + q RoPE (~20 -> 1), the router after its GEMM
(~10 -> 1), and the scatter / weighted sum around the masked expert GEMM (~30 -> 2; the active-expert
list for the masked GEMMs' grid rides in the scatter's launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import decode_fused
from kernels import moe as moe_ref
from kernels.f16_groups import F16Rows, empty_f16_groups
from kernels.triton_f16_groups import f16_groups_of_row
from kernels.triton_pdl import pdl_args, pdl_begin


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s, dim, eps,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(sum_ptr.dtype.element_ty)  # the add rounds to the dtype, as torch's does
    tl.store(sum_ptr + row * stride_s + offs, s, mask=mask)
    s32 = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=0) / dim + eps)
    y = (s32 * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dim = x.shape[-1]
    if (x.dim() != 2 or residual.shape != x.shape or x.dtype != residual.dtype or weight.dtype != x.dtype
            or weight.shape != (dim,) or x.stride(-1) != 1 or residual.stride(-1) != 1 or dim > 16384
            or x.shape[0] == 0):
        return decode_fused.add_rms_norm(x, residual, weight, eps)
    out, summed = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, out, summed, x.stride(0), residual.stride(0), out.stride(0), summed.stride(0),
        dim, eps, BLOCK=block, num_warps=4 if block <= 2048 else 8, **pdl_args(x),
    )  # fmt: skip
    return out, summed


@triton.jit
def _rotate(x1, x2, c, s, DT: tl.constexpr):
    # torch's bf16 `x1 * c - x2 * s`: each product rounds to the dtype, then the difference does.
    o1 = ((x1 * c).to(DT).to(tl.float32) - (x2 * s).to(DT).to(tl.float32)).to(DT)
    o2 = ((x2 * c).to(DT).to(tl.float32) + (x1 * s).to(DT).to(tl.float32)).to(DT)
    return o1, o2


@triton.jit
def _mla_decode_prep_kernel(
    q_ptr, kv_a_ptr, cos_ptr, sin_ptr, w_ptr, cache_ptr, pages_ptr, slots_ptr, out_ptr,
    stride_qt, stride_qh, stride_kt, stride_cp, stride_cs, stride_ot, stride_oh,
    num_heads, lora, nope, eps,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    mla_decode_prep_token(tl.program_id(0).to(tl.int64), q_ptr, kv_a_ptr, cos_ptr, sin_ptr, w_ptr, cache_ptr,
                          pages_ptr, slots_ptr, out_ptr, stride_qt, stride_qh, stride_kt, stride_cp, stride_cs,
                          stride_ot, stride_oh, num_heads, lora, nope, eps, HALF, BLOCK_R, BLOCK_H, INTERLEAVE)


@triton.jit
def mla_decode_prep_token(
    t, q_ptr, kv_a_ptr, cos_ptr, sin_ptr, w_ptr, cache_ptr, pages_ptr, slots_ptr, out_ptr,
    stride_qt, stride_qh, stride_kt, stride_cp, stride_cs, stride_ot, stride_oh,
    num_heads, lora, nope, eps,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVE: tl.constexpr,
):
    """`mla_decode_prep`'s work for token t (int64)."""
    dt = kv_a_ptr.dtype.element_ty
    cache_dt = cache_ptr.dtype.element_ty
    # The latent's RMSNorm (kernels.norm.rms_norm's roundings).
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < lora
    x = tl.load(kv_a_ptr + t * stride_kt + offs_r, mask=rmask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / lora + eps)
    y = (x * inv).to(dt).to(tl.float32)
    w = tl.load(w_ptr + offs_r, mask=rmask, other=0.0).to(tl.float32)
    latent = (w * y).to(dt)
    page = tl.load(pages_ptr + t).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    dst = cache_ptr + page * stride_cp + slot * stride_cs
    tl.store(dst + offs_r, latent.to(cache_dt), mask=rmask)
    # RoPE of k_pe, written after the latent as halves.
    offs_i = tl.arange(0, HALF)
    if INTERLEAVE:
        i1 = 2 * offs_i
        i2 = 2 * offs_i + 1
    else:
        i1 = offs_i
        i2 = offs_i + HALF
    c = tl.load(cos_ptr + t * HALF + offs_i).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + t * HALF + offs_i).to(dt).to(tl.float32)
    k1 = tl.load(kv_a_ptr + t * stride_kt + lora + i1).to(tl.float32)
    k2 = tl.load(kv_a_ptr + t * stride_kt + lora + i2).to(tl.float32)
    o1, o2 = _rotate(k1, k2, c, s, dt)
    tl.store(dst + lora + offs_i, o1.to(cache_dt))
    tl.store(dst + lora + HALF + offs_i, o2.to(cache_dt))
    # RoPE of every head's q_pe.
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h[:, None] < num_heads
    qb = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + nope
    q1 = tl.load(qb + i1[None, :], mask=hmask, other=0.0).to(tl.float32)
    q2 = tl.load(qb + i2[None, :], mask=hmask, other=0.0).to(tl.float32)
    p1, p2 = _rotate(q1, q2, c[None, :], s[None, :], dt)
    ob = out_ptr + t * stride_ot + offs_h[:, None] * stride_oh
    tl.store(ob + offs_i[None, :], p1, mask=hmask)
    tl.store(ob + HALF + offs_i[None, :], p2, mask=hmask)


def mla_decode_prep_runs(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         norm_weight: torch.Tensor, kv_cache: torch.Tensor, nope_dim: int) -> bool:
    """Whether the prep kernel takes these operands (else the torch reference runs). FP8 pools take the
    reference's quantized write (kept off the kernel: one rounding path for them)."""
    num_tokens, _, qk_dim = q.shape
    lora, rope = norm_weight.shape[0], qk_dim - nope_dim
    half = rope // 2
    return not (num_tokens == 0 or rope % 2 or half & (half - 1) or kv_a.shape != (num_tokens, lora + rope)
                or q.stride(2) != 1 or kv_a.stride(1) != 1 or kv_a.dtype != q.dtype or norm_weight.dtype != q.dtype
                or cos.shape != (num_tokens, half) or not (cos.is_contiguous() and sin.is_contiguous())
                or kv_cache.stride(2) != 1 or kv_cache.shape[2] != lora + rope
                or kv_cache.dtype in decode_fused.FP8_MAX)


def mla_decode_prep_triton(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor,
                           write_pages: torch.Tensor, write_slots: torch.Tensor, nope_dim: int,
                           interleave: bool, kv_scale: float = 1.0, in_place: bool = False) -> torch.Tensor:
    num_tokens, num_heads, qk_dim = q.shape
    lora, rope = norm_weight.shape[0], qk_dim - nope_dim
    half = rope // 2
    if not mla_decode_prep_runs(q, kv_a, cos, sin, norm_weight, kv_cache, nope_dim):
        return decode_fused.mla_decode_prep(q, kv_a, cos, sin, norm_weight, eps, kv_cache, write_pages,
                                            write_slots, nope_dim, interleave, kv_scale, in_place)
    # In place, each program reads its token's q_pe before it writes the rotation over it.
    out = q[..., nope_dim:] if in_place else torch.empty((num_tokens, num_heads, rope), dtype=q.dtype,
                                                          device=q.device)
    _mla_decode_prep_kernel[(num_tokens,)](
        q, kv_a, cos, sin, norm_weight, kv_cache, write_pages, write_slots, out,
        q.stride(0), q.stride(1), kv_a.stride(0), kv_cache.stride(0), kv_cache.stride(1),
        out.stride(0), out.stride(1), num_heads, lora, nope_dim, eps,
        HALF=half, BLOCK_R=triton.next_power_of_2(lora), BLOCK_H=triton.next_power_of_2(num_heads),
        INTERLEAVE=interleave, num_warps=4, **pdl_args(q),
    )  # fmt: skip
    return out


@triton.jit
def router_topk_row(x, offs, emask, bias_ptr, group_size, TOP_K: tl.constexpr, N_GROUP: tl.constexpr,
                    TOPK_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
                    HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, V3_GROUPS: tl.constexpr):
    """One token's expert choice from its float32 logits ``x`` (``-inf`` past the experts): (weights, ids) over
    ``BLOCK_K`` slots, weights not yet normalised or scaled (`router_topk_store`)."""
    if SIGMOID:
        scores = tl.where(emask, 1.0 / (1.0 + tl.exp(-x)), 0.0)
    else:
        e = tl.exp(x - tl.max(x, axis=0))
        scores = e / tl.sum(e, axis=0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    choice = tl.where(emask, choice, float("-inf"))
    if GROUPED:
        gid = offs // group_size
        goffs = tl.arange(0, BLOCK_G)
        group_scores = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            v = tl.where(gid == g, choice, float("-inf"))
            best = tl.max(v, axis=0)
            if V3_GROUPS:  # the sum of the group's two best biased scores
                v = tl.where(offs == tl.argmax(v, axis=0), float("-inf"), v)
                best = best + tl.max(v, axis=0)
            group_scores = tl.where(goffs == g, best, group_scores)
        keep = offs < 0
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.argmax(group_scores, axis=0)
            keep = keep | (gid == g)
            group_scores = tl.where(goffs == g, float("-inf"), group_scores)
        # V3 masks with -inf (biased scores may be negative); V2 with 0 (softmax scores are > 0).
        fill = float("-inf") if V3_GROUPS else 0.0
        choice = tl.where(emask, tl.where(keep, choice, fill), float("-inf"))
    koffs = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int64)
    for k in tl.static_range(TOP_K):
        idx = tl.argmax(choice, axis=0)
        weights = tl.where(koffs == k, tl.sum(tl.where(offs == idx, scores, 0.0), axis=0), weights)
        ids = tl.where(koffs == k, idx.to(tl.int64), ids)
        choice = tl.where(offs == idx, float("-inf"), choice)
    return weights, ids


@triton.jit
def router_topk_store(weights, ids, w_out_ptr, id_out_ptr, t, scaling, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORMALIZE: tl.constexpr):
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    koffs = tl.arange(0, BLOCK_K)
    kmask = koffs < TOP_K
    tl.store(w_out_ptr + t * TOP_K + koffs, weights * scaling, mask=kmask)
    tl.store(id_out_ptr + t * TOP_K + koffs, ids, mask=kmask)


@triton.jit
def _router_topk_kernel(
    logits_ptr, bias_ptr, w_out_ptr, id_out_ptr, stride_l, num_experts, group_size, scaling,
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr, V3_GROUPS: tl.constexpr, NORMALIZE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    emask = offs < num_experts
    x = tl.load(logits_ptr + t * stride_l + offs, mask=emask, other=float("-inf")).to(tl.float32)
    weights, ids = router_topk_row(x, offs, emask, bias_ptr, group_size, TOP_K, N_GROUP, TOPK_GROUP, BLOCK_G,
                                   BLOCK_K, SIGMOID, HAS_BIAS, GROUPED, V3_GROUPS)
    router_topk_store(weights, ids, w_out_ptr, id_out_ptr, t, scaling, TOP_K, BLOCK_K, NORMALIZE)


def router_topk_constants(num_experts: int, top_k: int, scoring: str, method: str, n_group: int, topk_group: int,
                          normalize: bool, has_bias: bool) -> dict[str, int | bool]:
    """The top-k step's compile-time constants (``router_topk_row``, ``router_topk_store``) for a router."""
    return dict(TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, BLOCK_E=triton.next_power_of_2(num_experts),
                BLOCK_G=triton.next_power_of_2(max(1, n_group)), BLOCK_K=triton.next_power_of_2(top_k),
                SIGMOID=scoring == "sigmoid", HAS_BIAS=has_bias, GROUPED=router_grouped(method, n_group),
                V3_GROUPS=method == "noaux_tc", NORMALIZE=normalize and top_k > 1)


def router_grouped(method: str, n_group: int) -> bool:
    return method in ("group_limited_greedy", "noaux_tc") and n_group > 1


def router_topk_runs(logits_shape: tuple[int, int], top_k: int, method: str, n_group: int) -> bool:
    """Whether the Triton top-k takes a router of this shape (else the torch reference runs)."""
    num_tokens, num_experts = logits_shape
    return (num_tokens > 0 and num_experts <= 4096 and top_k <= num_experts
            and not (router_grouped(method, n_group) and num_experts % n_group))


def router_topk_triton(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scoring: str, method: str,
                       n_group: int, topk_group: int, normalize: bool,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    if (logits.dtype != torch.float32 or logits.stride(1) != 1
            or not router_topk_runs((num_tokens, num_experts), top_k, method, n_group)):
        return decode_fused.router_topk(logits, bias, top_k, scoring, method, n_group, topk_group, normalize,
                                        scaling)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    _router_topk_kernel[(num_tokens,)](
        logits, bias if bias is not None else logits, weights, ids, logits.stride(0), num_experts,
        num_experts // max(1, n_group), float(scaling),
        **router_topk_constants(num_experts, top_k, scoring, method, n_group, topk_group, normalize, bias is not None),
        num_warps=4, **pdl_args(logits),
    )  # fmt: skip
    return weights, ids


@triton.jit
def _active_list(ids_ptr, active_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    # `decode_fused.active_experts` from the ids (this launch's other programs write the counts, which no
    # program can wait for), in O(E + pairs): active[:E] serves as the scratch: zeroed, a 1 stored at every
    # expert a pair names, read back, then overwritten by the list. Comparing every expert with every pair
    # instead took ~4 us at 64 tokens x 6 (H100). The barriers order one program's threads' global accesses.
    for e0 in range(0, num_experts, BLOCK):
        offs = e0 + tl.arange(0, BLOCK)
        tl.store(active_ptr + offs, tl.zeros([BLOCK], tl.int32), mask=offs < num_experts)
    tl.debug_barrier()
    for p0 in range(0, num_pairs, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
        tl.store(active_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=(ids >= 0) & (ids < num_experts))
    tl.debug_barrier()
    base = tl.full([], 0, tl.int32)
    for e0 in range(0, num_experts, BLOCK):
        offs = e0 + tl.arange(0, BLOCK)
        hit = tl.load(active_ptr + offs, mask=offs < num_experts, other=0, cache_modifier=".cg")
        # Every thread holds its part of this tile before any slot is overwritten; the list's slots never
        # pass the expert's own index, so later tiles are not yet touched.
        tl.debug_barrier()
        tl.store(active_ptr + base + tl.cumsum(hit, axis=0) - 1, offs, mask=hit > 0)
        base += tl.sum(hit, axis=0)
    tl.store(active_ptr + num_experts, base)


@triton.jit
def _moe_scatter_kernel(hidden_ptr, ids_ptr, rows_ptr, counts_ptr, dest_ptr, active_ptr, num_pairs, num_experts,
                        num_tokens, dim, stride_h, stride_r, rq_ptr, rs_ptr, hq_ptr, hs_ptr, stride_rq, stride_rs,
                        stride_hq, stride_hs, TOP_K: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_D: tl.constexpr, D_BLOCKS: tl.constexpr, WITH_ACTIVE: tl.constexpr,
                        ACTIVE_BLOCK: tl.constexpr, F16: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                        GROUPS_A_LOAD: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int64)
    if p < num_experts:
        tl.store(counts_ptr + p, tl.sum((ids == p).to(tl.int64), axis=0))
    if F16:  # the tokens' own rows in f16 groups too: the shared experts' input
        if p < num_tokens:
            src = hidden_ptr + p.to(tl.int64) * stride_h
            f16_groups_of_row(src, hq_ptr + p.to(tl.int64) * stride_hq, hs_ptr + p.to(tl.int64) * stride_hs, dim,
                               GROUP, GROUPS, GROUPS_A_LOAD)
    if p < num_pairs:
        e = tl.load(ids_ptr + p).to(tl.int64)
        if e >= 0:
            slot = tl.sum(((ids == e) & (offs < p)).to(tl.int64), axis=0)  # rows of e before this one
            row = e * num_tokens + slot
            tl.store(dest_ptr + p, row)
            src = hidden_ptr + (p // TOP_K).to(tl.int64) * stride_h
            dst = rows_ptr + row * stride_r
            for d0 in tl.static_range(D_BLOCKS):
                offs_d = d0 * BLOCK_D + tl.arange(0, BLOCK_D)
                tl.store(dst + offs_d, tl.load(src + offs_d, mask=offs_d < dim), mask=offs_d < dim)
            if F16:
                f16_groups_of_row(src, rq_ptr + row * stride_rq, rs_ptr + row * stride_rs, dim, GROUP, GROUPS,
                                   GROUPS_A_LOAD)
        else:
            tl.store(dest_ptr + p, -1)
    if WITH_ACTIVE:
        # One extra program past the counts' and the rows' (it runs beside them, delaying no row copy).
        if p == tl.num_programs(0) - 1:
            _active_list(ids_ptr, active_ptr, num_pairs, num_experts, ACTIVE_BLOCK)


# The scatter kernel takes up to this many (token, slot) pairs (each program holds all the ids); its active
# list runs over tiles of at most ACTIVE_TILE experts or pairs (the tests shrink it to cover several tiles).
_SCATTER_MAX_PAIRS = 16384
ACTIVE_TILE = 1024


def _scatter(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, active: torch.Tensor | None,
             f16_group: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, F16Rows | None]:
    """Launches the scatter (also writing ``active``'s list when given, and the rows in f16 groups of
    ``f16_group`` columns when that is not 0); the caller checked the shapes."""
    num_tokens, top_k = topk_ids.shape
    pairs, dim = num_tokens * top_k, hidden.shape[1]
    rows = torch.empty((num_experts * num_tokens, dim), dtype=hidden.dtype, device=hidden.device)
    counts = torch.empty(num_experts, dtype=torch.int64, device=hidden.device)
    dest = torch.empty(pairs, dtype=torch.int64, device=hidden.device)
    block_d = min(1024, triton.next_power_of_2(dim))
    f16 = None
    groups = triton.cdiv(dim, f16_group) if f16_group else 1
    if f16_group:  # the kernel's flat row e * T + slot steps the contiguous [E, T, ...] a row at a time
        f16 = F16Rows(*empty_f16_groups((num_experts, num_tokens), dim, f16_group, hidden.device),
                      *empty_f16_groups((num_tokens,), dim, f16_group, hidden.device))
    rq, rs, hq, hs = f16 if f16 is not None else (rows, rows, rows, rows)
    _moe_scatter_kernel[(max(pairs, num_experts) + (active is not None),)](
        hidden, topk_ids, rows, counts, dest, active if active is not None else counts, pairs, num_experts,
        num_tokens, dim, hidden.stride(0), rows.stride(0), rq, rs, hq, hs, rq.stride(-2), rs.stride(-2),
        hq.stride(0), hs.stride(0), TOP_K=top_k, BLOCK_P=triton.next_power_of_2(pairs),
        BLOCK_D=block_d, D_BLOCKS=triton.cdiv(dim, block_d), WITH_ACTIVE=active is not None,
        ACTIVE_BLOCK=min(ACTIVE_TILE, triton.next_power_of_2(max(pairs, num_experts))), F16=f16 is not None,
        GROUP=max(f16_group, 1), GROUPS=groups, GROUPS_A_LOAD=min(8, triton.next_power_of_2(groups)), num_warps=4,
        **pdl_args(hidden),
    )  # fmt: skip
    return rows.view(num_experts, num_tokens, dim), counts, dest, f16


def _scatter_takes(hidden: torch.Tensor, topk_ids: torch.Tensor) -> bool:
    pairs = topk_ids.numel()
    return 0 < pairs <= _SCATTER_MAX_PAIRS and hidden.stride(1) == 1 and topk_ids.is_contiguous()


def moe_scatter_rows_triton(hidden: torch.Tensor, topk_ids: torch.Tensor,
                            num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _scatter_takes(hidden, topk_ids):
        return decode_fused.moe_scatter_rows(hidden, topk_ids, num_experts)
    return _scatter(hidden, topk_ids, num_experts, None)[:3]


def moe_scatter_rows_active_triton(
        hidden: torch.Tensor, topk_ids: torch.Tensor,
        num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``decode_fused.moe_scatter_rows_active`` in the scatter's one launch (an extra program writes the
    active list), instead of the scatter plus `active_experts_triton`'s launch."""
    if not _scatter_takes(hidden, topk_ids):
        return decode_fused.moe_scatter_rows_active(hidden, topk_ids, num_experts)
    active = torch.empty(num_experts + 1, dtype=torch.int32, device=hidden.device)
    rows, counts, dest, _ = _scatter(hidden, topk_ids, num_experts, active)
    return rows, counts, dest, active


def moe_scatter_rows_active_f16_triton(
        hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
        group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, F16Rows]:
    """``decode_fused.moe_scatter_rows_active_f16`` in the scatter's one launch: each row program also writes
    its row in f16 groups, and the first T programs the tokens' own rows."""
    if not _scatter_takes(hidden, topk_ids):
        return decode_fused.moe_scatter_rows_active_f16(hidden, topk_ids, num_experts, group)
    active = torch.empty(num_experts + 1, dtype=torch.int32, device=hidden.device)
    rows, counts, dest, f16 = _scatter(hidden, topk_ids, num_experts, active, group)
    assert f16 is not None
    return rows, counts, dest, active, f16


@triton.jit
def _active_experts_kernel(counts_ptr, out_ptr, num_experts, BLOCK_E: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    offs = tl.arange(0, BLOCK_E)
    active = (tl.load(counts_ptr + offs, mask=offs < num_experts, other=0) > 0).to(tl.int32)
    pos = tl.cumsum(active, axis=0) - 1
    tl.store(out_ptr + pos, offs.to(tl.int32), mask=active > 0)
    tl.store(out_ptr + num_experts, tl.sum(active, axis=0))


def active_experts_triton(counts: torch.Tensor) -> torch.Tensor:
    """``decode_fused.active_experts`` in one single-program launch."""
    num_experts = counts.shape[0]
    if num_experts == 0 or num_experts > 4096 or not counts.is_contiguous():
        return decode_fused.active_experts(counts)
    out = torch.empty(num_experts + 1, dtype=torch.int32, device=counts.device)
    _active_experts_kernel[(1,)](counts, out, num_experts, BLOCK_E=triton.next_power_of_2(num_experts), num_warps=4,
                                 **pdl_args(counts))
    return out


@triton.jit
def _weighted_rows(y_ptr, dest_ptr, ids_ptr, w_ptr, t, offs_d, dmask, stride_y, TOP_K: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Token t's float32 sum of its slots' rows times their weights, in ascending (expert, slot) order."""
    ko = tl.arange(0, BLOCK_K)
    kmask = ko < TOP_K
    ids = tl.load(ids_ptr + t * TOP_K + ko, mask=kmask, other=2**30).to(tl.int64)
    dest = tl.load(dest_ptr + t * TOP_K + ko, mask=kmask, other=-1).to(tl.int64)
    w = tl.load(w_ptr + t * TOP_K + ko, mask=kmask, other=0.0).to(tl.float32)
    # Each slot's rank in ascending (expert, slot) order: the reference's summation order.
    before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (ko[None, :] < ko[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    acc = tl.zeros(offs_d.shape, tl.float32)
    for r in tl.static_range(TOP_K):
        chosen = rank == r
        row = tl.sum(tl.where(chosen, dest, 0), axis=0)
        weight = tl.sum(tl.where(chosen, w, 0.0), axis=0)
        if row >= 0:
            y = tl.load(y_ptr + row * stride_y + offs_d, mask=dmask, other=0.0).to(tl.float32)
            acc = acc + y * weight
    return acc


@triton.jit
def _moe_combine_kernel(y_ptr, dest_ptr, ids_ptr, w_ptr, add_ptr, out_ptr, dim, stride_y, stride_a, stride_o,
                        TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_ADD: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < dim
    acc = _weighted_rows(y_ptr, dest_ptr, ids_ptr, w_ptr, t, offs_d, dmask, stride_y, TOP_K, BLOCK_K)
    if HAS_ADD:
        acc = acc + tl.load(add_ptr + t * stride_a + offs_d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _moe_combine_add_rms_norm_kernel(y_ptr, dest_ptr, ids_ptr, w_ptr, add_ptr, r_ptr, nw_ptr, out_ptr, sum_ptr, dim,
                                     eps, stride_y, stride_a, stride_r, stride_o, stride_s, TOP_K: tl.constexpr,
                                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ADD: tl.constexpr,
                                     PDL: tl.constexpr):
    pdl_begin(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < dim
    acc = _weighted_rows(y_ptr, dest_ptr, ids_ptr, w_ptr, t, offs_d, dmask, stride_y, TOP_K, BLOCK_K)
    if HAS_ADD:
        acc = acc + tl.load(add_ptr + t * stride_a + offs_d, mask=dmask, other=0.0).to(tl.float32)
    dt = sum_ptr.dtype.element_ty
    # The combine's output rounds to the dtype, then the residual add does (the two ops' roundings).
    r = tl.load(r_ptr + t * stride_r + offs_d, mask=dmask, other=0.0).to(tl.float32)
    s = (acc.to(dt).to(tl.float32) + r).to(dt)
    tl.store(sum_ptr + t * stride_s + offs_d, s, mask=dmask)
    s32 = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=0) / dim + eps)
    normed = (s32 * inv).to(dt).to(tl.float32)
    nw = tl.load(nw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs_d, (nw * normed).to(dt), mask=dmask)


def moe_combine_triton(y: torch.Tensor, dest: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       add: torch.Tensor | None = None) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    dim = y.shape[1]
    if (num_tokens == 0 or y.stride(1) != 1 or not (topk_ids.is_contiguous() and topk_weights.is_contiguous()
            and dest.is_contiguous()) or (add is not None and (add.shape != (num_tokens, dim) or add.stride(1) != 1))):
        return decode_fused.moe_combine(y, dest, topk_ids, topk_weights, add)
    out = torch.empty((num_tokens, dim), dtype=y.dtype, device=y.device)
    block_d = min(512, triton.next_power_of_2(dim))
    _moe_combine_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        y, dest, topk_ids, topk_weights, add if add is not None else out, out, dim, y.stride(0),
        add.stride(0) if add is not None else 0, out.stride(0),
        TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_D=block_d, HAS_ADD=add is not None,
        num_warps=4, **pdl_args(y),
    )  # fmt: skip
    return out


def moe_combine_add_rms_norm_triton(y: torch.Tensor, dest: torch.Tensor, topk_ids: torch.Tensor,
                                    topk_weights: torch.Tensor, add: torch.Tensor | None, residual: torch.Tensor,
                                    norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_fused.moe_combine_add_rms_norm`` in one launch, one program a token (the norm needs its row)."""
    num_tokens, top_k = topk_ids.shape
    dim = y.shape[1]
    if (num_tokens == 0 or dim > 16384 or y.stride(1) != 1 or not (topk_ids.is_contiguous()
            and topk_weights.is_contiguous() and dest.is_contiguous()) or residual.shape != (num_tokens, dim)
            or residual.stride(1) != 1 or residual.dtype != y.dtype or norm_weight.shape != (dim,)
            or not norm_weight.is_contiguous() or (add is not None and (add.shape != (num_tokens, dim)
                                                                         or add.stride(1) != 1))):
        return decode_fused.moe_combine_add_rms_norm(y, dest, topk_ids, topk_weights, add, residual, norm_weight,
                                                     eps)
    out, summed = torch.empty_like(residual), torch.empty_like(residual)
    block_d = triton.next_power_of_2(dim)
    _moe_combine_add_rms_norm_kernel[(num_tokens,)](
        y, dest, topk_ids, topk_weights, add if add is not None else out, residual, norm_weight, out, summed, dim,
        eps, y.stride(0), add.stride(0) if add is not None else 0, residual.stride(0), out.stride(0),
        summed.stride(0), TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_D=block_d,
        HAS_ADD=add is not None, num_warps=4 if block_d <= 2048 else 8, **pdl_args(y),
    )  # fmt: skip
    return out, summed


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # Rounded to the input dtype between the two ops, as torch's separate silu and multiply round.
    act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``kernels.moe.silu_mul`` in one pass (torch's chunked silu and product were two strided, unvectorized
    kernels: 6.4 ms of an 88 ms V2-Lite 4096-token prefill on an H100)."""
    if gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2 or gate_up.shape[0] == 0:
        return moe_ref.silu_mul(gate_up)
    inter = gate_up.shape[1] // 2
    out = torch.empty((gate_up.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4, **pdl_args(gate_up))
    return out
