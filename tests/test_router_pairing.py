"""The router's request path against mock workers: PD fields, conditional disaggregation, streaming
passthrough, OpenAI SDK shapes, prefill errors and aborts."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
from router_mocks import MockBehavior, cluster

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "Tell me about MLA. " * 20}]}


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 30))


def test_pd_request_reaches_both_workers_with_the_same_room_and_prefill_address() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            async with s.post(c.router_url + "/v1/chat/completions", json=CHAT,
                              headers={"X-Request-ID": "req-42", "traceparent": "00-abc-def-01"}) as r:
                assert r.status == 200
                assert r.headers["X-Request-ID"] == "req-42"
            await c.wait_until(lambda: c.prefill[0].bodies)  # prefill runs beside decode, not before it
            p, d = c.prefill[0].bodies[0], c.decode[0].bodies[0]
            assert p == d
            assert p["bootstrap_host"] == "127.0.0.1" and p["bootstrap_port"] == 9000
            assert 0 <= p["bootstrap_room"] < 2**63
            assert p["rid"] != "req-42"  # workers know it by the router's own id; the client's is echoed
            assert p["messages"] == CHAT["messages"]
            c.assert_idle()

    run(body())


def test_rooms_differ_between_requests() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.post(c.router_url + "/generate", json={"text": "hello " * 40}) as r:
                    assert r.status == 200
            rooms = {b["bootstrap_room"] for b in c.decode[0].bodies}
            assert len(rooms) == 5

    run(body())


def test_short_prompt_goes_to_decode_alone_without_bootstrap_fields() -> None:
    async def body() -> None:
        async with cluster(1, 1, short_prompt_threshold=32) as c, aiohttp.ClientSession() as s:
            async with s.post(c.router_url + "/generate", json={"text": "hi", "rid": "mine"}) as r:
                assert r.status == 200
            async with s.post(c.router_url + "/generate", json={"input_ids": list(range(40))}) as r:
                assert r.status == 200
            await c.wait_until(lambda: c.prefill[0].bodies)
            await asyncio.sleep(0.05)
            assert len(c.prefill[0].bodies) == 1  # only the 40-token prompt was disaggregated
            short, long_ = c.decode[0].bodies
            assert short == {"text": "hi", "rid": short["rid"]} and short["rid"] != "mine"
            assert "bootstrap_room" in long_
            c.assert_idle()

    run(body())


def test_batch_generate_gets_one_room_and_one_rid_per_prompt() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            async with s.post(c.router_url + "/generate", json={"text": ["a b c", "d e f", "g"]},
                              headers={"X-Request-ID": "batch"}) as r:
                assert r.status == 200
                assert (await r.json())["meta_info"]["id"] == ["batch-0", "batch-1", "batch-2"]
            await c.wait_until(lambda: c.prefill[0].bodies)
            d = c.decode[0].bodies[0]
            assert d == c.prefill[0].bodies[0]
            base = d["rid"][0].removesuffix("-0")
            assert d["rid"] == [f"{base}-{i}" for i in range(3)] and base != "batch"
            assert d["bootstrap_host"] == ["127.0.0.1"] * 3 and d["bootstrap_port"] == [9000] * 3
            assert len(set(d["bootstrap_room"])) == 3

    run(body())


def test_client_set_bootstrap_fields_are_replaced_by_the_routers() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            req = {**CHAT, "bootstrap_room": 5, "bootstrap_host": "evil"}
            async with s.post(c.router_url + "/v1/chat/completions", json=req) as r:
                assert r.status == 200
            d = c.decode[0].bodies[0]
            assert d["bootstrap_host"] == "127.0.0.1" and d["bootstrap_room"] != 5

    run(body())


def test_streaming_passthrough_is_byte_exact() -> None:
    # Events split across writes and several in one write: the client must see exactly these bytes.
    pieces = [b"data: {\"text\": \"a\"}\n\n", b"data: {\"te", b"xt\": \"\xc3\xa9\"}\n\ndata: {\"text\": \"c\"}\n\n",
              b": keep-alive comment\n\n", b"data: [DONE]\n\n"]

    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.decode[0].behavior = MockBehavior(raw_stream=pieces, chunk_delay_s=0.01)
            got = []
            async with s.post(c.router_url + "/generate", json={"text": "x" * 100, "stream": True}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                async for chunk in r.content.iter_any():
                    got.append(chunk)
            assert b"".join(got) == b"".join(pieces)
            assert len(got) > 1  # it streamed: the bytes were not buffered into one answer
            c.assert_idle()

    run(body())


def test_openai_sdk_accepts_chat_and_completion_answers() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            client = openai.AsyncOpenAI(base_url=c.router_url + "/v1", api_key="unused", max_retries=0)
            chat = await client.chat.completions.create(model="mock-model", messages=CHAT["messages"],
                                                        max_tokens=3)
            assert chat.choices[0].message.content == "t0 t1 t2"
            assert chat.usage is not None and chat.usage.completion_tokens == 3
            comp = await client.completions.create(model="mock-model", prompt="Once upon a time", max_tokens=3)
            assert comp.choices[0].text == "t0 t1 t2"
            stream = await client.chat.completions.create(
                model="mock-model", messages=CHAT["messages"], stream=True, stream_options={"include_usage": True})
            deltas, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    deltas.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            assert "".join(deltas) == "t0 t1 t2 "
            assert usage is not None and usage.total_tokens == 8
            cstream = await client.completions.create(model="mock-model", prompt="Once", stream=True)
            assert [ch.choices[0].text async for ch in cstream] == ["t0 ", "t1 ", "t2 "]
            models = await client.models.list()
            assert [m.id for m in models.data] == ["mock-model"]
            await client.close()
            c.assert_idle()

    run(body())


def test_prefill_error_that_arrives_first_reaches_the_client_and_aborts_decode() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(status=400, error_body=b'{"error": {"message": "prompt too long",'
                                                 b' "type": "invalid_request_error", "code": 400}}')
            c.decode[0].behavior = MockBehavior(delay_s=5.0)  # waits for KV that will never come
            async with s.post(c.router_url + "/v1/chat/completions", json={**CHAT, "rid": "r1"}) as r:
                assert r.status == 400
                assert (await r.json())["error"]["message"] == "prompt too long"
            rid = c.decode[0].bodies[0]["rid"]
            await c.wait_until(lambda: rid in c.decode[0].aborts and rid in c.decode[0].disconnects)
            c.assert_idle()

    run(body())


def test_client_disconnect_aborts_both_workers() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.prefill[0].behavior = MockBehavior(delay_s=5.0)  # still prefilling when the client leaves
            c.decode[0].behavior = MockBehavior(delay_s=5.0)
            req = asyncio.ensure_future(s.post(c.router_url + "/generate",
                                               json={"text": "x" * 100, "stream": True, "rid": "gone"}))
            await c.wait_until(lambda: c.decode[0].bodies and c.prefill[0].bodies)
            await asyncio.sleep(0.1)
            assert not req.done()
            req.cancel()  # the client goes away before the first token
            rid = c.decode[0].bodies[0]["rid"]
            await c.wait_until(lambda: rid in c.decode[0].aborts and rid in c.prefill[0].aborts)
            await c.wait_until(lambda: rid in c.decode[0].disconnects and rid in c.prefill[0].disconnects)
            await c.wait_until(lambda: c.state.stats.in_flight == 0)
            c.assert_idle()

    run(body())


def test_client_disconnect_mid_stream_aborts_decode() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.decode[0].behavior = MockBehavior(tokens=100, chunk_delay_s=0.02)
            r = await s.post(c.router_url + "/generate", json={"text": "x" * 100, "stream": True, "rid": "mid"})
            assert r.status == 200
            await r.content.readline()  # first event arrived
            r.close()
            rid = c.decode[0].bodies[0]["rid"]
            await c.wait_until(lambda: rid in c.decode[0].aborts and rid in c.decode[0].disconnects)
            await c.wait_until(lambda: c.state.stats.in_flight == 0)
            c.assert_idle()

    run(body())


def test_decode_error_status_is_passed_on_in_openai_form() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.decode[0].behavior = MockBehavior(status=422, error_body=b'{"detail": "bad sampling params"}')
            async with s.post(c.router_url + "/v1/completions", json={"prompt": "hi " * 30}) as r:
                assert r.status == 422
                err = (await r.json())["error"]
                assert err["message"] == "bad sampling params" and err["type"] == "invalid_request_error"
            c.assert_idle()

    run(body())


def test_request_timeout_answers_504_and_aborts_both() -> None:
    async def body() -> None:
        async with cluster(1, 1, request_timeout_s=0.3) as c, aiohttp.ClientSession() as s:
            c.decode[0].behavior = MockBehavior(delay_s=5.0)
            async with s.post(c.router_url + "/generate", json={"text": "x" * 100, "rid": "slow"}) as r:
                assert r.status == 504
                assert (await r.json())["error"]["code"] == "timeout"
            await c.wait_until(lambda: c.decode[0].bodies[0]["rid"] in c.decode[0].disconnects)
            c.assert_idle()

    run(body())


def test_malformed_and_mistyped_bodies_get_400_with_an_openai_error() -> None:
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (orjson.dumps({"model": "m", "messages": "hello"}), "messages"),
        (orjson.dumps({**CHAT, "stream": "yes"}), "stream"),
        (orjson.dumps({**CHAT, "max_tokens": -1}), "max_tokens"),
        (orjson.dumps({**CHAT, "max_tokens": True}), "max_tokens"),
        (orjson.dumps({"model": "m", "messages": [{"content": "no role"}]}), "role"),
    ]

    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            for raw, fragment in cases:
                async with s.post(c.router_url + "/v1/chat/completions", data=raw,
                                  headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400, raw
                    err = (await r.json())["error"]
                    assert fragment in err["message"] and err["type"] == "invalid_request_error"
            for raw in (orjson.dumps({"prompt": 5}), orjson.dumps({"prompt": [1, "a"]})):
                async with s.post(c.router_url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400
            for raw in (orjson.dumps({}), orjson.dumps({"input_ids": [1, 2**40]}),
                        orjson.dumps({"text": "a", "rid": ["x"]}),  # one prompt, a list of ids
                        orjson.dumps({"text": ["a", "b"], "rid": ["x"]})):  # fewer ids than prompts
                async with s.post(c.router_url + "/generate", data=raw, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400
            assert not c.decode[0].bodies and not c.prefill[0].bodies
            c.assert_idle()

    run(body())


def test_oversized_body_gets_413() -> None:
    async def body() -> None:
        async with cluster(1, 1, max_body_bytes=1000) as c, aiohttp.ClientSession() as s:
            async with s.post(c.router_url + "/generate", json={"text": "x" * 2000}) as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "body_too_large"

            async def chunked():  # no Content-Length: the limit must hold while reading
                for _ in range(20):
                    yield b" " * 100

            async with s.post(c.router_url + "/generate", data=chunked()) as r:
                assert r.status == 413
            assert not c.decode[0].bodies
            c.assert_idle()

    run(body())


def test_decode_failing_mid_stream_ends_the_stream_with_an_error_event() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            c.decode[0].behavior = MockBehavior(tokens=10, die_after=3)  # decode dies mid-answer
            async with s.post(c.router_url + "/generate", json={"text": "x" * 100, "stream": True}) as r:
                assert r.status == 200
                text = (await r.read()).decode()
            events = [line for line in text.split("\n\n") if line]
            assert len(events) == 4 and events[2].startswith('data: {"text":"t2 "')
            last = events[-1]
            assert last.startswith("data: ") and "failed mid-stream" in orjson.loads(last[6:])["error"]["message"]
            await c.wait_until(lambda: c.state.stats.in_flight == 0)
            c.assert_idle()

    run(body())


def test_http10_client_gets_the_stream_unframed() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            host, port = c.router_url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            payload = orjson.dumps({"text": "x" * 100, "stream": True})
            writer.write(b"POST /generate HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            raw = await reader.read()  # HTTP/1.0: the router closes the connection at the end
            writer.close()
            head, _, body_bytes = raw.partition(b"\r\n\r\n")
            assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
            assert body_bytes.startswith(b"data: {") and body_bytes.endswith(b"data: [DONE]\n\n")

    run(body())
