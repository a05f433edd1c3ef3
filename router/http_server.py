"""The router's inbound HTTP/1.1 server: one asyncio.Protocol per client connection.

Why not aiohttp's server: per request it builds a Request with a multidict of every header, a
payload stream, a Response object and its header dict, and resolves the route through a URL
dispatcher; at the router's budget (~150 µs of CPU per request in all) that was ~1/4 of the total.
Clients here send small JSON bodies to a handful of fixed paths, so this server finds the end of the
head, reads the request line and the few framing headers it needs (one lower() and a few finds),
collects a Content-Length or chunked body, and calls the handler for (method, path). Other headers
are looked up on demand from the lower-cased head. Responses are written with precomputed bytes.

Framing is strict (`router.http_framing`: what RFC 9112 calls ambiguous is a 400), and every
connection is bounded: a head within `header_timeout_s` (408 after), an idle keep-alive connection
closed after `idle_timeout_s`, at most `max_connections` open (503 past it). One sweep timer per server
checks the deadlines. Every error is the router's one JSON error body (`router.errors.error_body`).

One request at a time per connection: bytes of a pipelined next request wait in the buffer until
the current response is complete (reading pauses if they pile up). A client that disconnects cancels
its handler's task, which is how both workers of an abandoned request are aborted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TypeAlias
from urllib.parse import parse_qsl

from router.errors import error_body
from router.http_framing import CHUNKED, MAX_HEAD_BYTES, NO_BODY, ChunkedBody, FramingError, body_framing
from router.http_head import header_value

log = logging.getLogger("router.http")

_PIPELINE_PAUSE_AT = 256 * 1024  # bytes of later requests buffered before reading pauses
_DISCARD_GRACE_S = 5.0  # after a 413: how long the rest of the refused body may keep arriving
_HEAD, _BODY, _CHUNKED, _BUSY, _DISCARD, _CLOSED = range(6)
# What a connection's deadline guards: the wait for a next request on a kept-alive connection (closed
# silently), the arrival of a request head, the arrival of the next body bytes (both answered 408).
_NO_DEADLINE, _IDLE_DEADLINE, _HEAD_DEADLINE, _BODY_DEADLINE = range(4)
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_JSON = b"application/json"

Handler: TypeAlias = "Callable[[HttpRequest, HttpConnection], Awaitable[None]]"


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Unknown\r\n".encode()


class HttpRequest:
    """One parsed request; headers are read on demand from the head (`header`, `find_header`)."""

    __slots__ = ("method", "path", "query_string", "http11", "keep_alive", "_head", "_low", "body")

    def __init__(self, method: bytes, path: bytes, query_string: bytes, http11: bool, keep_alive: bool,
                 head: bytes, low: bytes) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.http11 = http11
        self.keep_alive = keep_alive
        self._head = head
        self._low = low  # head.lower(): same length, so offsets found in it index the original
        self.body = b""

    def header(self, name: str) -> str | None:
        value = self.find_header(b"\r\n" + name.lower().encode("latin-1") + b":")
        return None if value is None else value.decode("latin-1")

    def find_header(self, key: bytes) -> bytes | None:
        """Value (original case, stripped) of the first header whose `key` is `b"\\r\\nname:"` with
        the name in lower case; None if absent. Callers on the hot path keep their keys as constants."""
        i = self._low.find(key)
        if i < 0:
            return None
        start = i + len(key)
        end = self._low.find(b"\r\n", start)
        return self._head[start : end if end >= 0 else None].strip()

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string.decode("latin-1")))


class HttpConnection(asyncio.Protocol):
    """One client connection. Handlers answer through `respond` or `start_stream`/`end_stream`."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._routes = server.routes
        self._loop = server.loop
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._state = _HEAD
        self._request: HttpRequest | None = None
        self._body = bytearray()
        self._need = 0
        self._chunked: ChunkedBody | None = None
        self._task: asyncio.Task[None] | None = None
        self._responded = False  # the current request's response is complete
        self._streaming = False  # a streamed response has started and not ended
        self._stream_chunked = False
        self._paused = False
        self._discard_left = -1
        self._discard_timer: asyncio.TimerHandle | None = None
        # Checked by the server's one sweep timer (HttpServer._sweep) rather than a timer per
        # connection: re-arming a loop timer on every request and body read costs more than a float.
        self.deadline = 0.0
        self._deadline_kind = _NO_DEADLINE

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # SSE events leave at once
        server = self._server
        if len(server.connections) >= server.max_connections:
            # Past the cap every socket would still cost a descriptor and buffers: say why, then close.
            self._state = _CLOSED
            self._write_response(503, error_body(503, f"router is at its limit of {server.max_connections} "
                                                      "connections", code="too_many_connections"),
                                 _JSON, b"Retry-After: 1\r\n", keep_alive=False)
            transport.close()
            return
        server.connections.add(self)
        # A new connection must send its request head within the header timeout.
        self._set_deadline(_IDLE_DEADLINE, server.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self.transport = None
        self._server.connections.discard(self)
        if self._discard_timer is not None:
            self._discard_timer.cancel()
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the client left: the handler aborts its workers

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _HEAD:
            self._buf = self._buf + data if self._buf else data
            self._advance()
        elif state == _BODY:
            self.deadline = self._loop.time() + self._server.header_timeout_s
            self._body += data
            if len(self._body) >= self._need:
                self._body_complete()
        elif state == _BUSY:
            self._buf += data  # a pipelined request: served once the current answer is out
            if len(self._buf) > _PIPELINE_PAUSE_AT and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        elif state == _CHUNKED:
            self.deadline = self._loop.time() + self._server.header_timeout_s
            self._feed_chunked(data)
        elif state == _DISCARD:
            if self._chunked is not None:
                try:
                    self._chunked.feed(data)
                except ValueError:
                    self._close()
                    return
                self._chunked.body.clear()
                if self._chunked.done:
                    self._close()
            else:
                self._discard_left -= len(data)
                if self._discard_left <= 0:
                    self._close()

    # -- request parsing --------------------------------------------------------------------------
    def _advance(self) -> None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                self._refuse(431, "request head too large")
            elif buf and self._deadline_kind != _HEAD_DEADLINE:
                # The first bytes of a request: from now on the whole head must arrive within the
                # header timeout (a byte at a time does not extend it: slowloris).
                self._set_deadline(_HEAD_DEADLINE, self._server.header_timeout_s)
            return
        if end > MAX_HEAD_BYTES:  # the limit holds however the head arrived, in one read or many
            self._refuse(431, "request head too large")
            return
        head = buf[:end]
        rest = buf[end + 4 :]
        self._buf = b""
        line_end = head.find(b"\r\n")
        request_line = head if line_end < 0 else head[:line_end]
        parts = request_line.split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            self._refuse(400, "malformed request line")
            return
        method, target, version = parts
        path, _, query = target.partition(b"?")
        low = head.lower()
        try:
            framing, need = body_framing(head, low)
        except FramingError as exc:
            self._refuse(exc.status, exc.message)
            return
        http11 = version == b"HTTP/1.1"
        conn = header_value(low, b"\r\nconnection:")
        keep_alive = (conn is None or b"close" not in conn) if http11 else (conn is not None and b"keep-alive" in conn)
        req = HttpRequest(method, path, query, http11, keep_alive, head, low)
        self._request = req
        if framing == CHUNKED:
            self._chunked = ChunkedBody()
            self._state = _CHUNKED
            self._set_deadline(_BODY_DEADLINE, self._server.header_timeout_s)
            self._send_continue(low)
            self._feed_chunked(rest)
            return
        if framing == NO_BODY:
            need = 0
        if need > self._server.max_body_bytes:
            self._refuse_too_large(need - len(rest), expect_continue=b"100-continue" in low)
            return
        if len(rest) >= need:
            req.body = rest[:need] if len(rest) > need else rest
            self._buf = rest[need:] if len(rest) > need else b""
            self._dispatch(req)
            return
        self._send_continue(low)
        self._body = bytearray(rest)
        self._need = need
        self._state = _BODY
        self._set_deadline(_BODY_DEADLINE, self._server.header_timeout_s)

    def _send_continue(self, low: bytes) -> None:
        if b"\r\nexpect:" in low and b"100-continue" in (header_value(low, b"\r\nexpect:") or b""):
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body_complete(self) -> None:
        req = self._request
        assert req is not None
        body, need = self._body, self._need
        self._body = bytearray()
        if len(body) > need:
            self._buf = bytes(body[need:])
            del body[need:]
        req.body = bytes(body)
        self._dispatch(req)

    def _feed_chunked(self, data: bytes) -> None:
        decoder = self._chunked
        assert decoder is not None
        try:
            rest = decoder.feed(data)
        except ValueError as exc:
            self._chunked = None
            self._refuse(400, f"malformed chunked body: {exc}")
            return
        if len(decoder.body) > self._server.max_body_bytes:
            decoder.body.clear()
            self._refuse_too_large(-1, expect_continue=False)
            return
        if decoder.done:
            self._chunked = None
            self._buf = rest
            req = self._request
            assert req is not None
            req.body = bytes(decoder.body)
            self._dispatch(req)

    def _refuse(self, status: int, message: str, code: str | None = None) -> None:
        """Answer a request that cannot be parsed or served, then close the connection."""
        self._write_response(status, error_body(status, message, code), _JSON, b"", keep_alive=False)
        self._close()

    def _refuse_too_large(self, left: int, expect_continue: bool) -> None:
        """413, then drop the rest of the body as it arrives (closing at once would make the kernel
        reset the connection, and the client could lose the answer) and close after it."""
        limit = self._server.max_body_bytes
        self._deadline_kind, self.deadline = _NO_DEADLINE, 0.0  # the discard grace timer takes over
        self._write_response(413, error_body(413, f"request body over {limit} bytes", code="body_too_large"),
                             _JSON, b"", keep_alive=False)
        if expect_continue or left == 0:
            self._close()
            return
        self._state = _DISCARD
        self._discard_left = left
        self._discard_timer = self._loop.call_later(_DISCARD_GRACE_S, self._close)

    # -- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, req: HttpRequest) -> None:
        self._state = _BUSY
        self._deadline_kind = _NO_DEADLINE  # a handler may stream for as long as it needs
        self.deadline = 0.0
        self._responded = False
        handler = self._routes.get((req.method, req.path)) or self._server.fallback
        task = self._loop.create_task(handler(req, self))  # type: ignore[arg-type]
        self._task = task
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if self._state == _CLOSED:
            return
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("handler failed", exc_info=exc)
            if not self._streaming and not self._responded:
                self._write_response(500, error_body(500, f"internal router error: {exc}"), _JSON, b"",
                                     keep_alive=False)
            self._close()
            return
        if self._streaming:
            self.end_stream()
        if not self._responded:
            self._write_response(500, error_body(500, "handler gave no answer"), _JSON, b"", keep_alive=False)
            self._close()
            return
        req = self._request
        self._request = None
        if req is None or not req.keep_alive:
            self._close()
            return
        self._state = _HEAD
        self._set_deadline(_IDLE_DEADLINE, self._server.idle_timeout_s)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._buf:
            self._advance()

    # -- timeouts ---------------------------------------------------------------------------------
    def _set_deadline(self, kind: int, after_s: float) -> None:
        self._deadline_kind = kind
        self.deadline = self._loop.time() + after_s if after_s > 0 else 0.0

    def on_deadline(self) -> None:
        """Called by the server's sweep once `deadline` has passed."""
        kind = self._deadline_kind
        self._deadline_kind = _NO_DEADLINE
        self.deadline = 0.0
        if self._state == _CLOSED:
            return
        if kind == _IDLE_DEADLINE and not self._buf:
            self._close()  # nothing of a request was sent: no answer is owed
        elif kind != _NO_DEADLINE:
            self._refuse(408, "the request was not received in time", code="request_timeout")

    # -- responses --------------------------------------------------------------------------------
    def _write_response(self, status: int, body: bytes, content_type: bytes, extra: bytes, keep_alive: bool) -> None:
        t = self.transport
        self._responded = True
        if t is None or t.is_closing():
            return
        t.write(b"".join((
            status_line(status), b"Content-Type: ", content_type, b"\r\nContent-Length: ", b"%d" % len(body),
            b"\r\n" if keep_alive else b"\r\nConnection: close\r\n", extra, b"\r\n", body,
        )))

    def respond(self, status: int, body: bytes, content_type: bytes = _JSON, extra_headers: bytes = b"") -> None:
        """The whole answer at once. `extra_headers` is pre-formatted `Name: value\\r\\n` lines."""
        req = self._request
        self._write_response(status, body, content_type, extra_headers, req is not None and req.keep_alive)

    def start_stream(self, status: int, content_type: bytes, extra_headers: bytes = b"", first: bytes = b"") -> None:
        """Send the head of a streamed answer (chunked on HTTP/1.1, raw until close on HTTP/1.0) and
        the `first` body bytes with it: one write."""
        req = self._request
        chunked = req is not None and req.http11
        if not chunked and req is not None:
            req.keep_alive = False
        self._stream_chunked = chunked
        self._streaming = True
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(b"".join((
            status_line(status), b"Content-Type: ", content_type, b"\r\n", extra_headers,
            b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Connection: close\r\n\r\n",
            (b"%x\r\n%b\r\n" % (len(first), first) if chunked else first) if first else b"",
        )))

    def write(self, data: bytes) -> None:
        """Body bytes of a streamed answer, framed as the head said."""
        t = self.transport
        if t is not None and data and not t.is_closing():
            t.write(b"%x\r\n%b\r\n" % (len(data), data) if self._stream_chunked else data)

    def write_last(self, data: bytes) -> None:
        """The last body bytes of a streamed answer and its end, in one write."""
        if not self._streaming:
            return
        self._streaming = False
        self._responded = True
        t = self.transport
        if t is not None and not t.is_closing():
            if not self._stream_chunked:
                t.write(data)
            elif data:
                t.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
            else:
                t.write(b"0\r\n\r\n")

    def end_stream(self) -> None:
        if not self._streaming:
            return
        self._streaming = False
        self._responded = True
        t = self.transport
        if self._stream_chunked and t is not None and not t.is_closing():
            t.write(b"0\r\n\r\n")

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def write_buffer_size(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def _close(self) -> None:
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HttpServer:
    """Owns the listening socket and every open client connection (`close()`)."""

    def __init__(self, routes: dict[tuple[bytes, bytes], Handler], fallback: Handler, max_body_bytes: int, *,
                 header_timeout_s: float = 10.0, idle_timeout_s: float = 60.0, max_connections: int = 10000) -> None:
        """`header_timeout_s`: how long a request head may take to arrive (and the longest pause
        between body bytes); `idle_timeout_s`: how long a kept-alive connection may wait for its next
        request; 0 turns either off. `max_connections`: open client connections at most (one more is
        answered 503 and closed)."""
        self.routes = routes
        self.fallback = fallback
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.connections: set[HttpConnection] = set()
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.AbstractServer | None = None
        timeouts = [t for t in (header_timeout_s, idle_timeout_s) if t > 0]
        # A deadline is noticed at most a quarter of its timeout late (and within a second).
        self._tick_s = min(1.0, max(0.02, min(timeouts) / 4)) if timeouts else 0.0
        self._sweep_handle: asyncio.TimerHandle | None = None

    async def start(self, host: str | None = None, port: int | None = None, *, sock: socket.socket | None = None,
                    reuse_port: bool = False, backlog: int = 1024) -> None:
        factory = lambda: HttpConnection(self)  # noqa: E731
        if sock is not None:
            self._server = await self.loop.create_server(factory, sock=sock, backlog=backlog)
        else:
            self._server = await self.loop.create_server(factory, host, port, reuse_port=reuse_port or None,
                                                         reuse_address=True, backlog=backlog)
        if self._tick_s:
            self._sweep_handle = self.loop.call_later(self._tick_s, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in [c for c in self.connections if 0.0 < c.deadline <= now]:
            conn.on_deadline()
        self._sweep_handle = self.loop.call_later(self._tick_s, self._sweep)

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (one per address the host resolved to)."""
        return [] if self._server is None else list(self._server.sockets)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running handlers finish for up to `grace_s`, then drop every connection."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._server is not None:
            self._server.close()
        tasks = [c._task for c in self.connections if c._task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for c in list(self.connections):
            c.abort()  # connection_lost cancels what is still running
        self.connections.clear()
        tasks = [t for t in tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
