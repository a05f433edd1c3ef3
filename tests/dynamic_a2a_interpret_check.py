"""Runs the MLA-core exchange's two copy kernels under Triton's CPU interpreter against the exchange's
definition (row maps only: the IPC buffers are plain host tensors here, the barriers are not run).

    TRITON_INTERPRET=1 python tests/dynamic_a2a_interpret_check.py

Run as its own process by tests/test_dynamic_a2a.py: the interpreter is chosen when ``triton.jit`` decorates
a kernel, so the variable must be set before kernels.dynamic_a2a_ipc is first imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1")
    import triton

    from kernels import dynamic_a2a_ipc as ipc

    gen = torch.Generator().manual_seed(0)
    world, heads, dim, max_tokens = 3, 2, 5, 7
    counts = torch.tensor([2, 0, 3])  # an owner with no rows among them
    starts = torch.cumsum(counts, 0) - counts
    row = heads * dim
    grid = (world, triton.cdiv(max_tokens, ipc.BLOCK_ROWS))
    meta = {"ROW": row, "WORLD": world, "BLOCK": triton.next_power_of_2(row), "BLOCK_ROWS": ipc.BLOCK_ROWS}
    for rank in range(world):
        x = torch.randn(int(counts.sum()), heads, dim, generator=gen)  # rows grouped by owner
        recvs = [torch.zeros(max_tokens, world * heads, dim) for _ in range(world)]
        ipc._to_owner_kernel[grid](x, torch.tensor([t.data_ptr() for t in recvs]), counts, starts, rank, **meta)
        y = torch.randn(max_tokens, world * heads, dim, generator=gen)  # this owner's outputs
        backs = [torch.zeros(max_tokens, heads, dim) for _ in range(world)]
        ipc._from_owner_kernel[grid](y, torch.tensor([t.data_ptr() for t in backs]), counts, starts, rank, **meta)
        for owner in range(world):
            want = torch.zeros(max_tokens, heads, dim)
            want[: counts[owner]] = x[starts[owner] : starts[owner] + counts[owner]]
            if not torch.equal(recvs[owner][:, rank * heads : (rank + 1) * heads], want):
                raise SystemExit(f"FAIL to owner: rank {rank}'s rows in owner {owner}'s recv")
        own = slice(starts[rank], starts[rank] + counts[rank])
        for peer in range(world):
            want = torch.zeros(max_tokens, heads, dim)
            want[own] = y[: counts[rank], peer * heads : (peer + 1) * heads]
            if not torch.equal(backs[peer], want):
                raise SystemExit(f"FAIL from owner: owner {rank}'s rows in rank {peer}'s back")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
