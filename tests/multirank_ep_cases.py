"""Rank bodies for tests/test_multirank_ep.py: each runs inside a spawned gloo process.

Every rank builds the same global routing (same seed), keeps its own slice of tokens (sizes differ,
one rank has none), exchanges through ``kernels.ep.Dispatcher`` and checks its result against the
single-process reference computed over every expert. A failed check raises: the spawn re-raises it
in the test with the rank's traceback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import kernels
from kernels.ep import Dispatcher
from kernels.ep_stats import ExpertLoadRecorder

HIDDEN = 8
TOP_K = 3
EXPERTS_PER_RANK = 2
DEVICE = torch.device("cpu")  # set per rank by rank_main (cuda:<rank> under NCCL)


def _on_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(DEVICE) for t in tensors)


def token_counts(world: int) -> list[int]:
    """Uneven per-rank batch sizes; the last rank has no tokens at all."""
    return [5 + 3 * r for r in range(world - 1)] + [0]


def global_routing(world: int, seed: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``[T, D]``, topk_ids ``[T, K]`` (distinct experts per token, a few ``-1``), weights ``[T, K]``.

    ``exact``: small integers and dyadic weights, so every fp32 sum is exact in any order.
    """
    gen = torch.Generator().manual_seed(seed)
    total, num_experts = sum(token_counts(world)), world * EXPERTS_PER_RANK
    if exact:
        x = torch.randint(-8, 9, (total, HIDDEN), generator=gen).float()
        weights = 2.0 ** -torch.randint(0, 4, (total, TOP_K), generator=gen).float()
    else:
        x = torch.randn(total, HIDDEN, generator=gen)
        weights = torch.rand(total, TOP_K, generator=gen)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:TOP_K] for _ in range(total)])
    ids[::4, -1] = -1  # some tokens route to fewer experts
    return x, ids, weights


def my_slice(world: int, rank: int) -> slice:
    counts = token_counts(world)
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def scaled_expert(rows: torch.Tensor, global_expert: int) -> torch.Tensor:
    """A stand-in expert whose output is exact in fp32: ``x * (e + 1)``."""
    return rows * float(global_expert + 1)


def reference_exact(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for k in range(ids.shape[1]):
        valid = ids[:, k] >= 0
        out += torch.where(valid[:, None], x * (ids[:, k] + 1).float()[:, None] * weights[:, k : k + 1], 0.0)
    return out


def check_high_throughput_exact(rank: int, world: int, group: Any) -> None:
    x_all, ids_all, w_all = global_routing(world, seed=1, exact=True)
    mine = my_slice(world, rank)
    x, ids, weights = _on_device(x_all[mine], ids_all[mine], w_all[mine])
    ep = Dispatcher(world * EXPERTS_PER_RANK, HIDDEN, backend="a2a", group=group)
    try:
        got = ep.dispatch(x, ids, weights)
        partial = torch.zeros_like(got.recv_x)
        for k in range(TOP_K):
            local = got.recv_topk_ids[:, k]
            for e in range(EXPERTS_PER_RANK):
                hit = local == e
                partial[hit] += (scaled_expert(got.recv_x[hit], rank * EXPERTS_PER_RANK + e)
                                 * got.recv_topk_weights[hit, k : k + 1])
        out = ep.combine(partial, got.handle)
        torch.testing.assert_close(out, reference_exact(x, ids, weights), rtol=0, atol=0)
        expected = torch.bincount(ids_all[ids_all >= 0], minlength=world * EXPERTS_PER_RANK)
        mine_experts = expected[rank * EXPERTS_PER_RANK : (rank + 1) * EXPERTS_PER_RANK]
        assert got.num_recv_tokens_per_expert == mine_experts.tolist(), (got.num_recv_tokens_per_expert, mine_experts)
        # A token goes to a rank once, however many of its experts live there.
        has_local = ((ids_all >= rank * EXPERTS_PER_RANK) & (ids_all < (rank + 1) * EXPERTS_PER_RANK)).any(1)
        assert got.recv_x.shape[0] == int(has_local.sum())
    finally:
        ep.close()


def check_high_throughput_matches_moe_forward(rank: int, world: int, group: Any) -> None:
    """Real SiLU experts on random floats: same result as one process holding every expert."""
    x_all, ids_all, w_all = global_routing(world, seed=2, exact=False)
    gen = torch.Generator().manual_seed(3)
    num_experts, inter = world * EXPERTS_PER_RANK, 6
    w13, w2 = _on_device(torch.randn(num_experts, 2 * inter, HIDDEN, generator=gen),
                         torch.randn(num_experts, HIDDEN, inter, generator=gen))
    mine = my_slice(world, rank)
    x, ids, weights = _on_device(x_all[mine], ids_all[mine], w_all[mine])
    local = slice(rank * EXPERTS_PER_RANK, (rank + 1) * EXPERTS_PER_RANK)
    ep = Dispatcher(num_experts, HIDDEN, backend="a2a", group=group)
    try:
        got = ep.dispatch(x, ids, weights)
        partial = kernels.moe_forward(got.recv_x, got.recv_topk_ids, got.recv_topk_weights, w13[local], w2[local])
        out = ep.combine(partial, got.handle)
    finally:
        ep.close()
    torch.testing.assert_close(out, kernels.moe_forward(x, ids, weights, w13, w2), rtol=1e-5, atol=1e-5)


def check_low_latency_exact(rank: int, world: int, group: Any) -> None:
    x_all, ids_all, w_all = global_routing(world, seed=4, exact=True)
    mine = my_slice(world, rank)
    x, ids, weights = _on_device(x_all[mine], ids_all[mine], w_all[mine])
    budget = max(token_counts(world))
    ep = Dispatcher(world * EXPERTS_PER_RANK, HIDDEN, backend="a2a", mode="low_latency",
                    num_max_dispatch_tokens_per_rank=budget, group=group, device=DEVICE)
    try:
        for _ in range(2):  # the buffers are reused: a second step must not see the first one's rows
            got = ep.low_latency_dispatch(x, ids)
            assert got.recv_x.shape == (EXPERTS_PER_RANK, world * budget, HIDDEN)
            expected = torch.bincount(ids_all[ids_all >= 0], minlength=world * EXPERTS_PER_RANK)
            assert got.recv_count.tolist() == expected[rank * EXPERTS_PER_RANK : (rank + 1) * EXPERTS_PER_RANK].tolist()
            y = torch.zeros_like(got.recv_x)
            for e in range(EXPERTS_PER_RANK):
                count = int(got.recv_count[e])
                y[e, :count] = scaled_expert(got.recv_x[e, :count], rank * EXPERTS_PER_RANK + e)
                # Rows past the count stay untouched padding (garbage there must not leak into combine).
                y[e, count:] = 1e9
            out = ep.low_latency_combine(y, ids, weights, got.handle)
            torch.testing.assert_close(out, reference_exact(x, ids, weights), rtol=0, atol=0)
    finally:
        ep.close()


def check_expert_load_recorder_counts_every_token_once(rank: int, world: int, group: Any) -> None:
    _, ids_all, _ = global_routing(world, seed=5, exact=True)
    num_experts = world * EXPERTS_PER_RANK
    recorder = ExpertLoadRecorder(num_layers=2, num_experts=num_experts, window=4, device=DEVICE)
    (mine,) = _on_device(ids_all[my_slice(world, rank)])
    for _ in range(3):
        recorder.record(0, mine)
        recorder.record(1, mine[:1])
        recorder.end_step()
    counts = recorder.global_window_counts(group)
    expected = torch.bincount(ids_all[ids_all >= 0], minlength=num_experts) * 3
    counts = counts.cpu()
    assert counts[0].tolist() == expected.tolist(), (counts[0], expected)
    firsts = torch.cat([ids_all[my_slice(world, r)][:1] for r in range(world)])
    assert counts[1].tolist() == (torch.bincount(firsts[firsts >= 0], minlength=num_experts) * 3).tolist()


def rank_main(rank: int, world: int, port: int, checks: list[str], backend: str = "gloo") -> None:
    """Runs every check over the whole world, then over two halves at once (non-default groups).

    ``backend="nccl"`` runs the same checks on ``cuda:<rank>``.
    """
    global DEVICE
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        half = world // 2
        halves = [dist.new_group(list(range(0, half))), dist.new_group(list(range(half, world)))]
        for name in checks:
            globals()[name](rank, world, None)
            dist.barrier()
            if half > 1:
                globals()[name](rank % half, half, halves[rank // half])
                dist.barrier()
    finally:
        dist.destroy_process_group()
