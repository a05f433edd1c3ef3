"""`kernels.triton_last_program`: launches take consecutive runs of a per-device counter ring (wrapping at its
end), and a launch whose last program finished the work leaves its counters at 0 (Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from kernels import backend
from tests.test_kernels_decode_fused import _interpreted

needs_triton = pytest.mark.skipif(not backend.triton_importable(), reason="needs Triton")


@needs_triton
def test_launches_take_consecutive_runs_of_the_ring_and_wrap_at_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import triton_last_program as lp

    monkeypatch.setattr(lp, "_RINGS", {})
    device = torch.device("cpu")
    first, second = lp.launch_counters(device, 3), lp.launch_counters(device, 5)
    ring = lp.ring_buffer(device)
    assert first is not None and second is not None and ring is not None and not ring.any()
    assert first.data_ptr() == ring.data_ptr() and second.data_ptr() == ring[3:].data_ptr()
    lp._RINGS[device].cursor = lp.RING - 2
    wrapped = lp.launch_counters(device, 4)  # no room for 4 at the end: back to the start
    assert wrapped is not None and wrapped.data_ptr() == ring.data_ptr()
    assert lp.launch_counters(device, lp.RING + 1) is None


ROUTER_TWICE = """
import json, os, torch
from kernels import decode_fused, triton_last_program, triton_router
os.environ[triton_router.ROUTER_FUSED_ENV] = "1"
g = torch.Generator().manual_seed(5)
hidden, gate = torch.randn(3, 64, generator=g), torch.randn(16, 64, generator=g)
same = []
for _ in range(2):  # the second launch finds its counter at 0 again
    w1, i1 = triton_router.router_logits_topk_triton(hidden, gate, None, 4, "softmax", "greedy", 1, 1, True, 1.0)
    w2, i2 = decode_fused.router_logits_topk(hidden, gate, None, 4, "softmax", "greedy", 1, 1, True, 1.0)
    same.append(bool(torch.equal(i1.sort(1)[0], i2.sort(1)[0])))
ring = triton_last_program.ring_buffer(torch.device("cpu"))
print(json.dumps({"same": same, "taken": triton_last_program._RINGS[torch.device("cpu")].cursor,
                  "left_at_zero": not bool(ring.any())}))
"""


@needs_triton
def test_a_fused_router_launch_leaves_its_counter_at_zero_interpreted() -> None:
    result = _interpreted(ROUTER_TWICE)
    assert result == {"same": [True, True], "taken": 2, "left_at_zero": True}
