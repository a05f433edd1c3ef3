"""Where each expert's replicas go: DeepSeek's hierarchical expert-parallel load balancing, as pure functions.

Input: tokens routed to each logical expert of each MoE layer over a window (``load [L, E]``). Output: a
``Placement`` of ``P = E + redundant`` physical experts, ``P / ranks`` per EP rank. Three stages, each a
greedy balanced packing:

1. expert groups onto nodes (``G / nodes`` groups per node), so the experts one token may pick under
   group-limited routing (``n_group`` / ``topk_group``) stay within as few nodes as the groups allow;
2. inside each node, the node's ``P / nodes`` physical slots go to its experts: each starts with one
   replica and every spare slot goes to the expert whose tokens per replica are highest;
3. inside each node, the replicas are packed onto its ranks (``P / ranks`` slots each), heaviest first, each
   onto the lightest rank with a free slot, preferring a rank that holds no replica of the same expert.

An expert's tokens are assumed to split evenly over its replicas (the dispatch spreads them round-robin,
``engine.eplb.placement``). Without groups (V2-style greedy routing), or when the groups do not divide over
the nodes, the instance is treated as one node: stage 1 is then the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """A logical -> physical expert map for every MoE layer.

    Attributes:
        phy2log: ``[L, P]`` int64, the logical expert in each physical slot; slot ``s`` lives on rank
            ``s // (P / ranks)``.
        log2phy: ``[L, E, max_replicas]`` int64, each logical expert's physical slots, padded with -1.
        logcnt: ``[L, E]`` int64, replicas of each logical expert (>= 1).
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_logical(self) -> int:
        return int(self.logcnt.shape[1])


def placement_from_phy2log(phy2log: torch.Tensor, num_logical: int) -> Placement:
    """The full map from ``phy2log`` alone; refuses a map that leaves a logical expert without a replica."""
    phy2log = phy2log.long().cpu()
    layers, _ = phy2log.shape
    logcnt = torch.zeros(layers, num_logical, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    if bool((logcnt == 0).any()):
        layer, expert = (logcnt == 0).nonzero()[0].tolist()
        raise ValueError(f"layer {layer}: logical expert {expert} has no physical replica")
    width = int(logcnt.max())
    log2phy = torch.full((layers, num_logical, width), -1, dtype=torch.int64)
    # Slots of one expert in ascending physical order: a stable sort by logical id, then the rank of each
    # slot among its expert's slots.
    order = phy2log.argsort(dim=1, stable=True)
    sorted_log = phy2log.gather(1, order)
    starts = logcnt.cumsum(dim=1) - logcnt
    within = torch.arange(phy2log.shape[1]).expand(layers, -1) - starts.gather(1, sorted_log)
    log2phy[torch.arange(layers).unsqueeze(1), sorted_log, within] = order
    return Placement(phy2log, log2phy, logcnt)


def static_placement(num_layers: int, num_logical: int, num_physical: int) -> Placement:
    """The layout at start-up (vLLM's): slots ``0..E-1`` hold experts ``0..E-1``; redundant slot ``E + i``
    holds expert ``i % E``."""
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} logical experts")
    row = torch.arange(num_physical) % num_logical
    return placement_from_phy2log(row.expand(num_layers, -1).clone(), num_logical)


def rank_loads(load: torch.Tensor, placement: Placement, num_ranks: int) -> torch.Tensor:
    """``[L, ranks]`` float64 tokens per rank when each expert's tokens split evenly over its replicas."""
    per_replica = load.double() / placement.logcnt.double()
    slot_load = per_replica.gather(1, placement.phy2log)
    return slot_load.view(load.shape[0], num_ranks, -1).sum(dim=2)


def balancedness(load: torch.Tensor, placement: Placement, num_ranks: int) -> tuple[list[float], float]:
    """Mean / max tokens per rank: per layer, and overall (sum of the layers' means / sum of their maxima,
    as vLLM logs it). 1.0 is perfect; a layer with no tokens counts as 1.0."""
    ranks = rank_loads(load, placement, num_ranks)
    mean, peak = ranks.mean(dim=1), ranks.max(dim=1).values
    per_layer = torch.where(peak > 0, mean / peak.clamp(min=1e-12), torch.ones_like(mean))
    total_peak = float(peak.sum())
    overall = float(mean.sum()) / total_peak if total_peak > 0 else 1.0
    return per_layer.tolist(), overall


def _pack(weight: torch.Tensor, item_key: torch.Tensor | None, num_packs: int, num_keys: int = 0,
          max_swaps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy balanced packing of ``[X, n]`` items into ``num_packs`` packs of ``n / num_packs`` items, for
    every row at once: heaviest item first, onto the lightest pack with room. With ``item_key`` (``[X, n]``
    ids below ``num_keys``), a pack already holding an item of the same key is taken only when every pack
    with room holds one, and up to ``max_swaps`` swaps then refine each row. Returns (pack of each item, its position inside the pack), both ``[X, n]``."""
    rows, n = weight.shape
    capacity = n // num_packs
    order = weight.double().argsort(dim=1, descending=True, stable=True)
    pack_load = torch.zeros(rows, num_packs, dtype=torch.float64)
    pack_fill = torch.zeros(rows, num_packs, dtype=torch.int64)
    holds = torch.zeros(rows, num_packs, max(num_keys, 1), dtype=torch.bool)
    pack_of = torch.empty(rows, n, dtype=torch.int64)
    pos_of = torch.empty(rows, n, dtype=torch.int64)
    row = torch.arange(rows)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for j in range(n):
        item = order[:, j]
        free = pack_fill < capacity
        choice = torch.where(free, pack_load, inf).argmin(dim=1)
        if item_key is not None:
            key = item_key[row, item]
            fresh = free & ~holds[row, :, key]
            choice = torch.where(fresh.any(dim=1), torch.where(fresh, pack_load, inf).argmin(dim=1), choice)
            holds[row, choice, key] = True
        pack_of[row, item] = choice
        pos_of[row, item] = pack_fill[row, choice]
        pack_load[row, choice] += weight[row, item].double()
        pack_fill[row, choice] += 1
    if item_key is not None and max_swaps:
        for r in range(rows):
            _improve_by_swaps(weight[r].double(), item_key[r], pack_of[r], pos_of[r], num_packs, num_keys,
                              max_swaps)
    return pack_of, pos_of


def _improve_by_swaps(weight: torch.Tensor, key: torch.Tensor, pack_of: torch.Tensor, pos_of: torch.Tensor,
                      num_packs: int, num_keys: int, max_swaps: int) -> None:
    """Local search after the greedy packing (in place, one row): swap an item of the heaviest pack with an
    item of another pack while that lowers the heaviest of the two below the old maximum, never putting
    two items of one key on a pack that held only one. Greedy alone can strand a heavy pack (measured on
    small cases; on V3's 58 layers x 288 slots over 32 ranks, Zipf load: balancedness 0.9966 -> 0.9994 with
    8 swaps, 28 -> 98 ms of CPU time)."""
    for _ in range(max_swaps):
        loads = torch.zeros(num_packs, dtype=torch.float64).index_add_(0, pack_of, weight)
        heavy = int(loads.argmax())
        mine = (pack_of == heavy).nonzero().flatten()
        other = (pack_of != heavy).nonzero().flatten()
        if other.numel() == 0:
            return
        wa, wb = weight[mine].unsqueeze(1), weight[other].unsqueeze(0)  # [S, 1], [1, n - S]
        new_heavy = loads[heavy] - wa + wb
        new_other = loads[pack_of[other]].unsqueeze(0) - wb + wa
        worst = torch.maximum(new_heavy, new_other)
        # Replicas of one expert stay apart: b may enter `heavy` only if no item there has b's key, and a
        # may enter b's pack only if no item there has a's key (equal keys weigh the same: no gain).
        per_pack = torch.zeros(num_packs, num_keys, dtype=torch.int64)
        per_pack.index_put_((pack_of, key), torch.ones_like(key), accumulate=True)
        b_fits = per_pack[heavy, key[other]].unsqueeze(0) == 0
        a_fits = per_pack[pack_of[other].unsqueeze(0), key[mine].unsqueeze(1)] == 0
        allowed = b_fits & a_fits
        better = allowed & (worst < loads[heavy] - 1e-9)
        if not bool(better.any()):
            return
        flat = int(torch.where(better, worst, torch.inf).flatten().argmin())
        a, b = int(mine[flat // other.numel()]), int(other[flat % other.numel()])
        pack_of[a], pack_of[b] = pack_of[b].clone(), pack_of[a].clone()
        pos_of[a], pos_of[b] = pos_of[b].clone(), pos_of[a].clone()


def _replicate(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[X, n]`` loads onto ``num_physical >= n`` replicas per row: one each, then every spare one to the
    expert with the most tokens per replica. Returns (expert of each replica ``[X, P]``, replicas ``[X, n]``)."""
    rows, n = weight.shape
    row = torch.arange(rows)
    phy2log = torch.empty(rows, num_physical, dtype=torch.int64)
    phy2log[:, :n] = torch.arange(n)
    count = torch.ones(rows, n, dtype=torch.int64)
    w = weight.double()
    for slot in range(n, num_physical):
        hottest = (w / count).argmax(dim=1)
        phy2log[:, slot] = hottest
        count[row, hottest] += 1
    return phy2log, count


def rebalance_experts(load: torch.Tensor, num_physical: int, num_ranks: int, num_groups: int = 1,
                      num_nodes: int = 1, max_swaps: int = 8) -> Placement:
    """The placement for ``load [L, E]`` (tokens per logical expert) over ``num_ranks`` EP ranks on
    ``num_nodes`` nodes with ``num_physical`` slots in all. ``num_groups``: the model's expert groups
    (``n_group``; 1 = no group-limited routing). Deterministic: every rank that calls it with the same
    load gets the same placement."""
    if load.dim() != 2:
        raise ValueError(f"load must be [layers, experts], got {tuple(load.shape)}")
    layers, num_logical = load.shape
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} logical experts")
    if num_ranks < 1 or num_physical % num_ranks:
        raise ValueError(f"{num_physical} physical experts do not split evenly over {num_ranks} EP ranks")
    if num_nodes < 1 or num_ranks % num_nodes:
        raise ValueError(f"{num_ranks} ranks do not split evenly over {num_nodes} nodes")
    if num_groups < 1 or num_logical % num_groups:
        raise ValueError(f"{num_logical} experts do not split into {num_groups} groups")
    if num_groups % num_nodes or num_physical % num_nodes:
        num_groups, num_nodes = 1, 1  # one node as far as placement goes (still valid, less local)
    load = load.double().cpu()
    group_size, groups_per_node = num_logical // num_groups, num_groups // num_nodes
    per_node = num_logical // num_nodes
    ranks_per_node = num_ranks // num_nodes

    # 1. groups onto nodes; "mlog" numbers experts node-major (node, group inside the node, expert).
    group_load = load.view(layers, num_groups, group_size).sum(dim=2)
    group_node, group_pos = _pack(group_load, None, num_nodes)
    group_mlog_start = (group_node * groups_per_node + group_pos) * group_size  # [L, G]
    log2mlog = (group_mlog_start.unsqueeze(2) + torch.arange(group_size)).view(layers, num_logical)
    mlog2log = torch.empty_like(log2mlog)
    mlog2log.scatter_(1, log2mlog, torch.arange(num_logical).expand(layers, -1))

    # 2. each node's slots onto its experts.
    mlog_load = load.gather(1, mlog2log).view(layers * num_nodes, per_node)
    phy2node_expert, count = _replicate(mlog_load, num_physical // num_nodes)

    # 3. each node's replicas onto its ranks, replicas of one expert on distinct ranks where possible.
    replica_load = mlog_load.gather(1, phy2node_expert) / count.gather(1, phy2node_expert).double()
    rank_of, pos_of = _pack(replica_load, phy2node_expert, ranks_per_node, per_node, max_swaps)
    slots_per_rank = num_physical // num_ranks
    node_slot = rank_of * slots_per_rank + pos_of  # [L * nodes, P / nodes]
    node_phy2expert = torch.empty_like(phy2node_expert)
    node_phy2expert.scatter_(1, node_slot, phy2node_expert)

    node_offset = (torch.arange(num_nodes) * per_node).repeat(layers).unsqueeze(1)
    phy2mlog = (node_phy2expert + node_offset).view(layers, num_physical)
    return placement_from_phy2log(mlog2log.gather(1, phy2mlog), num_logical)
