"""RMSNorm in one Triton kernel: the torch reference (`kernels.norm.rms_norm`) is eight kernels per call
(cast, square, mean, add, rsqrt, multiply, cast, scale), and a V2-Lite decode step makes 82 calls: at
batch 1 those ~650 launches were a tenth of a CUDA-graph step on one H100 (bench.decode_step --profile).

Same arithmetic as the reference: float32 sum of squares over the row, rsqrt(mean + eps), round to the
input dtype, then multiply by the weight in float32 and round again (what torch does for a bf16 product).
Only the order of the float32 sum differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import norm
from kernels.triton_pdl import pdl_args, pdl_begin


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, dim, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    y = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


# One program holds a whole row in registers; past this the reference is used (no DeepSeek norm is wider:
# V3's hidden size is 7168).
MAX_DIM = 16384


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`kernels.norm.rms_norm` in one launch, for rows with a unit last stride (strided rows are fine, e.g.
    the latent slice of kv_a's output); other inputs (mixed dtypes, wider rows) go to the reference."""
    dim = x.shape[-1]
    if (
        weight.shape != (dim,)
        or weight.dtype != x.dtype
        or dim > MAX_DIM
        or x.stride(-1) != 1
        or not weight.is_contiguous()
        or x.numel() == 0
    ):
        return norm.rms_norm(x, weight, eps)
    rows = x if x.dim() == 2 else x.reshape(-1, dim)  # a view for every layout the model passes
    if rows.stride(-1) != 1:
        return norm.rms_norm(x, weight, eps)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), out.stride(0), dim, eps,
        BLOCK=block, num_warps=4 if block <= 2048 else 8, **pdl_args(rows),
    )  # fmt: skip
    return out.view(x.shape)
