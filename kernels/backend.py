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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
BACKEND_ENV = "TANDEM_KERNELS"


@functools.lru_cache(maxsize=16)
def device_facts(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of a CUDA device, cached: asked on every GEMM call and kernel launch."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


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


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """A kernel switch read from the environment on every call (tests and benches flip them); a value outside
    ``choices`` is refused, never taken for the default."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected {' or '.join(choices)}")
    return value


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off kernel switch (``1`` / ``0``)."""
    return env_choice(name, ("0", "1"), "1" if default else "0") == "1"


@contextmanager
def switched(name: str, value: str) -> Iterator[None]:
    """A kernel switch set to ``value`` for the block (benches comparing two settings in one process), then back
    to what it was, unset included."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream: no host sync may run then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_expert_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Refuses a routed expert id past the local experts. A host sync, so skipped inside a CUDA-graph capture
    (the contiguous layout it guards runs at prefill, which is never captured)."""
    if topk_ids.numel() and not capturing(topk_ids.device):
        top = int(topk_ids.max())
        if top >= num_experts:
            raise ValueError(f"topk_ids holds expert {top} but only {num_experts} are local")


def check_masked_layout(x: torch.Tensor, counts: torch.Tensor, num_experts: int) -> None:
    """The masked layout's input checks every GPU backend makes: x ``[E, capacity, D]`` for ``num_experts``,
    integer per-expert ``counts`` on x's device, none over capacity (read outside CUDA-graph capture only: a
    host sync; inside one the kernels' row masks clamp them)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [E, capacity, D], got {tuple(x.shape)}")
    if x.shape[0] != num_experts or counts.shape != (num_experts,):
        raise ValueError(f"x {tuple(x.shape)} / counts {tuple(counts.shape)} do not match {num_experts} experts")
    if counts.dtype not in (torch.int32, torch.int64) or counts.device != x.device:
        raise ValueError(f"counts must be an integer tensor on {x.device}, got {counts.dtype} on {counts.device}")
    if not capturing(x.device) and counts.numel() and int(counts.max()) > x.shape[1]:
        raise ValueError(f"an expert has {int(counts.max())} rows, capacity is {x.shape[1]}")
