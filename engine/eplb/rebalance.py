"""Moving expert weights to a new placement, rank to rank over the instance's process group.

Every rank derives the same move list from the old and new ``phy2log`` rows (``plan_moves``), so no rank
has to tell another what to send: a slot that keeps its expert stays, a slot whose new expert this rank
already held (in any slot) copies it locally, and every other slot receives it point-to-point from one rank
that held it, the holders taking turns so that sends spread. Sends and receives of one layer are posted as
one batch (NCCL matches a pair's point-to-point operations in order; every rank posts them in the same
order), then the layer's new buffers replace the old ones. The caller switches the map afterwards, at the
same step on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from engine.moe import MoEBlock


@dataclass(frozen=True)
class Move:
    """New physical slot ``dst`` takes its expert from old physical slot ``src``."""

    dst: int
    src: int


def plan_moves(old: list[int], new: list[int], num_ranks: int, new_ranks: int | None = None) -> list[Move]:
    """For each physical slot whose expert must arrive, where it comes from; ascending ``dst``. A slot
    keeping its expert needs no move and is left out.

    ``new_ranks`` (elastic EP): the new placement spreads its slots over this many ranks instead of
    ``num_ranks``; ranks keep their ids, so a rank added by a scale-up holds no old slot and a rank removed by
    a scale-down holds no new one. Every new slot then names its source, also where the expert stays on its
    rank (a local copy: a slot's index in the rank's tensors changes with the slots per rank)."""
    slots = len(old) // num_ranks
    new_ranks = num_ranks if new_ranks is None else new_ranks
    new_slots = len(new) // new_ranks
    resized = new_ranks != num_ranks
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old):
        holders.setdefault(expert, []).append(slot)
    moves = []
    turn: dict[int, int] = {}
    for dst, expert in enumerate(new):
        if not resized and old[dst] == expert:
            continue
        if expert not in holders:
            raise ValueError(f"expert {expert} is held by no slot of the old placement")
        rank = dst // new_slots
        local = [s for s in holders[expert] if s // slots == rank]
        if local:
            moves.append(Move(dst, local[0]))
            continue
        # Holders on other ranks take turns, so that one hot expert's new replicas come from several ranks.
        options = holders[expert]
        pick = turn.get(expert, 0)
        turn[expert] = pick + 1
        moves.append(Move(dst, options[pick % len(options)]))
    return moves


def move_layer(block: MoEBlock, old: list[int], new: list[int], ep_rank: int, ep_size: int,
               group: Any = None, new_size: int | None = None) -> int:
    """Rewrites ``block``'s expert tensors from placement row ``old`` to ``new`` (a collective over the EP
    group: every rank calls it for the same layer). Returns how many experts moved between ranks, over the
    whole instance (the same number on every rank).

    ``new_size`` (elastic EP): ``new`` spreads over that many ranks; ``group`` must then span both layouts
    (the larger world: ranks ``0 .. max(ep_size, new_size) - 1``), and ``ep_rank`` may hold no old slot (a
    joining rank) or no new one (a leaving rank)."""
    new_size = ep_size if new_size is None else new_size
    slots, new_slots = len(old) // ep_size, len(new) // new_size
    first, new_first = ep_rank * slots, ep_rank * new_slots
    tensors = block.expert_tensors()
    moves = plan_moves(old, new, ep_size, new_size)
    if not moves:
        return 0
    if new_size == ep_size:
        fresh = [t.detach().clone() for t in tensors]  # kept slots stay; the others are overwritten below
    else:  # every slot of this rank's new share arrives (locally or from a peer)
        held = new_slots if ep_rank < new_size else 0
        fresh = [t.new_empty((held, *t.shape[1:])) for t in tensors]
    ops: list[dist.P2POp] = []
    between_ranks = 0
    for move in moves:
        dst_rank, src_rank = move.dst // new_slots, move.src // slots
        between_ranks += dst_rank != src_rank
        if dst_rank == ep_rank and src_rank == ep_rank:
            for new_t, old_t in zip(fresh, tensors, strict=True):
                new_t[move.dst - new_first].copy_(old_t[move.src - first])
        elif dst_rank == ep_rank:
            ops.extend(dist.P2POp(dist.irecv, t[move.dst - new_first], group=group, group_peer=src_rank)
                       for t in fresh)
        elif src_rank == ep_rank:
            ops.extend(dist.P2POp(dist.isend, t[move.src - first].contiguous(), group=group, group_peer=dst_rank)
                       for t in tensors)
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for param, new_t in zip(tensors, fresh, strict=True):
        param.data = new_t
    block.local_experts = list(new[new_first : new_first + len(fresh[0])])
    return between_ranks
