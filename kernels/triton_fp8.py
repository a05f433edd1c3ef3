"""FP8 block-scaled GEMMs in Triton (Hopper / Ada: ``tl.dot`` on e4m3 operands, fp32 accumulate).

Same functions and contracts as ``kernels.fp8``:
  - ``quantize_fp8_act_triton``: per 1 x 128 token-group quantization (optionally only the valid rows of
    a masked ``[E, capacity, K]`` layout, so decode work follows the real token count).
  - ``fp8_linear_triton``: dense projection, activations quantized on the fly (prefill sizes) or taken in
    the model dtype against the dequantized weight tile (decode sizes: ``kernels.fp8.quantizes_activations``).
The grouped expert GEMMs are in ``kernels.triton_fp8_moe``.

Every K step is one 128-wide K block, so it has one activation scale per row and one weight scale per
output column block: ``acc += dot(a, b) * a_scale[:, None] * b_scale[None, :]`` (DeepSeek's recipe; the
partial products are promoted to fp32 every block, never accumulated at FP8's precision). Without
quantized activations (W8A16) the weight tile is converted to the activation dtype in registers and only
its scale applies: ``acc += dot(a, b) * b_scale[None, :]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import device_facts, env_choice, env_flag
from kernels.fp8 import BLOCK, FP8_DTYPE, BlockSize, quantizes_activations, scale_shape
from kernels.fp8_cublas import fp8_linear_cublas, use_cublas
from kernels.fp8_deepgemm import fp8_linear_deepgemm, use_deepgemm
from kernels.triton_grid import grouped_tile
from kernels.triton_last_program import arrive_last, launch_counters, reset_counter
from kernels.triton_pdl import pdl_args, pdl_begin

# Hopper's FP8 MMA adds its products at less than fp32 precision; Triton promotes the partial sum into an
# fp32 register every PROMOTE_K products (a K block of 128 is DeepSeek's recipe; 32 is one wgmma, the
# most precise). TANDEM_FP8_PROMOTE_K picks it (32, 64 or 128) so a GPU run can measure both.
PROMOTE_K = int(os.environ.get("TANDEM_FP8_PROMOTE_K", "128"))


def _promote_every(block_size: BlockSize) -> int:
    """The kernels' PROMOTE: at most one K block (tl.dot refuses more than its K)."""
    return min(PROMOTE_K, block_size[1])


# How a GEMM kernel gets its activation tile (the A_MODE constexpr).
A_FP8 = 0  # quantized before the launch: fp8 values and per-row scales
A_QUANTIZE = 1  # unquantized, quantized per tile inside the kernel
A_W8A16 = 2  # unquantized, multiplied in its own dtype against the weight tile converted to it


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input precision for W8A16 tiles: float32 activations (the GPU tests' models) multiply in
    full fp32 ("ieee"), not the TF32 that ``tl.dot`` defaults to for them; other dtypes take the default."""
    return "ieee" if dtype == torch.float32 else None


# How a W8A16 GEMM turns its FP8 weight tile into bf16: "bits" (`_e4m3_to_bf16_bits`: integer ops and a bf16x2
# multiply, no conversions; the default on sm90+) or "cvt" (Triton's conversion: on sm90 an e4m3x2 -> f16x2
# convert then one f16 -> bf16 convert per element, 1.5 conversion instructions a weight byte, about 2.5 TB/s
# of weights an H100 can convert at the CUDA guide's 16 a clock an SM). Graph-timed at one token on an H100
# (bench/results/fp8_one_token_sweep_h100_s41.log): one V2-Lite layer's expert launches 45.2 -> 38.8 us with the
# same tiles, the dense projections 6.9 + 5.3 -> 6.3 + 5.0 us.
W8A16_CONVERT_ENV = "TANDEM_FP8_BF16_CONVERT"


def w8a16_bits(x: torch.Tensor) -> bool:
    """Whether a W8A16 launch on ``x`` converts its weight tiles by moving bits (``W8A16_CONVERT_ENV``): bf16
    activations on CUDA only (the interpreter runs no PTX), compute capability 9.0+ (its ``mul.rn.bf16x2`` is
    sm90's; an sm89 GPU, FP8-capable too, converts with Triton's ``cvt``)."""
    wanted = env_choice(W8A16_CONVERT_ENV, ("cvt", "bits"), "bits") == "bits"  # a bad value is refused anywhere
    return wanted and x.is_cuda and x.dtype == torch.bfloat16 and device_facts(x.device.index or 0)[0] >= (9, 0)


@triton.jit
def _e4m3_to_bf16_bits(b):
    """e4m3 tile -> bf16, exactly, four values per instance (Marlin's FP8 dequantization): each byte
    s eeee mmm goes to the high byte of a 16-bit lane, the 7 bits below the sign shift right by 4 into bf16's
    exponent and mantissa fields (the value times 2^-120: e4m3's exponent bias is 7, bf16's 127; subnormals
    land on bf16 subnormals the same way), and a bf16x2 multiply by 2^120 (exact, a power of two) restores
    it. e4m3's NaN (s 1111 111) would come out as +-480: weights hold none."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 lo, hi, lo7, hi7, pow;
        prmt.b32 lo, 0, $2, 0x5140;
        prmt.b32 hi, 0, $2, 0x7362;
        and.b32 lo7, lo, 0x7f007f00;
        and.b32 hi7, hi, 0x7f007f00;
        shr.b32 lo7, lo7, 4;
        shr.b32 hi7, hi7, 4;
        lop3.b32 lo7, lo7, 0x80008000, lo, 0xf8;
        lop3.b32 hi7, hi7, 0x80008000, hi, 0xf8;
        mov.b32 pow, 0x7b807b80;
        mul.rn.bf16x2 $0, lo7, pow;
        mul.rn.bf16x2 $1, hi7, pow;
        }
        """,
        constraints="=r,=r,r", args=[b.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=True, pack=4)


@triton.jit
def w8a16_tile(b, a, BITS: tl.constexpr):
    """The FP8 weight tile ``b`` in the activation tile ``a``'s dtype (``BITS``: ``w8a16_bits`` said so)."""
    if BITS:
        return _e4m3_to_bf16_bits(b)
    else:
        return b.to(a.dtype)


@triton.jit
def _round_to_e4m3(v):
    """Rounds fp32 values in [-448, 448] to the nearest e4m3 value (ties to even), staying in fp32.

    The cast that follows is then exact. Why not let the cast round: Triton's CPU interpreter rounds
    wrongly where rounding carries into the exponent (31.25 became 16, not 32), so the interpreter
    test could not check the quantizer; rounding here gives torch's bits on every backend for a few
    ALU ops in a memory-bound kernel.
    """
    bits = v.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of fp32's 23 mantissa bits, round half to even (the carry may bump the exponent).
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = ~0xFFFFF
    normal = bits.to(tl.float32, bitcast=True)
    # e4m3 subnormals (|v| < 2^-6) sit on a 2^-9 grid: adding 1.5 * 2^14 rounds to it in fp32. Rounded as a
    # magnitude and given v's sign bit after, so a tiny negative value becomes -0 as torch's cast makes it
    # (byte 0x80). The sign goes in as a bit: negating the rounded zero (-sub) still gave +0 on the H100 and
    # the H200 (68 of 29M bytes differed at 4096 x 7168), the compiler being free to fold a negated zero.
    mag = tl.abs(v)
    sub = ((mag + 24576.0) - 24576.0).to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)
    return tl.where(mag < 0.015625, sub.to(tl.float32, bitcast=True), normal)


@triton.jit
def _quantize_rows(x):
    """fp32 tile ``[R, G]`` (one token group per row) -> (its values on the e4m3 grid, still fp32; the
    per-row scale amax / 448), exactly as ``kernels.fp8.quantize_fp8_act``.

    The scale is amax times the float32 reciprocal of 448 (the reference's arithmetic); the division by it
    is IEEE round-to-nearest (``div_rn``): Triton's default fp32 division on the GPU is the approximate one
    (up to 2 ulp), which moved values across e4m3 rounding boundaries against torch's quantizer (failing the
    bit-for-bit test on the H200, and flipping greedy tokens of the FP8 model).
    """
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10)
    scale = amax * (1.0 / 448.0)
    scaled = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    return _round_to_e4m3(tl.clamp(scaled, -448.0, 448.0)), scale


@triton.jit
def _round_to_bf16(v):
    """fp32 values rounded to the nearest bf16 (ties to even), staying fp32: the interpreter truncates in a cast
    where the GPU rounds, so the bits are made here (finite values; no NaN reaches these kernels)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = ~0xFFFF
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, counts_ptr, M, K, capacity, stride_xm, stride_qm, stride_sm, stride_sg,
                      GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr, MASKED: tl.constexpr,
                      SILU_MUL: tl.constexpr):
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    if MASKED:
        # Flattened [E, capacity, K]: program_id(0) is (expert, row block); blocks past the expert's
        # count return at once, so decode quantizes the real rows only, not E x capacity.
        blocks = tl.cdiv(capacity, BLOCK_ROWS)
        expert = tl.program_id(0) // blocks
        first = (tl.program_id(0) % blocks) * BLOCK_ROWS
        count = tl.load(counts_ptr + expert)
        if first >= count:
            return
        local = first + tl.arange(0, BLOCK_ROWS)
        row_mask = (local < count) & (local < capacity)
        rows = expert * capacity + local
    else:
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < M
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU_MUL:
        # x holds [gate | up] (2K columns, bf16): SiLU(gate) * up, each product rounded to bf16 as
        # kernels.triton_decode_fused.silu_mul_triton writes it, then quantized: the same bits as that pass and
        # this quantizer one after the other, without the bf16 intermediate's write and read.
        up = tl.load(x_ptr + rows64[:, None] * stride_xm + K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = _round_to_bf16(_round_to_bf16(x * tl.sigmoid(x)) * up)
    q, scale = _quantize_rows(x)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows64 * stride_sm + group * stride_sg, scale, mask=row_mask)


def quantize_fp8_act_triton(x: torch.Tensor, group_size: int = BLOCK, counts: torch.Tensor | None = None,
                            capacity: int = 0, scales_m_major: bool = False,
                            silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.fp8.quantize_fp8_act`` for a 2-D x ``[M, K]`` (last dim contiguous).

    With ``counts`` ``[E]`` and ``capacity`` (M = E * capacity), only each expert's first ``counts[e]``
    rows are quantized; the other rows of the outputs are left unwritten (nothing reads them).
    ``scales_m_major``: the scales ``[M, groups]`` are stored with stride ``(1, M)``, the layout cuBLAS
    reads 1 x 128 scales in (``kernels.fp8_cublas``); same values.
    ``silu_mul``: x is bf16 ``[M, 2K]`` (gate | up) and ``SiLU(gate) * up`` (rounded to bf16) is what is
    quantized, in the same pass.
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D and contiguous in its last dim, got {tuple(x.shape)} {x.stride()}")
    if silu_mul and (x.dtype != torch.bfloat16 or x.shape[1] % 2):
        raise ValueError(f"silu_mul takes bf16 [M, 2K] (gate | up), got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape[0], x.shape[1] // (2 if silu_mul else 1)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    groups = triton.cdiv(k, group_size)
    if scales_m_major:
        s = torch.empty((groups, m), dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    block_rows = 16
    if counts is not None:
        if capacity <= 0 or m != counts.numel() * capacity:
            raise ValueError(f"{m} rows are not {counts.numel()} experts x capacity {capacity}")
        row_programs = counts.numel() * triton.cdiv(capacity, block_rows)
    else:
        row_programs = triton.cdiv(m, block_rows)
    grid = (row_programs, triton.cdiv(k, group_size))
    _act_quant_kernel[grid](
        x, q, s, counts if counts is not None else s, m, k, max(capacity, 1), x.stride(0), q.stride(0), s.stride(0),
        s.stride(1), GROUP=group_size, BLOCK_ROWS=block_rows, MASKED=counts is not None, SILU_MUL=silu_mul,
        num_warps=4,
    )  # fmt: skip
    return q, s


@triton.jit
def _zero_past_count_kernel(out_ptr, counts_ptr, capacity, D, stride_e, stride_m, BLOCK_ROWS: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    blocks = tl.cdiv(capacity, BLOCK_ROWS)
    expert = tl.program_id(0) // blocks
    local = (tl.program_id(0) % blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    count = tl.load(counts_ptr + expert)
    if (tl.program_id(0) % blocks) * BLOCK_ROWS + BLOCK_ROWS <= count:
        return  # every row of the block is counted: nothing to clear
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = ((local >= count) & (local < capacity))[:, None] & (cols < D)[None, :]
    ptrs = out_ptr + expert.to(tl.int64) * stride_e + local.to(tl.int64)[:, None] * stride_m + cols[None, :]
    tl.store(ptrs, tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=mask)


def zero_past_count_triton(out: torch.Tensor, counts: torch.Tensor) -> None:
    """Sets rows ``counts[e]:`` of each expert of ``out`` ``[E, capacity, D]`` (last dim contiguous) to zero in
    place, writing nothing else: the masked layout's contract for rows a kernel left as they were."""
    experts, capacity, dim = out.shape
    if out.stride(2) != 1:
        raise ValueError(f"out must be contiguous in its last dim, got strides {out.stride()}")
    if out.numel() == 0:
        return
    block_rows, block_d = 16, min(512, triton.next_power_of_2(dim))
    _zero_past_count_kernel[(experts * triton.cdiv(capacity, block_rows), triton.cdiv(dim, block_d))](
        out, counts, capacity, dim, out.stride(0), out.stride(1), BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        num_warps=4)


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Tile shape of one FP8 GEMM launch. BLOCK_K is the quantization block (one scale per K block);
    ``kb_step`` K blocks are loaded an iteration."""

    block_m: int
    block_n: int
    group_m: int
    num_warps: int
    num_stages: int
    kb_step: int = 1


# A decode-size tile set by hand for a GPU the defaults were not measured on (tests/fp8_moe_one_token.py
# --dense prints the best of its sweep in this form): "BLOCK_N,WARPS,STAGES,SPLIT_K[,KB_STEP]" for GEMMs of <= 16
# rows.
DENSE_DECODE_TILE_ENV = "TANDEM_FP8_DENSE_DECODE_TILE"


def decode_tile_override(env: str) -> tuple[int, ...] | None:
    """The integers of a tile override (``DENSE_DECODE_TILE_ENV``, ``kernels.triton_fp8_moe``'s), or None."""
    value = os.environ.get(env, "").strip()
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"{env}={value!r}: expected comma-separated integers") from None


def dense_gemm_config(m: int) -> Fp8GemmConfig:
    """Tiles by the row count. Few rows (decode) are bound by reading the weight: 16 x 32 tiles, 4 warps, 4
    stages, K split until about four programs run per SM (``choose_split_k``): the fastest of a graph-timed
    sweep at one row on an H100 over 16/32/64-wide tiles, 2/4 warps and 1/2/4 splits (V2-Lite's fused q + kv_a
    3648 x 2048 and o_proj 2048 x 2048: 6.9 + 5.2 us where the earlier narrowed, unsplit tiles took 6.7 + 8.1;
    tests/fp8_moe_one_token.py --dense, bench/results/fp8_one_token_sweep_h100_s33.log). Again with the "bits"
    conversion and the partials summed in the launch (the defaults since; ``_s41.log``): 6.2 + 4.8 us, 64-wide
    tiles 6.0 + 4.9. Many rows use 128 x 128 tiles (wgmma-sized)."""
    if m <= 16:
        tile = decode_tile_override(DENSE_DECODE_TILE_ENV)
        if tile is not None:
            return Fp8GemmConfig(block_m=16, block_n=tile[0], group_m=1, num_warps=tile[1], num_stages=tile[2],
                                 kb_step=tile[4] if len(tile) > 4 else 1)
        return Fp8GemmConfig(block_m=16, block_n=32, group_m=1, num_warps=4, num_stages=4)
    if m <= 64:
        return Fp8GemmConfig(block_m=64, block_n=64, group_m=4, num_warps=4, num_stages=4)
    if m <= 256:
        return Fp8GemmConfig(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=3)
    # bench.gemm --sweep on an H100: 4 stages beat 3 on 6 of V3's 7 prefill shapes (by 1-7 %)
    return Fp8GemmConfig(block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=4)


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr, out_ptr, done_ptr, M, N, K,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cs, stride_cm,
                     NUM_KB: tl.constexpr, KB_PER_SPLIT: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, A_MODE: tl.constexpr, PROMOTE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, KB_STEP: tl.constexpr, BITS: tl.constexpr,
                     SPLITS: tl.constexpr, FIXUP: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    pid = tl.program_id(0)
    # Split-K: program_id(1) takes K blocks [split * KB_PER_SPLIT, ...) and writes an fp32 partial to
    # slice `split` of c (summed by the caller, or with FIXUP by the tile's last split to finish, into out).
    # One split: the whole K, straight to the output.
    split = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    kb0 = split * KB_PER_SPLIT
    a_ptrs = a_ptr + rows[:, None] * stride_am + (kb0 * BLOCK_K + offs_k)[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + (kb0 * BLOCK_K + offs_k)[:, None]
    as_ptrs = as_ptr + rows * stride_asm
    bs_ptrs = bs_ptr + (offs_n // SCALE_BLOCK_N) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Compile-time trip count (NUM_KB / KB_PER_SPLIT: one variant per projection's K, a handful per model):
    # Triton 3.6's interpreter cannot loop to a runtime bound under numpy 2. K blocks past NUM_KB (the
    # last split's tail) load nothing: every mask is off.
    # KB_STEP blocks an iteration (Fp8GemmConfig.kb_step), each with its own load and scale: the same sums in
    # the same order, more bytes in flight a pipeline stage. A step's blocks past the split's share load nothing.
    for i in range(0, (KB_PER_SPLIT + KB_STEP - 1) // KB_STEP):
        for j in tl.static_range(KB_STEP):
            kb = kb0 + i * KB_STEP + j
            # Columns left in this K block (0 past NUM_KB or past this split's blocks): every mask below compares
            # vectors with it, never ANDs a scalar into one (Triton 3.9's interpreter refuses masks built that way).
            k_left = tl.where((kb < NUM_KB) & (i * KB_STEP + j < KB_PER_SPLIT), K - kb * BLOCK_K, 0)
            k_mask = offs_k < k_left
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            b_s = tl.load(bs_ptrs + kb, mask=n_mask & (offs_n * 0 < k_left), other=0.0)
            if A_MODE == 2:  # W8A16: the weight tile in the activation dtype, only its scale to apply
                acc += tl.dot(a, w8a16_tile(b, a, BITS), input_precision=DOT_PRECISION) * b_s[None, :]
            else:
                if A_MODE == 1:
                    # a is the unquantized activation tile (one 1x128 group per row): quantize it here, exactly
                    # as _act_quant_kernel does.
                    aq, a_s = _quantize_rows(a.to(tl.float32))
                    a = aq.to(b_ptr.dtype.element_ty)
                else:
                    a_s = tl.load(as_ptrs + kb, mask=m_mask & (offs_m * 0 < k_left), other=0.0)
                acc += tl.dot(a, b, max_num_imprecise_acc=PROMOTE) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    if HAS_BIAS and not FIXUP:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + split.to(tl.int64) * stride_cs + rows[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if FIXUP:
        _sum_splits_if_last(c_ptr, bias_ptr, out_ptr, done_ptr + pid, rows, cols, offs_n, m_mask, n_mask,
                            stride_cs, stride_cm, N, SPLITS, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _sum_splits_if_last(c_ptr, bias_ptr, out_ptr, done_ptr, rows, cols, offs_n, m_mask, n_mask, stride_cs,
                        stride_cm, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """The split-K reduction inside the GEMM's launch: the last of an output tile's SPLITS programs to store its
    partial adds all of them up, in split order (the same bits as ``_reduce_splits_kernel``, whichever finishes
    last), adds the bias, casts into ``out`` and sets the tile's counter back to 0 for the next launch
    (``kernels.triton_last_program``'s protocol)."""
    if arrive_last(done_ptr, SPLITS):
        mask = m_mask[:, None] & n_mask[None, :]
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            total += tl.load(c_ptr + s * stride_cs + rows[:, None] * stride_cm + cols[None, :], mask=mask,
                             other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)
        reset_counter(done_ptr)


def _check_device(x: torch.Tensor) -> None:
    # FP8 tl.dot needs sm89+ (Ada, Hopper); older GPUs must run with --quantization none.
    if x.is_cuda and device_facts(x.device.index or 0)[0] < (8, 9):
        raise RuntimeError(f"FP8 Triton GEMMs need compute capability 8.9+, {torch.cuda.get_device_name(x.device)} "
                           "has less: run with --quantization none (dequantized weights)")


def choose_split_k(m: int, n: int, k_blocks: int, cfg: Fp8GemmConfig, sm_count: int) -> int:
    """K splits for a skinny GEMM: decode rows (few) give too few output tiles to keep enough of the weight
    in flight on every SM, so K is cut until there are about four programs per SM at <= 16 rows (two up to
    64 rows), keeping >= 4 K blocks per split (the fp32 partials cost M x N x 4 bytes per split, small while M
    is small). At one row the split launches and their reduction beat unsplit ones that already covered the
    SMs once (``dense_gemm_config``)."""
    if m > 64:
        return 1
    tile = decode_tile_override(DENSE_DECODE_TILE_ENV) if m <= 16 else None
    if tile is not None and len(tile) > 3:
        return max(1, min(tile[3], k_blocks))
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    per_sm = 4 if m <= 16 else 2
    if tiles >= per_sm * sm_count * 3 // 4:  # enough programs already: splitting adds partials and a reduction
        return 1
    return max(1, min(triton.cdiv(per_sm * sm_count, tiles), k_blocks // 4, 16))


def fp8_gemm_triton(xq: torch.Tensor, xs: torch.Tensor | None, weight: torch.Tensor, weight_scale: torch.Tensor,
                    out_dtype: torch.dtype, bias: torch.Tensor | None = None, block_size: BlockSize = (BLOCK, BLOCK),
                    config: Fp8GemmConfig | None = None, split_k: int | None = None,
                    w8a16: bool = False, fixup: bool | None = None) -> torch.Tensor:
    """The GEMM alone, on pre-quantized activations ``xq [M, K]`` / ``xs [M, ceil(K/bk)]``; with ``xs``
    None, ``xq`` is the unquantized activation and each tile is quantized inside the kernel, or with
    ``w8a16`` multiplied unquantized against the dequantized weight tile.

    ``split_k`` None: ``choose_split_k`` on CUDA, 1 elsewhere (the interpreter). ``fixup`` (None:
    ``split_fixup_enabled``): split partials summed inside the launch instead of by ``reduce_splits``.
    """
    if w8a16 and xs is not None:
        raise ValueError("w8a16 takes the unquantized activation: xs must be None")
    m, k = xq.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if weight.stride(1) != 1 or xq.stride(1) != 1 or weight_scale.stride(1) != 1 or (xs is not None
                                                                                     and xs.stride(1) != 1):
        raise ValueError("fp8 GEMM operands must be contiguous in their last dim")
    sm_count = device_facts(xq.device.index or 0)[1] if xq.is_cuda else 0
    cfg = config or dense_gemm_config(m)
    k_blocks = triton.cdiv(k, block_size[1])
    if split_k is None:
        split_k = choose_split_k(m, n, k_blocks, cfg, sm_count) if xq.is_cuda else 1
    split_k = max(1, min(split_k, k_blocks))
    per_split = triton.cdiv(k_blocks, split_k)
    if split_k == 1:
        out = torch.empty((1, m, n), dtype=out_dtype, device=xq.device)
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=xq.device)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    done = launch_counters(xq.device, tiles) if split_k > 1 and (split_fixup_enabled() if fixup is None
                                                                 else fixup) else None
    final = torch.empty((m, n), dtype=out_dtype, device=xq.device) if done is not None else out
    with_bias = bias is not None and (split_k == 1 or done is not None)
    _fp8_gemm_kernel[(tiles, split_k)](
        xq, xs if xs is not None else weight_scale, weight, weight_scale, out, bias if with_bias else out, final,
        done if done is not None else out, m, n, k,
        xq.stride(0), xs.stride(0) if xs is not None else 0, weight.stride(0), weight_scale.stride(0),
        out.stride(0), out.stride(1),
        NUM_KB=k_blocks, KB_PER_SPLIT=per_split, SCALE_BLOCK_N=block_size[0], HAS_BIAS=with_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=block_size[1], GROUP_M=cfg.group_m,
        A_MODE=A_W8A16 if w8a16 else (A_QUANTIZE if xs is None else A_FP8), PROMOTE=_promote_every(block_size),
        DOT_PRECISION=dot_precision(xq.dtype), KB_STEP=cfg.kb_step, BITS=w8a16 and w8a16_bits(xq),
        SPLITS=split_k, FIXUP=done is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(xq),
    )  # fmt: skip
    if split_k == 1:
        return out[0]
    if done is not None:
        return final
    return reduce_splits(out, bias, out_dtype)


# The split-K partials summed inside the GEMM's launch by each tile's last split (``_sum_splits_if_last``)
# instead of by a launch of their own (``reduce_splits``): a decode step runs 54 split FP8 GEMMs on V2-Lite, and
# each reduction launch took ~1.4 us plus its gap in the graph. On by default (TANDEM_FP8_SPLIT_FIXUP=0 turns it
# off): at one row on an H100 it took 6.2 + 4.8 us where the GEMM and its reduction launch took 6.4 + 5.0
# (bench/results/fp8_one_token_sweep_h100_s41.log, both with the "bits" conversion), 54 launches fewer a step.
SPLIT_FIXUP_ENV = "TANDEM_FP8_SPLIT_FIXUP"


def split_fixup_enabled() -> bool:
    return env_flag(SPLIT_FIXUP_ENV, default=True)


@triton.jit
def _reduce_splits_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):  # in split order, as torch's sum over dim 0 adds them
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(partials: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The split-K partial sums ``[S, M, N]`` (float32) added up, plus ``bias``, cast: one launch where torch's
    sum, add and cast took three (a decode step runs this after every split dense FP8 GEMM)."""
    splits, m, n = partials.shape
    out = torch.empty((m, n), dtype=out_dtype, device=partials.device)
    block = 1024
    _reduce_splits_kernel[(triton.cdiv(m * n, block),)](
        partials, bias if bias is not None else partials, out, m * n, n, SPLITS=splits, HAS_BIAS=bias is not None,
        BLOCK=block, num_warps=4, **pdl_args(partials),
    )  # fmt: skip
    return out


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, block_size: BlockSize = (BLOCK, BLOCK)) -> torch.Tensor:
    """``kernels.fp8.fp8_linear`` on the GPU: at decode sizes our GEMM on x as it is (W8A16; up to
    ``kernels.triton_fp8_gemv.gemv_max_rows`` rows as a GEMV); else quantize x
    per token group, then the block-scaled GEMM (DeepGEMM's where ``kernels.fp8_deepgemm.use_deepgemm`` picks
    it, cuBLAS's where ``kernels.fp8_cublas.use_cublas`` does, else ours)."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {weight.dtype} {tuple(weight.shape)} do not fit")
    if tuple(weight_scale.shape) != scale_shape(weight.shape[0], weight.shape[1], block_size):
        raise ValueError(f"weight scales {tuple(weight_scale.shape)} do not fit weight {tuple(weight.shape)}")
    _check_device(x)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not quantizes_activations(x2.shape[0]):
        # Imported here: the GEMV module builds on this one's weight conversion.
        from kernels.triton_fp8_gemv import fp8_gemv_triton, gemv_max_rows

        if x2.shape[0] <= gemv_max_rows():
            out = fp8_gemv_triton(x2, weight, weight_scale, bias, block_size)
        else:
            out = fp8_gemm_triton(x2, None, weight, weight_scale, x.dtype, bias, block_size, w8a16=True)
    elif use_deepgemm(x2, weight, block_size):  # asked first: under auto it takes the largest row counts
        out = fp8_linear_deepgemm(x2, weight, weight_scale, bias, block_size)
    elif use_cublas(x2, weight, block_size):
        out = fp8_linear_cublas(x2, weight, weight_scale, bias, x.dtype)
    elif x2.shape[0] <= FUSED_QUANT_MAX_ROWS:
        out = fp8_gemm_triton(x2, None, weight, weight_scale, x.dtype, bias, block_size)
    else:
        xq, xs = quantize_fp8_act_triton(x2, block_size[1])
        out = fp8_gemm_triton(xq, xs, weight, weight_scale, x.dtype, bias, block_size)
    return out.view(*x.shape[:-1], weight.shape[0])


# Up to this many rows the dense GEMM would quantize its activation tiles itself (one launch instead of two).
# Off: each column tile repeats the quantization (its exact e4m3 rounding is many instructions), and
# bench.gemm measured the fused launch at 0.10-0.79x bf16 at 1 and 16 rows on an H200 where a quantizer
# launch plus the GEMM on quantized rows ran at 0.44-1.66x; in-kernel quantization of the experts' rows
# likewise made the decode step's expert GEMMs 5x slower. The fused path stays for callers that pass xs=None.
FUSED_QUANT_MAX_ROWS = 0
