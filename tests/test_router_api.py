"""The router's side of issue 21 against mock workers: `n` > 1 and list prompts fan out into one worker
request per choice (SGLang's batch fields, the same on both sides of the pair), `GET /v1/models/{id}`, and
bodies that are not JSON."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from router_mocks import cluster

LONG = "Tell me about MLA. " * 20  # long enough to be disaggregated


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 30))


def test_n_and_list_prompts_send_one_rid_and_room_per_choice_to_both_workers() -> None:
    cases = [
        ("/v1/completions", {"prompt": [LONG, LONG + "!"], "n": 2, "max_tokens": 2}, 4),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "n": 3}, 3),
        ("/generate", {"text": LONG, "sampling_params": {"n": 2}}, 2),
    ]

    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            for i, (path, doc, count) in enumerate(cases):
                async with s.post(c.router_url + path, json=doc, headers={"X-Request-ID": f"client-{i}"}) as r:
                    assert r.status == 200, await r.text()
                    assert r.headers["X-Request-ID"] == f"client-{i}"
                await c.wait_until(lambda i=i: len(c.prefill[0].bodies) > i)
                p, d = c.prefill[0].bodies[i], c.decode[0].bodies[i]
                assert p == d
                assert len(p["rid"]) == count and len(set(p["rid"])) == count
                assert len(p["bootstrap_room"]) == count and len(set(p["bootstrap_room"])) == count
                assert p["bootstrap_host"] == ["127.0.0.1"] * count
            c.assert_idle()

    run(body())


def test_a_single_choice_stays_a_single_request() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            async with s.post(c.router_url + "/v1/completions", json={"prompt": LONG, "n": 1}) as r:
                assert r.status == 200
            await c.wait_until(lambda: c.prefill[0].bodies)
            assert isinstance(c.decode[0].bodies[0]["rid"], str)
            assert isinstance(c.decode[0].bodies[0]["bootstrap_room"], int)

    run(body())


def test_models_by_id_come_from_a_worker() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            async with s.get(c.router_url + "/v1/models/mock-model") as r:
                assert r.status == 200 and (await r.json())["id"] == "mock-model"
            async with s.get(c.router_url + "/v1/models/other") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"

    run(body())


def test_a_body_labelled_as_a_form_is_a_415_and_reaches_no_worker() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            raw = orjson.dumps({"prompt": LONG})
            for content_type in ("application/x-www-form-urlencoded", "text/plain"):
                async with s.post(c.router_url + "/v1/completions", data=raw,
                                  headers={"Content-Type": content_type}) as r:
                    assert r.status == 415
                    assert (await r.json())["error"]["code"] == "unsupported_media_type"
            async with s.post(c.router_url + "/v1/completions", data=raw,
                              headers={"Content-Type": "application/json; charset=utf-8"}) as r:
                assert r.status == 200
            assert len(c.decode[0].bodies) == 1

    run(body())
