"""Elastic EP's pieces without processes: the expert moves between two rank counts (every new slot gets its
expert from a rank that held it, a rank that stays keeps what it can locally), the scale messages' codec, and
``POST /scale_elastic_ep``'s answers for a scaler that succeeds, fails or is busy."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.eplb.policy import rebalance_experts, static_placement
from engine.eplb.rebalance import plan_moves
from engine.runtime.scaling import ScaleError, ScaleResult
from engine.server.elastic import ElasticLayout, scale_handler
from engine.server.messages import (
    MessageError,
    ScaleInstance,
    ScaleReport,
    decode_from_ranks,
    decode_to_ranks,
    encode,
)


def _apply(old: list[int], new: list[int], old_ranks: int, new_ranks: int) -> tuple[list[list[int]], int]:
    """Runs ``plan_moves`` on per-rank lists of the experts each slot holds (what ``move_layer`` does to the
    weights): returns each new rank's slots and how many moves crossed ranks."""
    old_per, new_per = len(old) // old_ranks, len(new) // new_ranks
    held = [old[r * old_per:(r + 1) * old_per] for r in range(old_ranks)]
    fresh = [[-1] * new_per for _ in range(new_ranks)]
    crossed = 0
    for move in plan_moves(old, new, old_ranks, new_ranks):
        src_rank, dst_rank = move.src // old_per, move.dst // new_per
        crossed += src_rank != dst_rank
        fresh[dst_rank][move.dst - dst_rank * new_per] = held[src_rank][move.src - src_rank * old_per]
    return fresh, crossed


@settings(max_examples=80, deadline=None)
@given(experts=st.sampled_from([4, 8, 14]), redundant=st.sampled_from([0, 2, 4]),
       sizes=st.sampled_from([(1, 2), (2, 4), (4, 2), (2, 1), (2, 8), (8, 2), (4, 8)]),
       skew=st.floats(0.0, 2.0), seed=st.integers(0, 100))
def test_every_new_slot_gets_its_expert_from_a_rank_that_held_it(experts: int, redundant: int,
                                                                   sizes: tuple[int, int], skew: float,
                                                                   seed: int) -> None:
    old_ranks, new_ranks = sizes
    physical = experts + redundant
    if physical % old_ranks or physical % new_ranks:
        return
    gen = torch.Generator().manual_seed(seed)
    load = (1.0 / torch.arange(1, experts + 1).double() ** skew)[torch.randperm(experts, generator=gen)]
    old = rebalance_experts(load.unsqueeze(0) * 1000, physical, old_ranks).phy2log[0].tolist()
    new = rebalance_experts(load.flip(0).unsqueeze(0) * 1000, physical, new_ranks).phy2log[0].tolist()
    fresh, crossed = _apply(old, new, old_ranks, new_ranks)
    per = physical // new_ranks
    assert fresh == [new[r * per:(r + 1) * per] for r in range(new_ranks)]
    # Only experts a rank did not hold cross ranks: a rank that stays copies its own locally.
    old_per = physical // old_ranks
    needed = sum(1 for r in range(new_ranks) for e in new[r * per:(r + 1) * per]
                 if r >= old_ranks or e not in old[r * old_per:(r + 1) * old_per])
    assert crossed == needed


def test_growing_the_static_layout_sends_each_new_rank_only_its_own_experts() -> None:
    old = static_placement(1, 8, 8).phy2log[0].tolist()
    moves = plan_moves(old, old, 2, 4)
    to_new_ranks = sorted(m.dst for m in moves if m.dst // 2 >= 2)
    assert to_new_ranks == [4, 5, 6, 7]  # ranks 2 and 3 receive slots 4..7 and nothing else
    assert {m.src // 4 for m in moves if m.dst // 2 >= 2} == {1}  # from rank 1, which held experts 4..7


def test_scale_messages_round_trip_and_keep_their_direction() -> None:
    command = ScaleInstance(epoch=3, tp_size=4, dp_size=4, rendezvous="file:///tmp/a", rollback="file:///tmp/b",
                            join_timeout_s=10.0)
    report = ScaleReport(epoch=3, rank=0, phase="switched", tp_size=4, dp_size=4, drain_s=0.5, drained_requests=2,
                         pause_s=0.1, experts_moved=12)
    assert decode_to_ranks(encode(command)) == command
    assert decode_from_ranks(encode(report)) == report
    with pytest.raises(MessageError, match="unexpected message kind"):
        decode_to_ranks(encode(report))
    with pytest.raises(MessageError, match="unexpected message kind"):
        decode_from_ranks(encode(command))


class StubScaler:
    """Answers like ``ElasticScaler.scale`` without ranks."""

    def __init__(self, outcome: ScaleResult | ScaleError) -> None:
        self.outcome, self.asked = outcome, []

    async def scale(self, new_dp: int) -> ScaleResult:
        self.asked.append(new_dp)
        if isinstance(self.outcome, ScaleError):
            raise self.outcome
        return self.outcome


async def _post(scaler: Any, body: dict) -> tuple[int, dict]:
    app = web.Application()
    app.router.add_post("/scale_elastic_ep", scale_handler(lambda: ElasticLayout(2, 2, 8, 4), scaler))
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/scale_elastic_ep", json=body)
        return resp.status, await resp.json()


@pytest.mark.parametrize(("outcome", "status", "expect"), [
    (ScaleResult(4, 4, 2.5, 2.0, 0.0, 0, 0.1, 12), 200, {"success": True, "data_parallel_size": 4, "tp_size": 4,
                                                          "experts_moved": 12, "pause_s": 0.1}),
    (ScaleError("the new ranks did not join; rolled back to data_parallel_size 2", 503, "scale_rolled_back"), 503,
     {"code": "scale_rolled_back"}),
    (ScaleError("a scale of this instance is already running", 409, "scale_in_progress"), 409,
     {"code": "scale_in_progress"}),
])
def test_scale_answers_carry_the_scalers_result_or_its_error(outcome: Any, status: int, expect: dict) -> None:
    scaler = StubScaler(outcome)
    got_status, got = asyncio.run(_post(scaler, {"new_data_parallel_size": 4}))
    assert got_status == status and scaler.asked == [4]
    body = got if status == 200 else got["error"]
    assert {k: body[k] for k in expect} == expect


def test_sizes_the_model_cannot_take_never_reach_the_scaler() -> None:
    scaler = StubScaler(ScaleResult(1, 1, 0, 0, 0, 0, 0, 0))
    status, got = asyncio.run(_post(scaler, {"new_data_parallel_size": 1}))
    assert status == 400 and "elastic EP keeps at least 2 ranks" in got["error"]["message"]
    status, got = asyncio.run(_post(scaler, {"new_data_parallel_size": 8}))
    assert status == 400 and "8 + 4 redundant experts do not split evenly over 8 ranks" in got["error"]["message"]
    assert scaler.asked == []
