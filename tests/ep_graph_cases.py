"""Rank bodies for tests/test_ep_graphs.py, each inside a spawned gloo process: the capture-safe EP path
(``engine.ep_moe.ExpertParallelDispatcher.dispatch_masked`` -> masked experts -> ``combine_masked``).

Every rank dispatches a fixed-size batch (a CUDA graph's bucket) under two routings: a random one, and one
where every token of a rank picks the same expert of its next peer, so that one (peer, expert) block holds
exactly the budget. Each run is traced op by op: the traces must be the same ops with the same shapes (no
shape depends on the routing) and hold no op that reads a device value on the host. A failed check raises;
the spawn re-raises it in the test with the rank's traceback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.ep_moe import ExpertParallelDispatcher
from engine.moe import MaskedTokens
from engine.parallel import ParallelContext
from kernels.ep import Dispatcher

HIDDEN = 8
TOP_K = 2
EXPERTS_PER_RANK = 2
BUDGET = 4  # tokens per rank per forward: the bucket every rank replays here
# Ops that copy a device value to the host (a sync a CUDA graph cannot hold) or size their output by data.
HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "equal", "is_nonzero")


class OpTrace(TorchDispatchMode):
    """Records every op's name and output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[tuple[int, ...], ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.ops.append((str(func.overloadpacket.__name__), shapes))
        return out


def masked_dispatcher(rank: int, world: int, group: Any, backend: str = "a2a") -> ExpertParallelDispatcher:
    """One MoE layer's view of a low-latency dispatcher over ``world`` EP ranks, each its own DP group."""
    ep = Dispatcher(world * EXPERTS_PER_RANK, HIDDEN, group=group, backend=backend, mode="low_latency",
                    num_max_dispatch_tokens_per_rank=BUDGET)
    pctx = ParallelContext(tp_rank=rank, tp_size=world, dp_size=world, tp_group=group)
    return ExpertParallelDispatcher(ep, pctx, layer_id=0, recorder=None)


def scaled_experts(masked: MaskedTokens, rank: int) -> torch.Tensor:
    """Stand-in experts on the masked layout, exact in fp32 and free of host reads: row ``x`` of global expert
    ``e`` gives ``x * (e + 1)``; rows past the count give a huge value that combine must never read."""
    local, capacity = masked.x.shape[:2]
    scale = (torch.arange(local) + rank * EXPERTS_PER_RANK + 1).float().view(-1, 1, 1)
    valid = torch.arange(capacity).view(1, -1) < masked.counts.view(-1, 1)
    return torch.where(valid.unsqueeze(-1), masked.x * scale, torch.full_like(masked.x, 1e9))


def reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for k in range(ids.shape[1]):
        out += torch.where((ids[:, k] >= 0)[:, None], x * (ids[:, k] + 1).float()[:, None] * weights[:, k : k + 1], 0.0)
    return out


def routings(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, ids, weights) of ``BUDGET`` tokens: random routing (some ``-1``), then all on one peer's expert."""
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(-8, 9, (BUDGET, HIDDEN), generator=gen).float()
    weights = 2.0 ** -torch.randint(0, 4, (BUDGET, TOP_K), generator=gen).float()
    experts = world * EXPERTS_PER_RANK
    spread = torch.stack([torch.randperm(experts, generator=gen)[:TOP_K] for _ in range(BUDGET)])
    spread[::3, -1] = -1
    peer_expert = ((rank + 1) % world) * EXPERTS_PER_RANK  # every token: this expert, then one of mine
    packed = torch.tensor([[peer_expert, rank * EXPERTS_PER_RANK + 1]] * BUDGET)
    return [(x, spread, weights), (x, packed, weights)]


def check_masked_path_is_exact_with_fixed_shapes_and_no_host_read(rank: int, world: int, group: Any) -> None:
    dispatcher = masked_dispatcher(rank, world, group)
    traces = []
    try:
        for x, ids, weights in routings(rank, world):
            with OpTrace() as trace:
                masked = dispatcher.dispatch_masked(x, ids, weights)
                out = dispatcher.combine_masked(scaled_experts(masked, rank), masked)
            torch.testing.assert_close(out, reference(x, ids, weights), rtol=0, atol=0)
            traces.append(trace.ops)
            assert masked.x.shape == (EXPERTS_PER_RANK, world * BUDGET, HIDDEN)
        # The packed routing: the previous rank's block of local expert 0 and this rank's own block of local
        # expert 1 each hold exactly the budget.
        assert masked.counts.tolist() == [BUDGET, BUDGET], masked.counts
    finally:
        dispatcher.ep.close()
    reads = sorted({name for name, _ in traces[0] + traces[1] if name.lstrip("_").startswith(HOST_READS)})
    assert not reads, f"host reads in the masked path: {reads}"
    assert traces[0] == traces[1], "an op or a shape of the masked path depends on the routing"
    assert any("alltoall" in name for name, _ in traces[0]), "the exchange was not traced"


def rank_main(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check_masked_path_is_exact_with_fixed_shapes_and_no_host_read(rank, world, None)
        # A rank that tore its group down while its peer still had an exchange in flight aborted gloo
        # ("terminate called without an active exception", SIGABRT; about 1 run in 3 on two CPU cores).
        dist.barrier()
    finally:
        dist.destroy_process_group()
