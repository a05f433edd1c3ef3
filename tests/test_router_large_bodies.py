"""A huge prompt does not stall the router for the other requests it serves (its parsing and the
cache-aware prefix hashing stay off the event loop or bounded)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
from router_mocks import cluster

from router.errors import BadRequest
from router.inbound import KEY_CHARS, KEY_IDS, Kind, parse_inbound
from router.policies import CacheAwarePolicy


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize(("kind", "doc", "tokens"), [
    (Kind.GENERATE, {"text": "hello world " * 1_000_000}, 3_000_000),
    (Kind.COMPLETION, {"prompt": ["hello world " * 1_000_000]}, 3_000_000),
    (Kind.CHAT, {"messages": [{"role": "user", "content": "hello world " * 1_000_000}]}, 3_000_002),
    (Kind.GENERATE, {"input_ids": list(range(1_000_000))}, 1_000_000),
])
def test_the_routing_key_of_a_huge_prompt_is_bounded_so_prefix_hashing_stays_cheap(
    kind: Kind, doc: dict, tokens: int
) -> None:
    # Cache-aware routing hashes the key block by block on the event loop: 150 ms for 20 MB unbounded.
    inbound = parse_inbound(orjson.dumps(doc), kind)
    bound = KEY_CHARS if isinstance(inbound.prompt_key, str) else 4 * KEY_IDS
    assert len(inbound.prompt_key) <= bound
    assert inbound.prompt_tokens == tokens  # the length estimate still counts the whole prompt
    policy = CacheAwarePolicy()
    assert len(policy._block_keys(inbound.prompt_key)) <= bound // 64 + 1


def test_a_bad_token_id_far_into_a_huge_prompt_is_still_refused() -> None:
    with pytest.raises(BadRequest):
        parse_inbound(orjson.dumps({"input_ids": [*range(500_000), "x"]}), Kind.GENERATE)


def test_a_20_mb_prompt_does_not_delay_a_concurrent_small_request_by_seconds() -> None:
    big = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello world, " * 1_600_000}]})
    assert len(big) > 20_000_000

    async def body() -> None:
        async with cluster(1, 1, prefill_policy="cache_aware") as c, aiohttp.ClientSession() as s:
            for w in (*c.prefill, *c.decode):
                w.keep_bodies = False  # the mocks would hold on to 20 MB bodies
            small = {"text": "a short prompt, disaggregated all the same " * 3}

            async def big_request() -> int:
                async with s.post(c.router_url + "/v1/chat/completions", data=big,
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    return r.status

            async def small_requests(stop: asyncio.Event) -> list[float]:
                took = []
                while not stop.is_set():
                    t = time.perf_counter()
                    async with s.post(c.router_url + "/generate", json=small) as r:
                        assert r.status == 200
                        await r.read()
                    took.append(time.perf_counter() - t)
                    await asyncio.sleep(0.005)
                return took

            stop = asyncio.Event()
            smalls = asyncio.ensure_future(small_requests(stop))
            await asyncio.sleep(0.05)
            assert await big_request() == 200
            stop.set()
            took = await smalls
            print(f"small requests during the big one: {len(took)}, slowest {max(took) * 1e3:.0f} ms")
            assert max(took) < 1.0, max(took)
            c.assert_idle()

    run(body())
