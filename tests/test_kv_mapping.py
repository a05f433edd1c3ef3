"""The rank mapping over every power-of-two (P tp, P dp, D tp, D dp) up to 16 (DESIGN.md, rank mapping)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from kvtransfer.mapping import ParallelLayout, contact_counts, map_ranks, prefill_dp_group, sources_for
from kvtransfer.state import KVMappingError

SIZES = (1, 2, 4, 8, 16)
LAYOUTS = [ParallelLayout(tp, dp) for tp in SIZES for dp in SIZES if dp <= tp]
COMBOS = list(itertools.product(LAYOUTS, LAYOUTS))
ROOMS = range(256)  # a multiple of every prefill dp_size * (attn_tp ratio): each rotation equally often


def test_every_power_of_two_combination_is_covered() -> None:
    assert len(LAYOUTS) == 15 and len(COMBOS) == 225


@pytest.mark.parametrize("prefill,decode", COMBOS, ids=lambda p: f"tp{p.tp_size}dp{p.dp_size}")
def test_decode_rank_gets_exactly_one_real_source_holding_its_kv(prefill: ParallelLayout, decode: ParallelLayout) -> None:
    for decode_dp_rank in range(decode.dp_size):
        for room in range(0, 64):
            sources = map_ranks(prefill, decode, decode_dp_rank, room)
            holders = set(prefill.group_ranks(room % prefill.dp_size))
            # one entry per decode rank of the group, in order: each decode page has exactly one writer
            assert [s.decode_rank for s in sources] == list(decode.group_ranks(decode_dp_rank))
            for source in sources:
                assert source.real in holders
                assert set(source.dummies) <= holders
                assert source.real not in source.dummies
                assert len(set(source.dummies)) == len(source.dummies)
            # every prefill rank of the group is contacted, so each learns the room's fate
            assert {r for s in sources for r in s.contacted} == holders
            # as many distinct real sources as the smaller group allows: traffic is split
            assert len({s.real for s in sources}) == min(len(holders), len(sources))


@pytest.mark.parametrize("prefill,decode", COMBOS, ids=lambda p: f"tp{p.tp_size}dp{p.dp_size}")
def test_real_sources_spread_evenly_over_prefill_ranks(prefill: ParallelLayout, decode: ParallelLayout) -> None:
    for decode_dp_rank in range(decode.dp_size):
        writes: Counter[int] = Counter({r: 0 for r in range(prefill.tp_size)})
        for room in ROOMS:
            writes.update(s.real for s in map_ranks(prefill, decode, decode_dp_rank, room))
        assert max(writes.values()) - min(writes.values()) <= 1, writes
        # any number of consecutive rooms: the rooms in which a rank is a real source differ by at most one
        rooms_as_real: Counter[int] = Counter({r: 0 for r in range(prefill.tp_size)})
        for room in range(101):
            rooms_as_real.update({s.real for s in map_ranks(prefill, decode, decode_dp_rank, room)})
        assert max(rooms_as_real.values()) - min(rooms_as_real.values()) <= 1, rooms_as_real


def test_real_source_rotates_per_room() -> None:
    prefill, decode = ParallelLayout(4), ParallelLayout(1)
    reals = [map_ranks(prefill, decode, 0, room)[0].real for room in range(8)]
    assert reals == [0, 1, 2, 3, 0, 1, 2, 3]


def test_design_md_example_p_tp4_to_d_tp4_dp2() -> None:
    prefill, decode = ParallelLayout(4), ParallelLayout(4, 2)
    rooms = [room for room in range(8) if map_ranks(prefill, decode, 0, room)[0].real == 0]
    sources = map_ranks(prefill, decode, 0, rooms[0])
    assert [(s.decode_rank, s.real, s.dummies) for s in sources] == [(0, 0, (2,)), (1, 1, (3,))]
    # the next room swaps which of each pair writes
    sources = map_ranks(prefill, decode, 0, rooms[0] + 1)
    assert [(s.decode_rank, s.real, s.dummies) for s in sources] == [(0, 2, (0,)), (1, 3, (1,))]


def test_prefill_group_follows_room_unless_prefill_dp_rank_is_given() -> None:
    prefill = ParallelLayout(8, 4)
    assert prefill_dp_group(prefill, 13) == 1
    assert prefill_dp_group(prefill, 13, prefill_dp_rank=3) == 3
    sources = map_ranks(prefill, ParallelLayout(2), 0, 13, prefill_dp_rank=3)
    assert {s.real for s in sources} == {6, 7}


def test_contact_counts_tell_each_prefill_rank_how_many_decode_ranks_to_expect() -> None:
    prefill, decode = ParallelLayout(2), ParallelLayout(8)
    assert contact_counts(map_ranks(prefill, decode, 0, 5)) == {0: 4, 1: 4}
    mine, counts = sources_for(ParallelLayout(4), ParallelLayout(2), decode_rank=1, room=2)
    assert mine.decode_rank == 1 and set(counts) == set(mine.contacted) and set(counts.values()) == {1}


def test_non_power_of_two_layouts_still_give_one_real_source_each() -> None:
    for a, b in itertools.product(range(1, 7), repeat=2):
        for room in range(12):
            sources = map_ranks(ParallelLayout(a), ParallelLayout(b), 0, room)
            assert len(sources) == b
            assert {r for s in sources for r in s.contacted} == set(range(a))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ParallelLayout(4, 3), "does not divide"),
        (lambda: ParallelLayout(0), "positive"),
        (lambda: map_ranks(ParallelLayout(4, 2), ParallelLayout(2), 0, 1, prefill_dp_rank=2), "prefill_dp_rank"),
        (lambda: map_ranks(ParallelLayout(4), ParallelLayout(4, 2), 2, 1), "dp_rank 2 out of range"),
        (lambda: map_ranks(ParallelLayout(4), ParallelLayout(4), 0, -1), "non-negative"),
        (lambda: sources_for(ParallelLayout(4), ParallelLayout(4), 4, 1), "rank 4 out of range"),
    ],
)
def test_impossible_combinations_are_refused_with_a_clear_error(make: object, message: str) -> None:
    with pytest.raises(KVMappingError, match=message):
        make()  # type: ignore[operator]
