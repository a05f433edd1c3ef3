"""Programmatic dependent launch (PDL, sm90+) for the decode step's Triton kernels.

A decode step at small batch is hundreds of short kernels (412 for V2-Lite), and in a CUDA graph each still
pays a launch gap of about a microsecond between the end of one and the start of the next. Launched as a
programmatic dependent (``launch_pdl``), a kernel's programs may be scheduled while the kernel before it
still runs; each then waits in ``griddepcontrol.wait`` until that kernel has finished and its writes are
visible, so nothing it reads or writes can race the one before. Its own ``griddepcontrol.launch_dependents``
right after lets the next kernel be scheduled as soon as every program of this one has started.

The rule that keeps this safe: a kernel launched with ``launch_pdl`` calls ``pdl_begin`` before any memory
access (every kernel here does it as its first statement, so a program that returns early has waited too). One
exception: the one-row FP8 GEMV (``kernels.triton_fp8_gemv``) loads dense weights and their scales first, which
no kernel of a decode step writes, and waits before it reads anything else.
Kernels launched normally (cuBLAS, torch) keep stream order as ever; after one of them a PDL launch simply
starts when it ends. On by default on CUDA at compute capability 9.0+ (``TANDEM_PDL=0`` turns it off: the kernels
then compile without the instructions and launch as before): one-GPU 1P1D at c8 on an H100 gave 576 -> 586 and
571.6 -> 589.7 output tok/s with it (ITL p50 9.1 -> 8.8 and 9.26 -> 8.92 ms) in two sessions' same-call A/Bs, and
the decode step 1-4 % faster at batch 1 and 8 in session 41's (README, "The decode step against its floor").
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.backend import device_facts, env_flag

PDL_ENV = "TANDEM_PDL"


def pdl_on(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device launch as programmatic dependents (``PDL_ENV``)."""
    return env_flag(PDL_ENV, default=True) and x.is_cuda and device_facts(x.device.index or 0)[0] >= (9, 0)


def pdl_args(x: torch.Tensor) -> dict[str, Any]:
    """The launch keywords of a kernel that takes ``PDL: tl.constexpr`` and starts with ``pdl_begin(PDL)``."""
    on = pdl_on(x)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """A PDL-launched kernel's first statement: wait for the kernel before it, then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
