"""Chooses, per call, between the torch reference kernels and the GPU fast path.

`select_backend(tensor)` answers "torch" or "triton". "triton" names the GPU fast path as a whole:
the Triton paged MLA decode and MoE grouped GEMMs, plus the fused SDPA prefill and `torch._grouped_mm`
that ride with them. Default: "triton" for a CUDA tensor when Triton imports, "torch" otherwise.
`TANDEM_KERNELS=torch|triton` forces one (read on every call, so tests and benches can flip it);
forcing "triton" where it cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
BACKEND_ENV = "TANDEM_KERNELS"


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether `import triton` works here (cached: a failed import is slow to repeat)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(tensor: torch.Tensor) -> Backend:
    """The backend to run an op whose main input is `tensor` on."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced in ("", "auto"):
        return "triton" if tensor.is_cuda and triton_importable() else "torch"
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_importable():
            raise RuntimeError(f"{BACKEND_ENV}=triton but Triton is not importable here")
        # Triton's interpreter runs the same kernels on CPU tensors (slowly): allowed for debugging.
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{BACKEND_ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1), got {tensor.device}")
        return "triton"
    raise ValueError(f"{BACKEND_ENV} must be torch, triton or auto, got {forced!r}")
