"""A decode GEMM's weight slice asked of L2 up front (``TANDEM_WEIGHT_PREFETCH=1``, CUDA only, off by default).

At one token the FP8 decode GEMMs are bound by latency, not bandwidth: a program keeps only its pipeline's few
K blocks in flight, so the expert launches of a V2-Lite layer move their bytes at ~60 % of ``copy_`` and a
launch's first bytes arrive a DRAM round trip after it starts. Here each program first issues one
``prefetch.global.L2`` per 128-byte line of its whole weight slice (returning at once, nothing loaded into
registers), then runs its K loop as before, which finds the lines in L2 or on their way. Launched as a
programmatic dependent (``kernels.triton_pdl``, ``TANDEM_PDL=1``), a kernel whose slice does not depend on the
kernel before it issues the prefetch *before* its ``griddepcontrol.wait``: the weights stream while that
kernel still runs (the down projection's experts while the gate/up launch computes, the attention's projection
while the RMSNorm before it runs). Values are untouched: a prefetch moves no data the kernel reads from
anywhere but memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import env_flag

PREFETCH_ENV = "TANDEM_WEIGHT_PREFETCH"
LINE_BYTES = 128


def weight_prefetch_on(x: torch.Tensor) -> bool:
    """Whether decode GEMMs on ``x``'s device prefetch their weight slices (``PREFETCH_ENV``); never in the
    interpreter (it runs no PTX)."""
    return env_flag(PREFETCH_ENV) and x.is_cuda


def prefetch_lines(row_bytes: int) -> int:
    """The kernels' ``PREFETCH_LINES`` for rows of ``row_bytes`` bytes a program: lines a row, a power of two."""
    return triton.next_power_of_2(triton.cdiv(row_bytes, LINE_BYTES))


@triton.jit
def prefetch_l2(ptrs, mask):
    """One ``prefetch.global.L2`` for each element address of ``ptrs`` where ``mask`` (a hint: it returns at once
    and loads nothing into registers)."""
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\t@p prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;\n\t}",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(base_ptr, rows, row_stride, row_mask, first_col, cols, LINES: tl.constexpr):
    """Prefetches ``cols`` elements of each row ``rows`` (int64, where ``row_mask``) from column ``first_col``:
    LINES 128-byte lines a row, none past ``cols`` (a slice narrower than LINES asks for fewer)."""
    per_line: tl.constexpr = 128 * 8 // base_ptr.dtype.element_ty.primitive_bitwidth  # LINE_BYTES
    line = tl.arange(0, LINES)
    ok = row_mask[:, None] & (line * per_line < cols)[None, :]
    offs = tl.where(ok, rows[:, None] * row_stride + (first_col + line * per_line)[None, :], 0)
    prefetch_l2(base_ptr + offs, ok)
