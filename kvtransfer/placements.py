"""Per-room placements of an elastic prefill instance: where each room runs, fixed when the room started.

A prefill instance that can change its layout live (elastic EP) cannot let decode ranks derive a room's
prefill group from the layout they looked up: that layout may have changed between the moment the prefill's
rank 0 routed the room and the moment a decode rank maps it (in either order). So rank 0 reports every room it
routes (`RoomPlacement`: the DP group and the layout in force that turn), the instance's bootstrap service
keeps them here, and decode asks per room (`GET /v1/rooms/{room}`, answered as soon as the room is placed: the
router sends the request to both instances at once, so decode may ask first). The answer is the room's for its
whole life: rooms begun before a switch keep their old sources (retained ranks, or leaving ranks that drain
before they go), rooms begun after use the new layout.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import aiohttp

from kvtransfer.messages import RoomPlacement, decode_json
from kvtransfer.state import KVBootstrapError, KVProtocolError

# How long a placement is kept: decode asks when the request reaches it, i.e. about when the prefill routes
# it. A room decode asks about later than this (a decode queue of minutes) is looked up in vain: a 502.
PLACEMENT_TTL_S = 120.0
MAX_WAIT_S = 60.0  # the longest a lookup may wait for its room to be placed


class RoomPlacements:
    """The placements of recent rooms, and lookups waiting for rooms not placed yet. Single-threaded: it lives
    on the bootstrap service's event loop (`BootstrapService.place` hands placements over to it)."""

    def __init__(self, ttl_s: float = PLACEMENT_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._rooms: OrderedDict[int, tuple[float, RoomPlacement]] = OrderedDict()  # oldest first
        self._waiters: dict[int, list[asyncio.Future[RoomPlacement]]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def add(self, placements: list[RoomPlacement]) -> None:
        now = time.monotonic()
        for placement in placements:
            self._rooms[placement.room] = (now + self.ttl_s, placement)
            self._rooms.move_to_end(placement.room)
            for waiter in self._waiters.pop(placement.room, []):
                if not waiter.done():
                    waiter.set_result(placement)
        while self._rooms and next(iter(self._rooms.values()))[0] < now:
            self._rooms.popitem(last=False)

    async def get(self, room: int, wait_s: float) -> RoomPlacement | None:
        """The room's placement, waiting up to `wait_s` for it to be placed; None if it was not."""
        entry = self._rooms.get(room)
        if entry is not None:
            return entry[1]
        waiter: asyncio.Future[RoomPlacement] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(room, []).append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), min(wait_s, MAX_WAIT_S))
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(room, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[room]

    @property
    def num_waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())


async def fetch_placement(session: aiohttp.ClientSession, host: str, port: int, room: int,
                          wait_s: float) -> RoomPlacement:
    """The placement of `room` at the prefill instance host:port, waiting up to `wait_s` for the instance to
    place it; `KVBootstrapError` naming why not (unreachable, never placed, a malformed answer)."""
    url = f"http://{host}:{port}/v1/rooms/{room}"
    try:
        async with session.get(url, params={"wait_s": f"{wait_s:g}"},
                               timeout=aiohttp.ClientTimeout(total=wait_s + 5.0)) as response:
            body = await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise KVBootstrapError(f"bootstrap service at {host}:{port} is unreachable: {type(exc).__name__}: "
                               f"{exc}") from None
    if status != 200:
        raise KVBootstrapError(f"GET {url} failed with {status}: {body[:200].decode(errors='replace')}")
    try:
        placement = decode_json(body, RoomPlacement)
    except KVProtocolError as exc:
        raise KVBootstrapError(f"bootstrap service at {host}:{port} answered nonsense: {exc}") from None
    if placement.room != room:
        raise KVBootstrapError(f"bootstrap service at {host}:{port} answered room {placement.room} for {room}")
    return placement
