"""A launch's last program to finish a piece of work takes the step after it, inside the same launch.

Small decode launches pay most of their time in launch and ramp, and some exist only to finish another's work:
the split-K reduction of a skinny GEMM (``kernels.triton_fp8``), the router's top-k after its logits
(``kernels.triton_router``). Here each program that finished its part arrives at a counter; the one that
arrives last sees every other part (CUTLASS's semaphore protocol: a block barrier orders all of a program's
threads' stores before one thread's release, the scalar acquire-release atomic; the last reads the parts with
``.cg`` loads, from L2), does the finishing step and sets the counter back to 0 for the next launch, so a CUDA
graph can replay the same counters.

Counters come from a per-device ring: consecutive launches take consecutive runs (two launches in flight at
once, on two streams, never share one; a graph keeps the runs its capture took). None while a CUDA graph is
captured on a device that has no ring yet (it is made once, outside any capture): the caller then runs the
finishing step in a launch of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

RING = 1 << 16  # counters a device keeps


@dataclass
class _Ring:
    buffer: torch.Tensor
    cursor: int = 0


_RINGS: dict[torch.device, _Ring] = {}


def launch_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """``count`` int32 counters at 0 for one launch (see the module's docstring), or None."""
    ring = _RINGS.get(device)
    if ring is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ring = _RINGS[device] = _Ring(torch.zeros(RING, dtype=torch.int32, device=device))
    if count > RING:
        return None
    if ring.cursor + count > RING:
        ring.cursor = 0
    run = ring.buffer[ring.cursor : ring.cursor + count]
    ring.cursor += count
    return run


def ring_buffer(device: torch.device) -> torch.Tensor | None:
    """The device's whole ring (tests check that every launch left its counters at 0)."""
    ring = _RINGS.get(device)
    return None if ring is None else ring.buffer


@triton.jit
def arrive_last(counter_ptr, programs):
    """Whether this program is the last of ``programs`` to arrive at ``counter_ptr`` (call it after the program's
    stores, from every program of the group exactly once); the last then owns every part and must call
    ``reset_counter`` when done."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return arrived == programs - 1


@triton.jit
def reset_counter(counter_ptr):
    tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
