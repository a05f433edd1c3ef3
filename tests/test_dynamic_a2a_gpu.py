"""The CUDA-IPC head exchange (kernels.dynamic_a2a_ipc) on one GPU shared by two rank processes: captured once
in a CUDA graph, replayed with changing split sizes (empty ones included), it gives the torch.distributed
reference's bytes in both directions. Skipped without a GPU (tests/conftest.py)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

WORLD, HEADS, DIM_TO, DIM_FROM, MAX_TOKENS = 2, 4, 576, 512, 64
SPLITS = [[3, 5], [0, 7], [64, 0], [1, 1], [0, 0], [20, 37]]


def _rank(rank: int, path: str, errors: mp.Queue) -> None:
    try:
        from kernels.dynamic_a2a import heads_from_owner, heads_to_owner
        from kernels.dynamic_a2a_ipc import IpcAllToAll

        torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
        group = dist.group.WORLD
        a2a = IpcAllToAll(group, rank, WORLD, MAX_TOKENS, HEADS, DIM_TO, DIM_FROM, torch.bfloat16, "cuda:0")
        x = torch.zeros(MAX_TOKENS, HEADS, DIM_TO, dtype=torch.bfloat16, device="cuda")
        counts = torch.zeros(WORLD, dtype=torch.int64, device="cuda")

        def exchange() -> torch.Tensor:
            mine = a2a.heads_to_owner(x, counts)
            return a2a.heads_from_owner((mine[..., :DIM_FROM] * 2).contiguous(), counts)

        counts.copy_(torch.tensor([1, 1]))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            exchange()  # compile the kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            back = exchange()
        for step, split in enumerate(SPLITS):
            n = sum(split)
            gen = torch.Generator().manual_seed(step * 10 + rank)
            data = torch.randn(n, HEADS, DIM_TO, generator=gen).to(torch.bfloat16)
            x[:n].copy_(data)
            counts.copy_(torch.tensor(split))
            graph.replay()
            torch.cuda.synchronize()
            want_mine = heads_to_owner(data.cuda(), torch.tensor(split), group, WORLD)
            assert torch.equal(a2a.recv[: split[rank]], want_mine), (rank, split, "to owner")
            want_back = heads_from_owner(
                (want_mine[..., :DIM_FROM] * 2).contiguous(), torch.tensor(split), group, WORLD
            )
            assert torch.equal(back[:n], want_back), (rank, split, "back")
        a2a.close()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {exc!r}")
        raise


def test_ipc_exchange_replayed_in_a_cuda_graph_with_changing_splits_matches_the_reference() -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    path = os.path.join(tempfile.gettempdir(), f"tandem-a2a-gpu-{os.getpid()}")
    procs = [ctx.Process(target=_rank, args=(r, path, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        if p.is_alive():
            p.kill()
    if os.path.exists(path):
        os.unlink(path)
    assert all(p.exitcode == 0 for p in procs), [errors.get() for _ in range(errors.qsize())]


def _streams_check(errors: mp.Queue) -> None:
    try:
        from kernels.dynamic_a2a_ipc import IpcAllToAll

        ranks = IpcAllToAll.in_process(WORLD, MAX_TOKENS, HEADS, DIM_TO, DIM_TO, torch.bfloat16, "cuda:0")
        streams = [torch.cuda.Stream() for _ in ranks]
        split = [5, 9]
        xs = [torch.randn(sum(split), HEADS, DIM_TO, device="cuda").to(torch.bfloat16) for _ in ranks]
        counts = torch.tensor(split, device="cuda")
        torch.cuda.synchronize()
        for a2a, stream, x in zip(ranks, streams, xs, strict=True):
            with torch.cuda.stream(stream):
                a2a.heads_to_owner(x, counts)
        torch.cuda.synchronize()
        for rank, a2a in enumerate(ranks):
            start = sum(split[:rank])
            want = torch.cat([x[start : start + split[rank]] for x in xs], dim=1)
            assert torch.equal(a2a.recv[: split[rank]], want), rank
        for a2a, stream in zip(ranks, streams, strict=True):
            with torch.cuda.stream(stream):
                a2a.heads_from_owner(a2a.recv.clone(), counts)
        torch.cuda.synchronize()
        for rank, a2a in enumerate(ranks):
            assert torch.equal(a2a.back[: sum(split)], xs[rank]), rank
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(repr(exc))
        raise


def test_ranks_as_streams_of_one_process_exchange_the_same_rows() -> None:
    """`IpcAllToAll.in_process` (the benchmark's no-time-slicing mode): each rank on its own stream gets every
    head of its own tokens, and its heads of every token back. In a child process with a deadline: a kernel
    loaded while a barrier spins would hang it (`IpcAllToAll._load_kernels`)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    proc = ctx.Process(target=_streams_check, args=(errors,))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        pytest.fail("ranks as streams of one process did not finish in 120 s (a barrier waits forever)")
    assert proc.exitcode == 0, [errors.get() for _ in range(errors.qsize())]
