"""Requests that go wrong on one side of a pair, against mock workers over real HTTP: reused client ids,
answers that end without their tokens, and the other half of a half-failed pair being aborted."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from router_mocks import MockBehavior, MockWorker, cluster

GEN = {"text": "a prompt long enough to be disaggregated " * 4}


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 30))


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def _error_of(event: bytes) -> dict | None:
    doc = orjson.loads(event.removeprefix(b"data: ")) if event != b"data: [DONE]" else None
    return doc.get("error") if isinstance(doc, dict) else None


async def _rid_sent_to(worker: MockWorker, n: int = 1) -> str:
    """The rid of the n-th request `worker` received (waits for it)."""
    for _ in range(500):
        if len(worker.bodies) >= n:
            return worker.bodies[n - 1]["rid"]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{worker.role} received fewer than {n} requests")


def test_a_client_id_reused_by_a_second_request_neither_collides_with_nor_aborts_the_first() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            for w in (*c.prefill, *c.decode):
                w.behavior = MockBehavior(tokens=5, chunk_delay_s=0.05, honor_aborts=True)
            req = {**GEN, "stream": True, "rid": "dup"}
            headers = {"X-Request-ID": "dup"}
            first = await s.post(c.router_url + "/generate", json=req, headers=headers)
            first_event = await first.content.readline()
            second = await s.post(c.router_url + "/generate", json=req, headers=headers)
            await second.content.readline()
            second.close()  # the second client leaves: the router aborts its request, and only its
            rid1, rid2 = await _rid_sent_to(c.decode[0], 1), await _rid_sent_to(c.decode[0], 2)
            await c.wait_until(lambda: rid2 in c.decode[0].aborts)
            rest = await first.read()
            assert first.status == 200 and first.headers["X-Request-ID"] == "dup"
            events = _events(first_event + rest)
            assert events[-1] == b"data: [DONE]" and not any(_error_of(e) for e in events)
            texts = [orjson.loads(e[6:]) for e in events[:-1]]
            assert [t["text"] for t in texts] == [f"t{i} " for i in range(5)]
            assert {t["meta_info"]["id"] for t in texts} == {"dup"}  # the client's id, echoed in the body
            assert rid1 != rid2 and "dup" not in (rid1, rid2)
            assert rid1 in c.decode[0].completed and rid1 not in c.decode[0].aborts
            await c.wait_until(lambda: c.state.stats.in_flight == 0)
            c.assert_idle()

    run(body())


def test_a_stream_that_ends_aborted_without_tokens_gets_an_error_event_and_prefill_is_aborted() -> None:
    aborted = [b'data: {"text":"","meta_info":{"id":"x","finish_reason":{"type":"abort"}}}\n\n', b"data: [DONE]\n\n"]

    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)  # still holding its room
            c.decode[0].behavior = MockBehavior(raw_stream=aborted)
            async with s.post(c.router_url + "/generate", json={**GEN, "stream": True}) as r:
                assert r.status == 200  # the head was out before the abort: the error is in-stream
                events = _events(await r.read())
            errors = [e for e in map(_error_of, events) if e]
            assert len(errors) == 1 and "aborted" in errors[0]["message"] and errors[0]["code"] == "request_failed"
            assert events[-1] == b"data: [DONE]"
            rid = await _rid_sent_to(c.prefill[0])
            await c.wait_until(lambda: rid in c.prefill[0].aborts and rid in c.prefill[0].disconnects)
            await c.wait_until(lambda: c.state.background_tasks == 0)
            c.assert_idle()

    run(body())


def test_a_chat_stream_that_reaches_done_without_any_output_is_an_error() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.decode[0].behavior = MockBehavior(raw_stream=[b"data: [DONE]\n\n"])
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi " * 50}], "stream": True}
            async with s.post(c.router_url + "/v1/chat/completions", json=chat) as r:
                events = _events(await r.read())
            assert _error_of(events[0]) is not None and "without any output" in _error_of(events[0])["message"]
            c.assert_idle()

    run(body())


def test_a_whole_answer_that_was_aborted_is_a_502_with_the_error_body_not_a_200() -> None:
    answers = [
        b'{"text": "", "meta_info": {"id": "x", "finish_reason": {"type": "abort"}}}',
        b'{"id": "cmpl-x", "choices": [{"index": 0, "text": "", "finish_reason": "abort"}]}',
        b'{"error": {"message": "rank failed", "type": "server_error", "code": null}}',
    ]

    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)
            for i, answer in enumerate(answers, 1):
                c.decode[0].behavior = MockBehavior(body=answer)
                async with s.post(c.router_url + "/generate", json=GEN, headers={"X-Request-ID": "mine"}) as r:
                    assert r.status == 502 and r.headers["X-Request-ID"] == "mine"
                    err = (await r.json())["error"]
                    assert err["code"] == "request_failed" and err["type"] == "upstream_error" and err["message"]
                rid = await _rid_sent_to(c.prefill[0], i)
                await c.wait_until(lambda: rid in c.prefill[0].aborts)  # noqa: B023 (awaited here)
            c.assert_idle()

    run(body())


def test_decode_answering_4xx_aborts_the_prefill_half() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)
            c.decode[0].behavior = MockBehavior(status=400, error_body=b'{"detail": "bad sampling params"}')
            async with s.post(c.router_url + "/generate", json=GEN) as r:
                assert r.status == 400 and (await r.json())["error"]["message"] == "bad sampling params"
            rid = await _rid_sent_to(c.prefill[0])
            await c.wait_until(lambda: rid in c.prefill[0].aborts and rid in c.prefill[0].disconnects)
            c.assert_idle()

    run(body())


def test_decode_sending_an_error_event_inside_its_200_aborts_the_prefill_half() -> None:
    error = b'data: {"error": {"message": "rank died", "type": "server_error", "code": "error"}}\n\n'

    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)
            c.decode[0].behavior = MockBehavior(raw_stream=[b'data: {"text": "t0"}\n\n', error, b"data: [DONE]\n\n"])
            async with s.post(c.router_url + "/generate", json={**GEN, "stream": True}) as r:
                events = _events(await r.read())
            # The worker's own error event reaches the client once, unchanged; no second one is added.
            assert [e for e in events if _error_of(e)] == [error.strip()]
            rid = await _rid_sent_to(c.prefill[0])
            await c.wait_until(lambda: rid in c.prefill[0].aborts)
            c.assert_idle()

    run(body())


def test_decode_cut_off_mid_stream_aborts_the_prefill_half() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)
            c.decode[0].behavior = MockBehavior(tokens=10, die_after=2)
            async with s.post(c.router_url + "/generate", json={**GEN, "stream": True}) as r:
                events = _events(await r.read())
            assert "failed mid-stream" in _error_of(events[-1])["message"]
            rid = await _rid_sent_to(c.prefill[0])
            await c.wait_until(lambda: rid in c.prefill[0].aborts and rid in c.prefill[0].disconnects)
            await c.wait_until(lambda: c.state.background_tasks == 0)
            c.assert_idle()

    run(body())


def test_a_client_leaving_mid_stream_aborts_a_prefill_that_is_still_running() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)
            c.decode[0].behavior = MockBehavior(tokens=100, chunk_delay_s=0.02)
            r = await s.post(c.router_url + "/generate", json={**GEN, "stream": True})
            await r.content.readline()
            r.close()
            rid = await _rid_sent_to(c.prefill[0])
            await c.wait_until(lambda: rid in c.prefill[0].aborts and rid in c.decode[0].aborts)
            await c.wait_until(lambda: c.state.stats.in_flight == 0)
            c.assert_idle()

    run(body())


def test_a_stream_that_times_out_midway_ends_with_an_error_event_and_aborts_both_halves() -> None:
    async def body() -> None:
        async with cluster(1, 1, request_timeout_s=0.4) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)
            c.decode[0].behavior = MockBehavior(tokens=100, chunk_delay_s=0.05)
            async with s.post(c.router_url + "/generate", json={**GEN, "stream": True}) as r:
                events = _events(await r.read())
            assert len(events) > 2 and "request timeout" in _error_of(events[-1])["message"]
            rid = await _rid_sent_to(c.decode[0])
            await c.wait_until(lambda: rid in c.decode[0].aborts and rid in c.prefill[0].aborts)
            w = c.state.registry.get(c.decode[0].url)
            assert w is not None and w.consecutive_failures == 0  # slow is not dead
            await c.wait_until(lambda: c.state.background_tasks == 0)
            c.assert_idle()

    run(body())
