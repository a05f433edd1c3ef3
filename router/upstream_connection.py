"""One HTTP/1.1 connection to a worker (`UpstreamConnection`): writes a request, parses the response's
status line, headers and Content-Length, chunked or read-until-close body, and hands body bytes to one
reader as they arrive. Its pool (`router.upstream.UpstreamPool`) owns it; see that module for why.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from router.http_head import header_value

if TYPE_CHECKING:
    from router.upstream import UpstreamPool

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _DONE, _IDLE = range(9)
_MAX_HEAD_BYTES = 64 * 1024
_SINK_KEEP_2XX = 4096  # bytes of a sink's 2xx answer kept for its callback (a prefill hit report)
_PAUSE_READING_AT = 1 << 20  # unread body bytes held per connection before reading from the socket pauses


SinkCallback: TypeAlias = "Callable[[int, bytes, bytes, BaseException | None], None]"


class UpstreamError(Exception):
    """The worker could not be reached, broke the connection, or sent something that is not HTTP."""


class UpstreamTimeout(UpstreamError):
    """The request's deadline passed before the worker finished answering."""


class StaleConnection(UpstreamError):
    """A reused keep-alive connection was closed by the worker before any response byte: safe to resend."""


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a worker, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self._pool = pool
        self.key = key
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._state = _IDLE
        self._remaining = 0
        self._pieces: deque[bytes] = deque()
        self._pending_bytes = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self.deadline_at: float | None = None  # loop.time() instant; watched by the pool's one timer
        self.closed = False
        self.reused = False
        self._received_any = False
        self.keep_alive = True
        self.status = 0
        self._head = b""
        self._headers: dict[str, str] | None = None
        self.exchange = 0  # bumped per request sent: a stale holder cannot abort a later exchange
        # Callback mode (see send_sink): called once with (status, body, content type, error).
        self._sink: SinkCallback | None = None
        # Relay mode (see relay): body bytes go straight to this writer from data_received.
        self._relay: Callable[[bytes], None] | None = None
        self._relay_last: Callable[[bytes], None] | None = None  # for the piece that ends the body
        self._relay_congested: Callable[[], bool] = _never

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small SSE events must leave at once, not wait for Nagle's algorithm and delayed ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        if self._state == _IDLE or self._state == _DONE:
            # Bytes nobody asked for (e.g. after a response): the connection can no longer be trusted.
            self._fail(UpstreamError("worker sent bytes outside a response"))
            return
        try:
            self._parse(self._buf + data if self._buf else data)
        except (ValueError, IndexError) as exc:
            self._fail(UpstreamError(f"malformed HTTP response from worker: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_deadline()
        self._pool._forget(self)
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        elif self._state not in (_DONE, _IDLE) and self._exc is None:
            if self._state == _HEAD and self.reused and not self._received_any:
                self._exc = StaleConnection("idle keep-alive connection closed by the worker")
            else:
                self._exc = UpstreamError(f"worker closed the connection mid-response ({exc or 'EOF'})")
        if self._sink is not None:
            self._end_sink()
        self._wake()

    # -- parsing ----------------------------------------------------------------------------------
    def _parse(self, buf: bytes) -> None:
        pos, n = 0, len(buf)
        out: list[bytes] = []
        while pos < n:
            state = self._state
            if state == _LENGTH or state == _CHUNK_DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos : pos + take] if (pos or take < n) else buf)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DONE if state == _LENGTH else _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                data_end = pos + size
                if size and data_end + 2 <= n and buf[data_end : data_end + 2] == b"\r\n":
                    # The whole chunk is here (the usual SSE event): one step instead of three.
                    out.append(buf[pos:data_end])
                    pos = data_end + 2
                elif size:
                    self._state, self._remaining = _CHUNK_DATA, size
                else:
                    self._state = _TRAILER
            elif state == _CHUNK_CRLF:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > _MAX_HEAD_BYTES:
                        raise ValueError("response head too large")
                    break
                self._parse_head(buf[pos:end])
                pos = end + 4
            elif state == _TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                self._state = _DONE if end == pos else _TRAILER
                pos = end + 2
            elif state == _UNTIL_CLOSE:
                out.append(buf[pos:] if pos else buf)
                pos = n
            else:  # _DONE with bytes left over: a pipelining mistake by the worker
                raise ValueError("bytes after the end of the response")
        self._buf = buf[pos:] if pos < n else b""
        if self._sink is not None:
            if out and (self.status >= 400 or sum(map(len, self._pieces)) < _SINK_KEEP_2XX):
                # An error body is kept for the callback; of a 2xx one only the start, where a prefill
                # answer's small JSON (its `cached_tokens` hit report) is: the rest is dropped.
                self._pieces.extend(out)
            if self._state == _DONE:
                self._end_sink()
            return
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            if self._relay is not None:
                if self._state == _DONE and self._relay_last is not None:
                    self._relay_last(data)  # the last piece and the end of the answer in one write
                else:
                    self._relay(data)
                if self._state == _DONE or self._relay_congested():
                    self._wake()
                return
            self._pieces.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > _PAUSE_READING_AT and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        if out or (self._state != _HEAD and (self._relay is None or self._state == _DONE)):
            self._wake()

    def _parse_head(self, head: bytes) -> None:
        # Only the framing headers are looked at here (one lower() and a few finds instead of a dict
        # of every header); `headers` decodes the rest on demand.
        line_end = head.find(b"\r\n")
        status_line = head[:line_end] if line_end >= 0 else head
        self.status = int(status_line[9:12])
        if 100 <= self.status < 200:
            return  # interim response (100 Continue): the real head follows
        self._head = head
        self._headers = None
        low = head.lower()
        conn = header_value(low, b"\r\nconnection:")
        if status_line.startswith(b"HTTP/1.1"):
            self.keep_alive = conn is None or b"close" not in conn
        else:
            self.keep_alive = conn is not None and b"keep-alive" in conn
        te = header_value(low, b"\r\ntransfer-encoding:")
        length = header_value(low, b"\r\ncontent-length:")
        if self.status in (204, 304) or self._method_is_head:
            self._state = _DONE
        elif te is not None and b"chunked" in te:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = int(length)
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False

    @property
    def headers(self) -> dict[str, str]:
        """Response headers, names lower-cased."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for line in self._head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            self._headers = headers
        return self._headers

    def content_type(self, default: bytes = b"application/json") -> bytes:
        low = self._head.lower()  # same length as the head: indexes carry over to the original case
        i = low.find(b"\r\ncontent-type:")
        if i < 0:
            return default
        end = low.find(b"\r\n", i + 15)
        return self._head[i + 15 : end if end >= 0 else None].strip()

    _method_is_head = False

    # -- consumer API -----------------------------------------------------------------------------
    def send(self, data: bytes, deadline: float | None) -> None:
        """Write one full request (head and body); `deadline` is a loop.time() instant."""
        if self.closed or self.transport is None:
            raise StaleConnection("connection already closed")
        self._state = _HEAD
        self.status = 0
        self.exchange += 1
        self._received_any = False
        if deadline is not None:
            self.deadline_at = deadline
            self._pool._watch_deadline(self, deadline)
        self.transport.write(data)

    def send_sink(self, data: bytes, deadline: float | None, callback: SinkCallback) -> None:
        """Send a request whose answer nobody reads: a 2xx body is dropped as it arrives, and
        `callback(status, body, content_type, error)` runs once when the answer is complete (body
        kept whole for an error status, its first few KB for a 2xx one) or failed. No task or future is involved, which is what
        the prefill half of a PD request needs (its answer only tells success or failure)."""
        self._sink = callback
        try:
            self.send(data, deadline)
        except BaseException:
            self._sink = None
            raise

    def _end_sink(self) -> None:
        callback, self._sink = self._sink, None
        assert callback is not None
        exc = self._exc
        if exc is None and self._state != _DONE:
            exc = UpstreamError("worker closed the connection mid-response")
        status = self.status
        body = b"".join(self._pieces)
        self._pieces.clear()
        content_type = self.content_type() if self._head else b""
        if exc is None:
            self._finish()  # back to the pool (keep-alive) before the callback may reuse it
        callback(status, body, content_type, exc)

    async def read_chunk(self) -> bytes:
        """The next body bytes as they arrived (several small pieces joined); b"" at the end."""
        while True:
            pieces = self._pieces
            if pieces:
                data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._pending_bytes = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._exc is not None:
                raise self._exc
            if self._state == _DONE:
                self._finish()
                return b""
            if self._state == _IDLE:
                return b""  # already finished and handed back to the pool
            await self._wait()

    async def relay(self, write: Callable[[bytes], None], congested: Callable[[], bool],
                    write_last: Callable[[bytes], None] | None = None) -> bool:
        """Hand body bytes to `write` straight from the protocol callback as they arrive (no task
        switch per chunk) until the answer ends (True) or `congested()` says the destination is
        backed up (False: the caller waits for it to drain, then calls relay again). The piece that
        arrives with the end of the body goes to `write_last` instead, when given."""
        if self._pieces:
            data = b"".join(self._pieces)
            self._pieces.clear()
            self._pending_bytes = 0
            write(data)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        while True:
            if self._exc is not None:
                raise self._exc
            if self._state == _DONE or self._state == _IDLE:
                if self._state == _DONE:
                    self._finish()
                return True
            if congested():
                return False
            self._relay, self._relay_congested, self._relay_last = write, congested, write_last
            try:
                await self._wait()
            finally:
                self._relay, self._relay_congested, self._relay_last = None, _never, None

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has already arrived (small answers come with their head), the
        connection then going back to the pool; None when more is to come (use `read_all`)."""
        if self._state != _DONE or self._exc is not None:
            return None
        pieces = self._pieces
        data = b"".join(pieces) if len(pieces) != 1 else pieces[0]
        pieces.clear()
        self._pending_bytes = 0
        self._finish()
        return data

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fail(self, exc: BaseException, exchange: int) -> None:
        """Abort exchange number `exchange` from outside: its reader gets `exc` (after bytes already
        queued). No-op once that exchange has finished (the connection may serve another by then)."""
        if exchange == self.exchange and (self._state not in (_DONE, _IDLE) or self._pieces):
            self._fail(exc)

    def abort_exchange(self, exchange: int) -> None:
        """Close the connection if exchange number `exchange` is still under way on it."""
        if exchange == self.exchange and self._state != _IDLE:
            self.close()

    def close(self) -> None:
        """Drop the connection (the worker sees the disconnect); it is never reused."""
        self._cancel_deadline()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        self._pool._forget(self)

    # -- internals --------------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self._exc is not None:
            raise self._exc
        fut = self._loop.create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self.close()
        if self._sink is not None:
            self._end_sink()
        self._wake()

    def _on_deadline(self) -> None:
        self._fail(UpstreamTimeout("worker did not finish before the request timeout"))

    def _cancel_deadline(self) -> None:
        if self.deadline_at is not None:
            self.deadline_at = None
            self._pool._timed.discard(self)

    def _finish(self) -> None:
        self._cancel_deadline()
        if self.keep_alive and not self.closed and not self._buf:
            self._state = _IDLE
            self._pool._release(self)
        else:
            self.close()


def _never() -> bool:
    return False
