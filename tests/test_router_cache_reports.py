"""The router's cache-aware prefill choice learns from the prefill instances' hit reports (`cached_tokens`
in their answers): through a real router and mock workers."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from router_mocks import cluster

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
