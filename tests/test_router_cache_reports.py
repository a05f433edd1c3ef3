"""The router's cache-aware prefill choice learns from the prefill instances' hit reports (`cached_tokens`
in their answers), and its cache-aware decode choice from decode-side reuse reports (the decode answer's
`X-Tandem-KV-Reused-Tokens` header): through a real router and mock workers."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from router_mocks import cluster

from kvtransfer.protocol import KV_REUSED_HEADER
from router.policies import CacheAwarePolicy


def _prefill_answer(cached: int, prompt: int) -> bytes:
    return orjson.dumps({"text": "t", "output_ids": [1], "meta_info": {
        "id": "x", "prompt_tokens": prompt, "completion_tokens": 1, "cached_tokens": cached}})


def test_a_prefill_answer_that_reports_a_miss_on_an_affinity_choice_makes_the_router_forget() -> None:
    async def body() -> None:
        async with cluster(2, 1, prefill_policy="cache_aware") as c, aiohttp.ClientSession() as s:
            policy = c.state.prefill_policy
            assert isinstance(policy, CacheAwarePolicy)
            prompt = {"text": "a long shared system prompt " * 20, "sampling_params": {"max_new_tokens": 2}}
            for w in c.prefill:
                w.behavior.body = _prefill_answer(cached=0, prompt=140)

            async def send() -> None:
                async with s.post(c.router_url + "/generate", json=prompt) as r:
                    assert r.status == 200, await r.text()
                    await r.read()

            await send()  # no affinity yet: nothing expected, nothing learnt from its 0 hits
            assert policy.forgotten == 0
            for w in c.prefill:
                w.behavior.body = _prefill_answer(cached=128, prompt=140)
            await send()  # affinity, and a hit: confirmed
            assert policy.forgotten == 0
            for w in c.prefill:
                w.behavior.body = _prefill_answer(cached=0, prompt=140)
            await send()  # affinity, and a miss: the worker evicted it
            await c.wait_until(lambda: policy.forgotten == 1)
            c.assert_idle()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_conversation_s_turns_go_to_the_decode_instance_holding_its_kv_until_it_reports_a_miss_or_is_busy(
) -> None:
    async def body() -> None:
        async with cluster(1, 2, decode_policy="cache_aware", cache_balance_abs=2) as c, \
                aiohttp.ClientSession() as s:
            policy = c.state.decode_policy
            assert isinstance(policy, CacheAwarePolicy)
            history = "a long shared system prompt " * 20

            async def turn(message: str, stream: bool = False) -> str:
                nonlocal history
                history += message
                req = {"text": history, "stream": stream, "sampling_params": {"max_new_tokens": 2}}
                async with s.post(c.router_url + "/generate", json=req) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                return next(w.url for w in c.decode if w.bodies and w.bodies[-1]["text"] == history)

            for w in c.decode:
                w.behavior.headers = {KV_REUSED_HEADER: "128/150"}
            first = await turn(" user: hello")
            # Each next turn starts with the last one: it goes where the conversation's KV is, and the hit
            # report confirms it (streamed answers report in their head too).
            assert [await turn(f" user: turn {i}", stream=i % 2 == 1) for i in range(4)] == [first] * 4
            assert policy.forgotten == 0
            holder = c.worker(first)
            holder.behavior.headers = {KV_REUSED_HEADER: "0/160"}  # evicted there
            assert await turn(" user: again") == first
            await c.wait_until(lambda: policy.forgotten == 1)
            # Forgotten: the next turn goes to the least loaded instance, whichever that is, and is learnt anew.
            holder.behavior.headers = {KV_REUSED_HEADER: "128/170"}
            chosen = await turn(" user: and again")
            assert await turn(" user: once more") == chosen
            # Unless the holder is overloaded: cache_balance_abs (2) more requests in flight than another.
            holder = c.state.registry.get(chosen)
            assert holder is not None
            holder.in_flight += 2  # as if two long answers were streaming from it
            try:
                assert await turn(" user: while it is busy") != chosen
            finally:
                holder.in_flight -= 2
            c.assert_idle()

    asyncio.run(asyncio.wait_for(body(), 60))
