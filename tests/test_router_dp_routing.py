"""DP-aware routing (`--dp-routing router`) against mock workers: the attention-DP groups the router picks
for decode and prefill, by its own in-flight tokens and the workers' polled reports; a client's own
`data_parallel_rank` / `disagg_prefill_dp_rank` honoured and checked; `internal` sends nothing."""

from __future__ import annotations

import asyncio

import aiohttp
from router_mocks import Cluster, MockBehavior, cluster

from router.dp_routing import Charge, DpGroups


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 30))


async def _sizes_known(c: Cluster, size: int) -> None:
    await c.wait_until(lambda: all(w.dp.size == size for w in c.state.registry.all_workers()))


def _assert_no_charges(c: Cluster) -> None:
    for w in c.state.registry.all_workers():
        assert w.dp.own == [0] * w.dp.size and w.dp.own_requests == [0] * w.dp.size, w.describe()


def test_requests_go_to_the_dp_group_with_fewer_tokens_in_flight_on_decode_and_prefill() -> None:
    async def body() -> None:
        async with cluster(1, 1, dp_size=2) as c, aiohttp.ClientSession() as s:
            await _sizes_known(c, 2)
            for w in (*c.prefill, *c.decode):
                w.behavior = MockBehavior(delay_s=0.6)
            long = asyncio.ensure_future(s.post(c.router_url + "/generate",
                                                json={"input_ids": [5] * 3000, "max_new_tokens": 4}))
            await c.wait_until(lambda: c.decode[0].bodies and c.prefill[0].bodies)
            first = c.decode[0].bodies[0]
            shorts = [s.post(c.router_url + "/generate", json={"input_ids": [7] * 40, "max_new_tokens": 4})
                      for _ in range(4)]
            for r in await asyncio.gather(*shorts, long):
                assert r.status == 200
                r.release()
            decode_bodies, prefill_bodies = c.decode[0].bodies, c.prefill[0].bodies
            # One body for both sides: decode's group in data_parallel_rank, prefill's in disagg_prefill_dp_rank.
            by_rid = {b["rid"]: b for b in prefill_bodies}
            assert all(by_rid[d["rid"]] == d for d in decode_bodies)
            long_d, long_p = first["data_parallel_rank"], first["disagg_prefill_dp_rank"]
            for b in decode_bodies[1:]:  # the 3000-token prompt outweighs four short ones on both instances
                assert (b["data_parallel_rank"], b["disagg_prefill_dp_rank"]) == (1 - long_d, 1 - long_p), b
            _assert_no_charges(c)
            c.assert_idle()

    run(body())


def test_load_the_worker_reports_beyond_the_routers_own_steers_the_choice() -> None:
    async def body() -> None:
        async with cluster(1, 1, dp_size=2) as c, aiohttp.ClientSession() as s:
            await _sizes_known(c, 2)
            # Another router (or a client talking to the worker directly) filled decode group 0, prefill group 1.
            c.decode[0].dp_report = [{"dp_rank": 0, "tokens_in_flight": 50_000}, {"dp_rank": 1, "tokens_in_flight": 0}]
            c.prefill[0].dp_report = [{"dp_rank": 0, "tokens_in_flight": 0}, {"dp_rank": 1, "tokens_in_flight": 9000}]
            polls = c.decode[0].load_polls
            await c.wait_until(lambda: c.decode[0].load_polls > polls + 1)
            for _ in range(6):
                async with s.post(c.router_url + "/generate", json={"input_ids": [3] * 64}) as r:
                    assert r.status == 200
            assert {b["data_parallel_rank"] for b in c.decode[0].bodies} == {1}
            assert {b["disagg_prefill_dp_rank"] for b in c.decode[0].bodies} == {0}
            info = await (await s.get(c.router_url + "/workers")).json()
            decode_info = next(w for w in info["workers"] if w["role"] == "decode")
            assert decode_info["dp_size"] == 2 and decode_info["dp_groups"][0]["reported_tokens"] == 50_000
            _assert_no_charges(c)

    run(body())


def test_a_dp_rank_the_client_names_is_honoured_and_one_out_of_range_is_a_400_naming_it() -> None:
    async def body() -> None:
        async with cluster(1, 1, dp_size=2) as c, aiohttp.ClientSession() as s:
            await _sizes_known(c, 2)
            ask = {"input_ids": [3] * 64, "data_parallel_rank": 1, "disagg_prefill_dp_rank": 0}
            for _ in range(3):
                async with s.post(c.router_url + "/generate", json=ask) as r:
                    assert r.status == 200
            assert [(b["data_parallel_rank"], b["disagg_prefill_dp_rank"]) for b in c.decode[0].bodies] == [(1, 0)] * 3
            for field, value in (("data_parallel_rank", 2), ("routed_dp_rank", 7), ("disagg_prefill_dp_rank", 2),
                                 ("data_parallel_rank", -1), ("disagg_prefill_dp_rank", "0")):
                async with s.post(c.router_url + "/generate", json={"input_ids": [3] * 64, field: value}) as r:
                    error = (await r.json())["error"]
                    assert r.status == 400 and error["param"] == field and field in error["message"], error
            assert len(c.decode[0].bodies) == 3  # refused before any worker saw them
            _assert_no_charges(c)
            c.assert_idle()

    run(body())


def test_internal_dp_routing_leaves_the_groups_to_the_instances() -> None:
    async def body() -> None:
        async with cluster(1, 1, dp_size=2, dp_routing="internal") as c, aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(c.router_url + "/generate", json={"input_ids": [3] * 64}) as r:
                    assert r.status == 200
            body = c.decode[0].bodies[0]
            assert "data_parallel_rank" not in body and "disagg_prefill_dp_rank" not in body
            assert c.decode[0].load_polls == 0
            async with s.post(c.router_url + "/generate", json={"input_ids": [3] * 64, "data_parallel_rank": 1}) as r:
                assert r.status == 200  # passed through: the worker checks it against its own size
            assert c.decode[0].bodies[-1]["data_parallel_rank"] == 1

    run(body())


def test_a_worker_without_a_load_report_picks_its_own_groups() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:  # the mocks answer /get_load with 404
            await c.wait_until(lambda: c.decode[0].load_polls >= 1)
            async with s.post(c.router_url + "/generate", json={"input_ids": [3] * 64}) as r:
                assert r.status == 200
            assert "data_parallel_rank" not in c.decode[0].bodies[0]
            await asyncio.sleep(0.3)
            assert c.decode[0].load_polls == 1  # asked again only after a long pause

    run(body())


def test_a_late_report_of_the_routers_own_finished_requests_is_not_counted_as_someone_elses_load() -> None:
    groups = DpGroups()
    groups.resize(2)
    long = Charge(groups, 0, 3000)
    short = Charge(groups, 1, 40)
    long.release()  # finished; the worker's report, made a moment before, still shows it
    groups.update([{"dp_rank": 0, "tokens_in_flight": 3000}, {"dp_rank": 1, "tokens_in_flight": 40}], now=1.0)
    assert (groups.score(0), groups.score(1)) == (0, 40)
    assert groups.least_loaded() == 0
    # Load the router did not send (another router process, a direct client) does count.
    groups.update([{"dp_rank": 0, "tokens_in_flight": 500}, {"dp_rank": 1, "tokens_in_flight": 40}], now=2.0)
    for _ in range(5):  # older intervals' peaks age out
        groups.update([{"dp_rank": 0, "tokens_in_flight": 500}, {"dp_rank": 1, "tokens_in_flight": 40}], now=3.0)
    assert (groups.score(0), groups.score(1)) == (500, 40)
    # A worker restarted with another dp_size: charges of the old layout lapse instead of going negative.
    groups.resize(4)
    short.release()
    assert groups.own == [0, 0, 0, 0] and groups.own_requests == [0, 0, 0, 0]
