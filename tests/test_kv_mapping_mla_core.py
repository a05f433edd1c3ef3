"""The rank mapping with MLA-core data parallelism on either side, for every power-of-two layout up to 16
(kvtransfer/README.md, "MLA-core data parallelism"): the pages go to the one decode rank that owns the
request, the owning prefill rank is the only real source, every contacted prefill rank holds the KV."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from kvtransfer.mapping import (
    ParallelLayout,
    contact_counts,
    map_ranks,
    prefill_kv_ranks,
    prefill_owner,
    sources_for,
)
from kvtransfer.state import KVMappingError

SIZES = (1, 2, 4, 8, 16)
WHOLE = [ParallelLayout(tp, dp) for tp in SIZES for dp in SIZES if dp <= tp]
MLA_CORE = [ParallelLayout(tp, 1, mla_core=True) for tp in SIZES]
# (prefill, decode) with mla-core on at least one side: 5 x 15 + 15 x 5 + 5 x 5
COMBOS = [
    *itertools.product(MLA_CORE, WHOLE),
    *itertools.product(WHOLE, MLA_CORE),
    *itertools.product(MLA_CORE, MLA_CORE),
]
ROOMS = range(64)


def _name(layout: ParallelLayout) -> str:
    return f"tp{layout.tp_size}" + ("mla" if layout.mla_core else f"dp{layout.dp_size}")


def _decode_cases(decode: ParallelLayout) -> list[tuple[int, int | None]]:
    """(decode dp_rank, decode owner) pairs: every group, or every owner rank of an mla-core instance."""
    if decode.mla_core:
        return [(0, owner) for owner in range(decode.tp_size)]
    return [(g, None) for g in range(decode.dp_size)]


def test_every_power_of_two_combination_with_mla_core_is_covered() -> None:
    assert len(COMBOS) == 5 * 15 * 2 + 25


@pytest.mark.parametrize("prefill,decode", COMBOS, ids=_name)
def test_each_decode_rank_that_needs_the_kv_gets_one_real_source_holding_it(
    prefill: ParallelLayout, decode: ParallelLayout
) -> None:
    for (dp_rank, owner), room in itertools.product(_decode_cases(decode), ROOMS):
        sources = map_ranks(prefill, decode, dp_rank, room, decode_owner=owner)
        holders = set(prefill_kv_ranks(prefill, room))
        if prefill.mla_core:
            assert holders == {room % prefill.tp_size}
        if decode.mla_core:  # only the owner receives: no replication, no dummy writes elsewhere
            assert [s.decode_rank for s in sources] == [owner]
        else:
            assert [s.decode_rank for s in sources] == list(decode.group_ranks(dp_rank))
        for source in sources:
            assert source.real in holders and set(source.dummies) <= holders
            assert source.real not in source.dummies
        # every holder learns the room's fate; nobody else is contacted
        assert {r for s in sources for r in s.contacted} == holders
        assert set(contact_counts(sources)) == holders


@pytest.mark.parametrize("prefill,decode", COMBOS, ids=_name)
def test_real_sources_spread_over_the_prefill_ranks_across_rooms(
    prefill: ParallelLayout, decode: ParallelLayout
) -> None:
    for dp_rank, owner in _decode_cases(decode):
        writes: Counter[int] = Counter({r: 0 for r in range(prefill.tp_size)})
        for room in range(256):
            writes.update({s.real for s in map_ranks(prefill, decode, dp_rank, room, decode_owner=owner)})
        assert max(writes.values()) - min(writes.values()) <= 1, writes


@pytest.mark.parametrize("decode", MLA_CORE, ids=_name)
def test_decode_ranks_other_than_the_owner_have_no_sources(decode: ParallelLayout) -> None:
    prefill = ParallelLayout(4, 2)
    for owner, rank in itertools.product(range(decode.tp_size), range(decode.tp_size)):
        if rank == owner:
            mine, counts = sources_for(prefill, decode, rank, 5, decode_owner=owner)
            assert (
                mine.decode_rank == owner
                and set(counts) == set(mine.contacted)
                and set(counts.values()) == {1}
            )
        else:
            with pytest.raises(KVMappingError, match=f"decode rank {rank} holds no KV of room 5"):
                sources_for(prefill, decode, rank, 5, decode_owner=owner)


def test_mla_core_layouts_are_checked() -> None:
    with pytest.raises(KVMappingError, match="mla-core instance has dp_size 1"):
        ParallelLayout(4, 2, mla_core=True)
    with pytest.raises(KVMappingError, match="needs the owner rank"):
        map_ranks(ParallelLayout(2), ParallelLayout(4, mla_core=True), 0, 3)
    with pytest.raises(KVMappingError, match="single owner"):
        prefill_owner(ParallelLayout(4), 3)
    assert prefill_owner(ParallelLayout(4, mla_core=True), 7) == 3
