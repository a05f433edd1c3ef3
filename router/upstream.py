"""A lean HTTP/1.1 client for the router's worker connections: keep-alive pool, TCP_NODELAY, deadlines.

Why not aiohttp's ClientSession: per request it builds URL objects, cookie jars, timers and trace
hooks, several times the CPU the router may spend per request in total. Workers are known hosts that
speak plain HTTP/1.1, so this client is one asyncio.Protocol per connection that parses status line,
headers and a Content-Length, chunked or read-until-close body, and hands body bytes to one reader
as they arrive (the streaming passthrough needs them unbuffered). A connection goes back to its pool
only when its response was read to the end on a keep-alive connection; anything else closes it,
which is also how an abandoned request is aborted on the worker side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from router.upstream_connection import (
    _HEAD,
    SinkCallback,
    StaleConnection,
    UpstreamConnection,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = [
    "SinkCallback",
    "StaleConnection",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamTimeout",
    "build_request",
]


class UpstreamPool:
    """Keep-alive connections per (host, port); the one owner of every upstream socket (`close()`)."""

    def __init__(self, connect_timeout_s: float = 5.0, idle_ttl_s: float = 4.0, max_idle_per_host: int = 1024):
        # idle_ttl_s: uvicorn (SGLang's server) drops idle keep-alive connections after 5 s; reusing
        # one just as it does makes a stale write, so connections idle longer than this are dropped.
        self._connect_timeout_s = connect_timeout_s
        self._idle_ttl_s = idle_ttl_s
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], list[tuple[float, UpstreamConnection]]] = {}
        self._open: set[UpstreamConnection] = set()
        self._closed = False
        # Request deadlines: one loop timer for the pool, due at the earliest deadline, instead of a
        # timer per request (scheduling and cancelling one costs ~5 µs in uvloop, twice per request).
        self._timed: set[UpstreamConnection] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take_idle(self, host: str, port: int) -> UpstreamConnection | None:
        """A kept-alive connection to (host, port), if one is idle and fresh enough (no waiting)."""
        idle = self._idle.get((host, port))
        if not idle or self._closed:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            since, conn = idle.pop()
            if not conn.closed and now - since < self._idle_ttl_s:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def connect(self, host: str, port: int, *, fresh: bool = False) -> UpstreamConnection:
        if self._closed:
            raise UpstreamError("upstream pool is closed")
        key = (host, port)
        if not fresh:
            conn = self.take_idle(host, port)
            if conn is not None:
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self, key), host, port),
                self._connect_timeout_s,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc or type(exc).__name__}") from exc
        self._open.add(conn)
        return conn

    async def request(
        self,
        host: str,
        port: int,
        data: bytes,
        deadline: float | None,
        on_connection: Callable[[UpstreamConnection], None] | None = None,
        head_only: bool = False,
    ) -> UpstreamConnection:
        """Send `data` (a full request) and wait for the response head; the caller reads the body.

        `on_connection` sees each connection before the request is written (so another task can
        abort it). A reused connection that the worker had just closed is retried once on a new one.
        """
        fresh = False
        while True:
            conn = None if fresh else self.take_idle(host, port)  # inline: no coroutine when one is idle
            if conn is None:
                conn = await self.connect(host, port, fresh=fresh)
            conn._method_is_head = head_only
            if on_connection is not None:
                on_connection(conn)
            try:
                conn.send(data, deadline)
                while conn._state == _HEAD:
                    await conn._wait()
                return conn
            except StaleConnection:
                conn.close()
                if fresh:
                    raise
                fresh = True
            except BaseException:
                conn.close()
                raise

    def _release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self._max_idle:
            conn.close()
            return
        idle.append((asyncio.get_running_loop().time(), conn))

    def _forget(self, conn: UpstreamConnection) -> None:
        self._open.discard(conn)

    def _watch_deadline(self, conn: UpstreamConnection, deadline: float) -> None:
        self._timed.add(conn)
        # Deadlines of one router mostly grow with time, so this (re)schedules rarely.
        if self._sweep_handle is None or deadline < self._sweep_at:
            if self._sweep_handle is not None:
                self._sweep_handle.cancel()
            self._sweep_at = deadline
            self._sweep_handle = asyncio.get_running_loop().call_at(deadline, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        self._sweep_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # uvloop's clock ticks in ms: never re-arm for a deadline a hair away
        for conn in [c for c in self._timed if c.deadline_at is not None and c.deadline_at <= now]:
            conn._on_deadline()  # fails and closes it, which drops it from _timed
        if self._timed:
            self._sweep_at = min(c.deadline_at or now for c in self._timed)
            self._sweep_handle = loop.call_at(self._sweep_at, self._sweep_deadlines)

    def close(self) -> None:
        """Close every connection, idle or busy; later requests fail with UpstreamError."""
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        self._timed.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None


def build_request(method: str, path: str, host_header: str, body: bytes, extra_headers: bytes = b"") -> bytes:
    """One HTTP/1.1 request as bytes. `extra_headers` is pre-formatted `Name: value\\r\\n` lines."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Length: {len(body)}\r\n".encode("latin-1")
        + (b"Content-Type: application/json\r\n" if body else b"")
        + extra_headers
        + b"\r\n"
        + body
    )
