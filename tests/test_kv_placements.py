"""An elastic prefill instance's room placements (kvtransfer.placements): the bootstrap service keeps where each
room runs, fixed when the prefill's rank 0 routed it, and follows the instance's scales (new ranks register
with the layout a scale goes to; a scale given up forgets them).

The race they close: a decode rank that looks a room up after the prefill switched layout, for a room the
prefill started before the switch, must still map it to the old owners — and a room started after the switch
to the new ones. Here with real transfers, the prefill going from tp 2 dp 1 to tp 4 dp 2 (DP groups of two
ranks): retained ranks 0, 1 serve a room of the old layout (rank 1 real, its rotation in the old layout)
although the current layout would send decode to ranks 2, 3, and joined ranks 2, 3 serve a room of the new.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from test_kv_bootstrap import _registration
from test_kv_flow import (
    IN_PROCESS_DECODE,
    OPTIONS,
    SHAPE,
    TIMEOUTS,
    Child,
    _skip_without,
    check_destination,
    cleanup,  # noqa: F401 (the fixture)
    ready,
    start_decode,
    wait_terminal,
)

from kvtransfer.bootstrap import BootstrapService
from kvtransfer.bootstrap_client import BootstrapClient
from kvtransfer.mapping import ParallelLayout, map_ranks
from kvtransfer.messages import RoomPlacement
from kvtransfer.placements import fetch_placement
from kvtransfer.rooms import RankInfo
from kvtransfer.state import KVBootstrapError

OLD, NEW = ParallelLayout(2, 1), ParallelLayout(4, 2)
# Room 1 in the old layout: group 0, real rank 1 (rotation 1 // 1); the new layout would say group 1 (ranks 2, 3),
# and even told group 0 it would rotate to rank 0 (1 // 2). Room 3 in the new layout: group 1, real rank 3.
ROOM_BEFORE, ROOM_AFTER = 1, 3
SOURCES = {ROOM_BEFORE: (1, (0,)), ROOM_AFTER: (3, (2,))}  # (real, dummies) for a decode instance of one rank


@pytest.fixture
def service() -> Iterator[BootstrapService]:
    service = BootstrapService(OLD, room_placements=True)
    yield service
    service.close()


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _fetch(service: BootstrapService, room: int, wait_s: float) -> RoomPlacement:
    async def run() -> RoomPlacement:
        async with aiohttp.ClientSession() as session:
            return await fetch_placement(session, service.host, service.port, room, wait_s)

    return asyncio.run(run())


def _placed(room: int, layout: ParallelLayout) -> RoomPlacement:
    """As rank 0 places a room without a named group: room % dp of the layout of that turn."""
    return RoomPlacement(room=room, dp_rank=room % layout.dp_size, tp_size=layout.tp_size, dp_size=layout.dp_size)


def _register(service: BootstrapService, layout: ParallelLayout, ranks: range) -> None:
    client = BootstrapClient(timeout_s=2)
    for rank in ranks:
        client.register(service.address, _registration(rank, tp_size=layout.tp_size, dp_size=layout.dp_size))


def test_a_room_keeps_the_layout_it_started_in_after_the_instance_switches(service: BootstrapService) -> None:
    _register(service, OLD, range(2))
    service.place([_placed(ROOM_BEFORE, OLD)])
    service.expect(NEW)
    _register(service, NEW, range(2, 4))
    service.relayout(NEW)
    service.place([_placed(ROOM_AFTER, NEW)])
    before, after = _fetch(service, ROOM_BEFORE, 0), _fetch(service, ROOM_AFTER, 0)
    assert (before.dp_rank, before.tp_size, before.dp_size) == (0, 2, 1)
    assert (after.dp_rank, after.tp_size, after.dp_size) == (1, 4, 2)
    decode = ParallelLayout(1)  # what a decode instance of one rank maps with each placement
    for placement in before, after:
        (mine,) = map_ranks(ParallelLayout(placement.tp_size, placement.dp_size), decode, 0, placement.room,
                            placement.dp_rank)
        assert (mine.real, mine.dummies) == SOURCES[placement.room]
    # Mapped with the layout it looks up now, the old room would go elsewhere, even told its group.
    assert set(map_ranks(NEW, decode, 0, ROOM_BEFORE)[0].contacted) == {2, 3}
    assert map_ranks(NEW, decode, 0, ROOM_BEFORE, before.dp_rank)[0].real == 0
    info = BootstrapClient(timeout_s=2).lookup(service.host, service.port)
    assert (info.tp_size, info.dp_size, info.room_placements, info.complete) == (4, 2, True, True)


def test_a_lookup_waits_for_its_room_to_be_placed(service: BootstrapService) -> None:
    timer = threading.Timer(0.3, service.place, ([_placed(ROOM_AFTER, OLD)],))
    started = time.monotonic()
    timer.start()
    try:
        placement = _fetch(service, ROOM_AFTER, 10)
    finally:
        timer.cancel()
    assert placement.dp_rank == 1 % OLD.dp_size and 0.25 < time.monotonic() - started < 5
    assert service.placements is not None and service.placements.num_waiting == 0


def test_a_room_never_placed_is_a_clear_404(service: BootstrapService) -> None:
    with pytest.raises(KVBootstrapError, match="room 12 was not placed on this prefill instance within 0.2 s"):
        _fetch(service, 12, 0.2)
    status, body = _get(f"http://{service.address}/v1/rooms/nope")
    assert status == 400 and body["error"]["code"] == "bad_room"


def test_an_instance_with_a_fixed_layout_publishes_no_placements() -> None:
    fixed = BootstrapService(OLD)
    try:
        status, body = _get(f"http://{fixed.address}/v1/rooms/7?wait_s=0")
        assert status == 404 and body["error"]["code"] == "no_placements"
        _register(fixed, OLD, range(2))
        assert BootstrapClient(timeout_s=2).lookup(fixed.host, fixed.port).room_placements is False
    finally:
        fixed.close()


def test_registrations_follow_a_scale_and_a_given_up_one_forgets_its_ranks(service: BootstrapService) -> None:
    _register(service, OLD, range(2))
    with pytest.raises(KVBootstrapError, match="the instance is tp_size 2 dp_size 1"):
        _register(service, NEW, range(2, 3))  # no scale runs: a rank of another layout is refused
    service.expect(NEW)
    _register(service, NEW, range(2, 4))
    client = BootstrapClient(timeout_s=2)
    info = client.lookup(service.host, service.port)  # complete: the old layout's ranks are all there
    assert (info.tp_size, [r.rank for r in info.ranks]) == (2, [0, 1, 2, 3])
    service.abandon()  # the new ranks were killed while joining: they could not deregister
    client.invalidate(service.host, service.port)
    assert [r.rank for r in client.lookup(service.host, service.port).ranks] == [0, 1]
    with pytest.raises(KVBootstrapError, match="the instance is tp_size 2 dp_size 1"):
        _register(service, NEW, range(2, 3))


def test_a_decode_rank_maps_each_room_with_its_placement_across_a_switch(cleanup: list[Any]) -> None:  # noqa: F811
    """Real transfers over NIXL: prefill ranks 0, 1 (tp 2 dp 1), then ranks 2, 3 join (tp 4 dp 2)."""
    kind = "nixl"
    _skip_without(kind)
    service = BootstrapService(OLD, room_placements=True)
    cleanup.append(service)

    def prefill_rank(rank: int, layout: ParallelLayout) -> Child:
        child = Child("prefill", kind=kind, rank_info=RankInfo(rank, layout.tp_size, layout.dp_size),
                      bootstrap_addr=service.address, shape=SHAPE, timeouts=TIMEOUTS, engine_options=OPTIONS[kind])
        cleanup.append(child)
        return child

    old_ranks = ready([prefill_rank(r, OLD) for r in range(2)])
    service.place([_placed(ROOM_BEFORE, OLD)])  # routed before the switch
    service.expect(NEW)
    new_ranks = ready([prefill_rank(r, NEW) for r in range(2, 4)])
    service.relayout(NEW)
    service.place([_placed(ROOM_AFTER, NEW)])  # routed after
    prefill = [*old_ranks, *new_ranks]
    (decode,) = start_decode(kind, ParallelLayout(1), cleanup)
    writes: dict[int, tuple[int, int]] = {}
    for i, room in enumerate((ROOM_BEFORE, ROOM_AFTER)):
        placement = _fetch(service, room, 5)  # looked up after the switch, for both rooms
        src, dst = [2 + i, 5 + i], [10 + 2 * i, 11 + 2 * i]
        real, dummies = decode.start(service.host, service.port, room, dst, i, placement.dp_rank, 0,
                                     (placement.tp_size, placement.dp_size))
        assert (real, dummies) == SOURCES[room]
        for rank in (real, *dummies):  # every rank of the room's group computed its KV
            prefill[rank].call("start", room, [(src, 0)], (50 + i, -1.0))
        writes.update({dst[k]: (real, src[k]) for k in range(2)})
    for i, room in enumerate((ROOM_BEFORE, ROOM_AFTER)):
        assert wait_terminal(decode, room) == ("Success", None, (50 + i, -1.0))
    for room, (real, dummies) in SOURCES.items():
        assert [prefill[rank].result(room) for rank in (real, *dummies)] == [("Success", None)] * 2
    check_destination(decode, writes)
    for child in prefill:  # every sender back at idle
        counts = child.call("counts")
        assert counts["live_rooms"] == 0 and counts["inflight_handles"] == 0, counts
    IN_PROCESS_DECODE.clear()
