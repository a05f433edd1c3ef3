"""Which prefill ranks each decode rank of a request's attention-DP group talks to (DESIGN.md, rank mapping).

Pure functions of the two instances' parallel layouts, the decode DP group and the room. MLA's latent KV is
replicated over an attention-TP group, so every rank of the prefill group holds the whole request's KV and
every rank of the decode group needs all of it. For each decode rank one prefill rank is *real* (it writes
the pages) and the others it contacts are *dummy* (they only report that they are done, so that each
prefill rank learns the room's fate and frees its pages).

Rules, with a = prefill attn_tp, b = decode attn_tp, j = decode rank within its group, and a rotation
r = room // prefill dp_size (the room's index among the rooms of its prefill group):
- b >= a: decode rank j reads from prefill rank (j + r) % a; every prefill rank is real for b / a decode
  ranks, so no dummies are needed.
- b < a: decode rank j contacts the prefill ranks i with i % b == j (a / b of them, each contacted once);
  the real one among them is the (r % (a / b))-th, the rest are dummies.
Consecutive rooms of a group thus cycle the real source over every prefill rank (SGLang PR #5887's review:
split the traffic), and each decode page has exactly one writer.

MLA-core data parallelism (`ParallelLayout.mla_core`, dp 1) keeps a request's KV on one rank of the
instance, so that rank alone is the side's KV group (a = 1 or b = 1 above):
- prefill: the owner is rank `room % tp_size` (`prefill_owner`; as for DP groups, decode knows it without
  asking); it is the only source, real for every decode rank that needs the KV; the other prefill ranks
  are not contacted and open no sender for the room.
- decode: the owner (chosen by the decode scheduler: the rank with the most free pages) is the only rank
  that receives; it contacts every rank of the prefill group, one real (rotating per room), the others
  dummies; the other decode ranks contact nobody and get no pages written (no replication, no dummy writes).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtransfer.state import KVMappingError


@dataclass(frozen=True)
class ParallelLayout:
    """An instance's parallelism: `tp_size` ranks in `dp_size` attention-DP groups of `attn_tp_size`."""

    tp_size: int
    dp_size: int = 1
    mla_core: bool = False  # each request's KV on one rank (dp must be 1)

    def __post_init__(self) -> None:
        if not isinstance(self.tp_size, int) or self.tp_size <= 0:
            raise KVMappingError(f"tp_size must be a positive int, got {self.tp_size!r}")
        if not isinstance(self.dp_size, int) or self.dp_size <= 0:
            raise KVMappingError(f"dp_size must be a positive int, got {self.dp_size!r}")
        if self.tp_size % self.dp_size:
            raise KVMappingError(f"dp_size {self.dp_size} does not divide tp_size {self.tp_size}")
        if self.mla_core and self.dp_size != 1:
            raise KVMappingError(f"an mla-core instance has dp_size 1, got {self.dp_size}")

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.dp_size

    def group_ranks(self, dp_rank: int) -> range:
        """The ranks of attention-DP group `dp_rank`."""
        if not 0 <= dp_rank < self.dp_size:
            raise KVMappingError(f"dp_rank {dp_rank} out of range [0, {self.dp_size})")
        return range(dp_rank * self.attn_tp_size, (dp_rank + 1) * self.attn_tp_size)

    def dp_rank_of(self, rank: int) -> int:
        if not 0 <= rank < self.tp_size:
            raise KVMappingError(f"rank {rank} out of range [0, {self.tp_size})")
        return rank // self.attn_tp_size


@dataclass(frozen=True)
class RankSources:
    """What one decode rank does for one room: read from `real`, tell `dummies` where the room stands.

    All ranks are global ranks of their instance.
    """

    decode_rank: int
    real: int
    dummies: tuple[int, ...]

    @property
    def contacted(self) -> tuple[int, ...]:
        return (self.real, *self.dummies)


def prefill_dp_group(prefill: ParallelLayout, room: int, prefill_dp_rank: int | None = None) -> int:
    """The prefill attention-DP group that runs the room: `prefill_dp_rank` if given (the request's
    `disagg_prefill_dp_rank`, which a DP-aware router sets by load), else room % dp."""
    if not isinstance(room, int) or room < 0:
        raise KVMappingError(f"bootstrap_room must be a non-negative int, got {room!r}")
    if prefill_dp_rank is None:
        return room % prefill.dp_size
    if not isinstance(prefill_dp_rank, int) or not 0 <= prefill_dp_rank < prefill.dp_size:
        raise KVMappingError(
            f"disagg_prefill_dp_rank {prefill_dp_rank!r} out of range: the prefill instance has "
            f"dp_size {prefill.dp_size}"
        )
    return prefill_dp_rank


def prefill_owner(prefill: ParallelLayout, room: int) -> int:
    """The one rank of an mla-core prefill instance that holds the room's KV: `room % tp_size`."""
    if not prefill.mla_core:
        raise KVMappingError("only an mla-core prefill instance has a single owner rank per room")
    if not isinstance(room, int) or room < 0:
        raise KVMappingError(f"bootstrap_room must be a non-negative int, got {room!r}")
    return room % prefill.tp_size


def prefill_kv_ranks(prefill: ParallelLayout, room: int, prefill_dp_rank: int | None = None) -> range:
    """The prefill ranks that hold the room's KV: its attention-DP group, or an mla-core instance's owner."""
    group = prefill_dp_group(prefill, room, prefill_dp_rank)
    if prefill.mla_core:
        owner = prefill_owner(prefill, room)
        return range(owner, owner + 1)
    return prefill.group_ranks(group)


def decode_kv_ranks(decode: ParallelLayout, decode_dp_rank: int, decode_owner: int | None = None) -> range:
    """The decode ranks that need the room's KV: its attention-DP group, or an mla-core instance's owner."""
    if not decode.mla_core:
        return decode.group_ranks(decode_dp_rank)
    if not isinstance(decode_owner, int) or not 0 <= decode_owner < decode.tp_size:
        raise KVMappingError(f"an mla-core decode instance needs the owner rank of the room in "
                             f"[0, {decode.tp_size}), got {decode_owner!r}")
    return range(decode_owner, decode_owner + 1)


def map_ranks(
    prefill: ParallelLayout,
    decode: ParallelLayout,
    decode_dp_rank: int,
    room: int,
    prefill_dp_rank: int | None = None,
    decode_owner: int | None = None,
) -> list[RankSources]:
    """For every decode rank that needs the room's KV (group `decode_dp_rank`, or an mla-core instance's
    `decode_owner`), in rank order, the prefill ranks it contacts."""
    prefill_ranks = prefill_kv_ranks(prefill, room, prefill_dp_rank)
    decode_ranks = decode_kv_ranks(decode, decode_dp_rank, decode_owner)
    a, b = len(prefill_ranks), len(decode_ranks)
    rotation = room // prefill.dp_size  # (an mla-core prefill side has a = 1: no rotation)
    sources: list[RankSources] = []
    for j, decode_rank in enumerate(decode_ranks):
        if b >= a:
            sources.append(RankSources(decode_rank, prefill_ranks[(j + rotation) % a], ()))
            continue
        contacts = [prefill_ranks[i] for i in range(j, a, b)]
        real = contacts[rotation % len(contacts)]
        sources.append(RankSources(decode_rank, real, tuple(r for r in contacts if r != real)))
    return sources


def sources_for(
    prefill: ParallelLayout,
    decode: ParallelLayout,
    decode_rank: int,
    room: int,
    prefill_dp_rank: int | None = None,
    decode_owner: int | None = None,
) -> tuple[RankSources, dict[int, int]]:
    """This decode rank's sources, and for each of them how many decode ranks contact it for this room.

    The counts travel with the transfer requests: a prefill rank starts writing once it has heard from
    every decode rank that will contact it. On an mla-core decode instance only `decode_owner` has sources.
    """
    group_sources = map_ranks(prefill, decode, decode.dp_rank_of(decode_rank), room, prefill_dp_rank,
                              decode_owner)
    mine = next((s for s in group_sources if s.decode_rank == decode_rank), None)
    if mine is None:
        raise KVMappingError(f"decode rank {decode_rank} holds no KV of room {room} (its owner is {decode_owner})")
    counts = contact_counts(group_sources)
    return mine, {rank: counts[rank] for rank in mine.contacted}


def contact_counts(group_sources: list[RankSources]) -> dict[int, int]:
    """How many decode ranks of the group contact each prefill rank (contacted ranks only)."""
    counts: dict[int, int] = {}
    for source in group_sources:
        for rank in source.contacted:
            counts[rank] = counts.get(rank, 0) + 1
    return counts
