"""The router's lean HTTP/1.1 client against scripted raw servers (the far side of the unit)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from router.upstream import UpstreamError, UpstreamPool, UpstreamTimeout, build_request


class ScriptedServer:
    """Answers each request with the next scripted bytes; counts connections and requests."""

    def __init__(self, answers: list[bytes | Callable[[asyncio.Transport], None]]) -> None:
        self.answers = answers
        self.connections = 0
        self.requests = 0
        self.port = 0
        self.transports: list[asyncio.BaseTransport] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        server = self

        class Proto(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport
                self.buf = b""
                server.connections += 1
                server.transports.append(transport)

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:
                    head, _, rest = self.buf.partition(b"\r\n\r\n")
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]) \
                        if b"content-length:" in head.lower() else 0
                    if len(rest) < n:
                        return
                    self.buf = rest[n:]
                    answer = server.answers[min(server.requests, len(server.answers) - 1)]
                    server.requests += 1
                    if callable(answer):
                        answer(self.t)  # type: ignore[arg-type]
                    else:
                        self.t.write(answer)  # type: ignore[attr-defined]

        self._server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in self.transports:
            t.close()
        await self._server.wait_closed()


def _req(port: int) -> bytes:
    return build_request("POST", "/x", f"127.0.0.1:{port}", b'{"a": 1}')


async def _fetch(pool: UpstreamPool, port: int, deadline_s: float = 5.0) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    conn = await pool.request("127.0.0.1", port, _req(port), loop.time() + deadline_s)
    return conn.status, await conn.read_all()


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 20))


def test_chunked_length_and_until_close_bodies_are_read_whole() -> None:
    answers: list[bytes | Callable[[asyncio.Transport], None]] = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello",
        lambda t: (t.write(b"HTTP/1.0 200 OK\r\n\r\nuntil close"), t.close()),
    ]

    async def body() -> None:
        server = ScriptedServer(answers)
        await server.start()
        pool = UpstreamPool()
        assert await _fetch(pool, server.port) == (200, b"abcde")
        assert await _fetch(pool, server.port) == (201, b"hello")
        assert await _fetch(pool, server.port) == (200, b"until close")
        assert server.connections == 1  # keep-alive reused the connection until the server closed it
        assert pool.open_connections == 0  # the closed one is gone
        pool.close()
        await server.stop()

    run(body())


def test_body_split_across_many_packets_arrives_in_order() -> None:
    def dribble(t: asyncio.Transport) -> None:
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
            f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (b"one ", b"two ", b"three")) + b"0\r\n\r\n"
        loop = asyncio.get_running_loop()
        for i in range(len(data)):
            loop.call_later(0.0005 * i, t.write, data[i : i + 1])

    async def body() -> None:
        server = ScriptedServer([dribble])
        await server.start()
        pool = UpstreamPool()
        assert await _fetch(pool, server.port) == (200, b"one two three")
        pool.close()
        await server.stop()

    run(body())


def test_stale_keep_alive_connection_is_retried_on_a_fresh_one() -> None:
    def answer_then_close(t: asyncio.Transport) -> None:
        t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        asyncio.get_running_loop().call_later(0.05, t.close)  # the server's keep-alive timeout

    async def body() -> None:
        server = ScriptedServer([answer_then_close])
        await server.start()
        pool = UpstreamPool()
        assert await _fetch(pool, server.port) == (200, b"ok")
        await asyncio.sleep(0.1)  # the idle connection is closed by now
        assert await _fetch(pool, server.port) == (200, b"ok")
        assert server.connections == 2
        pool.close()
        await server.stop()

    run(body())


def test_deadline_fails_the_read_and_closes_the_connection() -> None:
    async def body() -> None:
        server = ScriptedServer([lambda t: t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")])
        await server.start()
        pool = UpstreamPool()
        with pytest.raises(UpstreamTimeout):
            await _fetch(pool, server.port, deadline_s=0.1)
        assert pool.open_connections == 0 and pool.idle_connections == 0
        pool.close()
        await server.stop()

    run(body())


def test_garbage_and_refused_connections_raise_upstream_errors() -> None:
    async def body() -> None:
        server = ScriptedServer([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
        await server.start()
        pool = UpstreamPool()
        with pytest.raises(UpstreamError, match="malformed"):
            await _fetch(pool, server.port)
        await server.stop()
        with pytest.raises(UpstreamError, match="cannot connect"):
            await _fetch(pool, server.port)
        assert pool.open_connections == 0
        pool.close()

    run(body())


def test_an_earlier_deadline_set_after_a_later_one_still_fires() -> None:
    async def body() -> None:
        server = ScriptedServer([lambda t: None])  # never answers
        await server.start()
        pool = UpstreamPool()
        slow = asyncio.ensure_future(_fetch(pool, server.port, deadline_s=60.0))
        await asyncio.sleep(0.05)  # the pool's one timer is now due in 60 s
        with pytest.raises(UpstreamTimeout):
            await _fetch(pool, server.port, deadline_s=0.1)
        assert not slow.done()
        slow.cancel()
        pool.close()
        assert pool.open_connections == 0 and pool.idle_connections == 0
        await server.stop()

    run(body())
