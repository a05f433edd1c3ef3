"""The router's own HTTP/1.1 server, spoken to over raw sockets: keep-alive and pipelining, chunked
bodies, `Expect: 100-continue`, and clear refusals of what it cannot serve."""

from __future__ import annotations

import asyncio

import orjson
from router_mocks import cluster


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 30))


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length or chunked response: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    low = head.lower()
    if b"transfer-encoding: chunked" in low:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return head, body
            body += (await reader.readexactly(size + 2))[:-2]
    n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(n)


def _post(path: bytes, doc: object, extra: bytes = b"") -> bytes:
    body = orjson.dumps(doc)
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_pipelined_requests_on_one_connection_are_answered_in_order() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(c.router_url.rsplit(":", 1)[1]))
            # Three requests in one write: the second streams, the third must wait for it to end.
            writer.write(_post(b"/generate", {"text": "a" * 100, "rid": "one"})
                         + _post(b"/generate", {"text": "b" * 100, "rid": "two", "stream": True})
                         + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head1, body1 = await _read_response(reader)
            head2, body2 = await _read_response(reader)
            head3, body3 = await _read_response(reader)
            writer.close()
            assert b" 200 " in head1 and orjson.loads(body1)["meta_info"]["id"] == "one"
            assert b" 200 " in head2 and body2.endswith(b"data: [DONE]\n\n")
            assert b" 200 " in head3 and orjson.loads(body3)["status"] == "ok"
            assert [b["rid"] for b in c.decode[0].bodies] == ["one", "two"]
            await c.wait_until(lambda: c.state.stats.in_flight == 0)
            c.assert_idle()

    run(body())


def test_chunked_body_after_expect_100_continue_is_served() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(c.router_url.rsplit(":", 1)[1]))
            payload = orjson.dumps({"text": "x" * 200, "rid": "chunky"})
            writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            for i in range(0, len(payload), 50):  # several chunks, one with an extension
                piece = payload[i : i + 50]
                writer.write(b"%x;ext=1\r\n%b\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
            head, answer = await _read_response(reader)
            writer.close()
            assert b" 200 " in head, head
            assert orjson.loads(answer)["meta_info"]["id"] == "chunky"
            assert c.decode[0].bodies[0]["text"] == "x" * 200

    run(body())


def test_unparsable_requests_get_an_error_and_the_connection_closes() -> None:
    async def body() -> None:
        async with cluster(1, 1, max_body_bytes=1000) as c:
            port = int(c.router_url.rsplit(":", 1)[1])
            cases = [
                (b"NONSENSE\r\n\r\n", 400),
                (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70000, 431),
                (b"POST /generate HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", 400),
                (b"POST /generate HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
                (b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
                # Over the limit with Expect: refused before the client sends the body.
                (b"POST /generate HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n", 413),
            ]
            for raw, status in cases:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw)
                head, answer = await _read_response(reader)
                assert head.startswith(b"HTTP/1.1 %d " % status), (raw[:40], head)
                assert b"connection: close" in head.lower()
                assert orjson.loads(answer)["error"]["message"]
                assert await reader.read() == b""  # closed by the router
                writer.close()
            assert not c.decode[0].bodies
            assert c.state.stats.in_flight == 0

    run(body())


def test_unknown_route_and_wrong_method_get_a_json_404() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(c.router_url.rsplit(":", 1)[1]))
            writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\nGET /generate HTTP/1.1\r\nHost: x\r\n\r\n")
            for path in (b"/nowhere", b"/generate"):
                head, answer = await _read_response(reader)
                assert b" 404 " in head
                assert orjson.loads(answer)["error"]["message"] == f"no route GET {path.decode()}"
            writer.close()

    run(body())
