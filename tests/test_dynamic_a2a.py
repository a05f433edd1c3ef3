"""The MLA-core all-to-all (kernels.dynamic_a2a) on real gloo process groups: owners receive every head of
exactly their tokens, the way back returns each rank its heads of every token, for uneven and empty splits.
The GPU backend's own test (CUDA graph, changing split sizes) is tests/test_dynamic_a2a_gpu.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels.dynamic_a2a import heads_from_owner, heads_to_owner

HEADS_PER_RANK, DIM = 2, 5


def _full(n: int, world: int) -> torch.Tensor:
    """The whole [N, W*Hl, D] tensor every rank's shard is cut from (deterministic, distinct values)."""
    return torch.arange(n * world * HEADS_PER_RANK * DIM, dtype=torch.float32).view(
        n, world * HEADS_PER_RANK, DIM
    )


def _rank(rank: int, world: int, path: str, cases: list[list[int]], errors: mp.Queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        group = dist.group.WORLD
        for counts in cases:
            n = sum(counts)
            full = _full(n, world)
            mine = full[:, rank * HEADS_PER_RANK : (rank + 1) * HEADS_PER_RANK]
            send = torch.tensor(counts)
            got = heads_to_owner(mine.contiguous(), send, group, world)
            start = sum(counts[:rank])
            assert torch.equal(got, full[start : start + counts[rank]]), (rank, counts)
            # the same split as a host list every rank shares: no size exchange, same rows
            assert torch.equal(heads_to_owner(mine.contiguous(), list(counts), group, world), got)
            back = heads_from_owner(got * 2, send, group, world)
            assert torch.equal(back, mine * 2), (rank, counts)
        dist.barrier()  # leave together: a rank gone while its peer's exchange was in flight aborted gloo
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {exc!r}")
        raise


@pytest.mark.parametrize("world", [2, 4])
def test_owners_get_every_head_of_their_tokens_and_ranks_get_their_heads_back(world: int) -> None:
    cases = [[3] * world, [0] * (world - 1) + [5], [1, 0] * (world // 2), list(range(world)), [0] * world]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    path = os.path.join(tempfile.gettempdir(), f"tandem-a2a-{os.getpid()}-{world}")
    procs = [ctx.Process(target=_rank, args=(r, world, path, cases, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    if os.path.exists(path):
        os.unlink(path)
    assert all(p.exitcode == 0 for p in procs), [errors.get() for _ in range(errors.qsize())]


def test_one_rank_is_the_identity() -> None:
    x = torch.randn(4, HEADS_PER_RANK, DIM)
    assert heads_to_owner(x, torch.tensor([4]), None, 1) is x
    assert heads_from_owner(x, torch.tensor([4]), None, 1) is x


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_the_ipc_copy_kernels_move_each_row_where_the_exchange_says_under_the_interpreter() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tests" / "dynamic_a2a_interpret_check.py")],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
