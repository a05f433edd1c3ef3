"""The router's own HTTP/1.1 server, spoken to over raw sockets: keep-alive and pipelining, chunked
bodies, `Expect: 100-continue`, and clear refusals of what it cannot serve."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
from router_mocks import Cluster, cluster

from router import RouterConfig, WorkerSpec
from router.app import RouterApp
from router.config import Role


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
            assert [b["text"][0] for b in c.decode[0].bodies] == ["a", "b"]
            assert len({b["rid"] for b in c.decode[0].bodies} | {"one", "two"}) == 4  # the router's own ids
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


def test_unknown_route_gets_a_json_404_and_a_wrong_method_a_json_405() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(c))
            writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\nGET /generate HTTP/1.1\r\nHost: x\r\n\r\n")
            head, answer = await _read_response(reader)
            assert b" 404 " in head
            assert orjson.loads(answer)["error"]["message"] == "no route GET /nowhere"
            head, answer = await _read_response(reader)
            assert head.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: POST\r\n" in head
            assert orjson.loads(answer)["error"]["code"] == "method_not_allowed"
            writer.close()

    run(body())


def _port(c: Cluster) -> int:
    return int(c.router_url.rsplit(":", 1)[1])


async def _refused(port: int, raw: bytes) -> tuple[int, dict]:
    """Send `raw` on a new connection; the router must answer with an error and close: (status, error)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    head, answer = await _read_response(reader)
    assert b"connection: close" in head.lower(), head
    assert await reader.read() == b""  # and nothing else: no second request was read from the bytes
    writer.close()
    return int(head.split(b" ")[1]), orjson.loads(answer)["error"]


_GEN = b'{"text":"' + b"a" * 60 + b'"}'
_SMUGGLED = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(_GEN), _GEN)


def _chunked(size_line: bytes) -> bytes:
    return (b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size_line + b"\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n" + _SMUGGLED)


@pytest.mark.parametrize("raw", [
    # Two lengths, equal or not: which one frames the body is ambiguous (RFC 9112 §6.3).
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n" + _GEN,
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 77\r\n\r\n" + _SMUGGLED,
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n" + _GEN,
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n" + _GEN,
    # Length and chunked together: the classic smuggling pair.
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n" + _SMUGGLED,
    b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    # A framing field whose name another parser would not recognise, and obsolete line folding.
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\n" + _GEN,
    b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n",
    b"POST /generate HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Content-Length: 5\r\n\r\n" + _GEN,
    # Chunk sizes are hex digits and nothing else (int(x, 16) would take all of these).
    _chunked(b"0x10"), _chunked(b"1_0"), _chunked(b"+10"), _chunked(b" 10"), _chunked(b"10 "), _chunked(b"10\t"),
    _chunked(b"-0"), _chunked(b""),
], ids=lambda raw: raw[30:70].decode("latin-1"))
def test_ambiguous_framing_is_refused_with_400_and_nothing_reaches_a_worker(raw: bytes) -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            status, err = await _refused(_port(c), raw)
            assert status == 400 and err["type"] == "invalid_request_error" and err["message"]
            await asyncio.sleep(0.05)
            assert not c.decode[0].bodies and not c.prefill[0].bodies
            c.assert_idle()

    run(body())


def test_a_head_over_64kb_is_refused_even_when_it_arrives_in_one_read() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c:
            raw = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
            status, err = await _refused(_port(c), raw)
            assert status == 431 and err["message"] == "request head too large"
            head, _ = await _exchange(_port(c), b"GET /health HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 60000
                                      + b"\r\n\r\n")
            assert b" 200 " in head  # just under the limit is served

    run(body())


async def _exchange(port: int, raw: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await _read_response(reader)
    finally:
        writer.close()


def test_a_head_sent_slowly_is_cut_off_with_408_at_the_header_timeout() -> None:
    async def body() -> None:
        async with cluster(1, 1, header_timeout_s=0.3) as c:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(c))
            started = loop.time()

            async def drip() -> None:  # a byte every 50 ms: each one would reset an inactivity timer
                with contextlib.suppress(ConnectionError):
                    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                        writer.write(bytes([byte]))
                        await asyncio.sleep(0.05)

            dripping = asyncio.ensure_future(drip())
            head, answer = await _read_response(reader)
            took = loop.time() - started
            dripping.cancel()
            writer.close()
            assert head.startswith(b"HTTP/1.1 408 ") and orjson.loads(answer)["error"]["code"] == "request_timeout"
            assert 0.25 < took < 1.5, took
            # A body that stops arriving is cut off the same way.
            status, err = await _refused(_port(c), b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 50"
                                                   b"\r\n\r\n{\"text\":")
            assert status == 408
            assert not c.decode[0].bodies

    run(body())


def test_idle_keep_alive_and_silent_connections_are_closed_at_their_timeouts() -> None:
    async def body() -> None:
        async with cluster(1, 1, header_timeout_s=0.3, idle_timeout_s=0.6) as c:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(c))
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _ = await _read_response(reader)
            assert b" 200 " in head
            answered = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed with no answer owed
            idle = loop.time() - answered
            assert 0.5 < idle < 2.0, idle
            writer.close()
            # A connection that never sends a byte gets the header timeout, and no 408 either.
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(c))
            opened = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 0.25 < loop.time() - opened < 0.55
            writer.close()
            assert not c.state.stats.in_flight

    run(body())


def test_connections_past_the_cap_get_503_and_a_freed_slot_serves_again() -> None:
    async def body() -> None:
        async with cluster(1, 1, max_connections=3) as c:
            held = [await asyncio.open_connection("127.0.0.1", _port(c)) for _ in range(3)]
            await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(c))
            head, answer = await _read_response(reader)
            writer.close()
            assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
            assert orjson.loads(answer)["error"]["code"] == "too_many_connections"
            held.pop()[1].close()
            await asyncio.sleep(0.05)
            head, _ = await _exchange(_port(c), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b" 200 " in head
            for _, w in held:
                w.close()

    run(body())


def test_every_listening_socket_binds_the_configured_host() -> None:
    async def body() -> None:
        for host in ("127.0.0.1", "localhost"):
            app = RouterApp(RouterConfig(decode=[WorkerSpec("http://127.0.0.1:9", Role.DECODE)], host=host, port=0,
                                         health_interval_s=0))
            await app.start()
            try:
                addresses = {a for a, _ in app.listening_addresses}
            finally:
                await app.close()
            assert addresses and addresses <= {"127.0.0.1", "::1"}, (host, addresses)

    run(body())
