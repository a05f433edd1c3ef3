"""Request framing for the router's HTTP/1.1 server: where a request's body ends (RFC 9112 §6).

Why strict: the router sits in front of workers and behind proxies. When two parsers disagree on where a
message ends (a duplicate Content-Length, Content-Length beside Transfer-Encoding, `0x10` read as a chunk
size by one and refused by the other, a field name with a space before its colon), the bytes one of them
takes as a body the other takes as the next request: request smuggling. RFC 9112 tells a server to refuse
such messages with a 400, and this module does, before any byte of a body is read.
"""

from __future__ import annotations

import re

from router.http_head import header_value

MAX_HEAD_BYTES = 64 * 1024
_MAX_LENGTH_DIGITS = 18  # more than any body the router takes; also keeps int() off huge digit strings
_MAX_CHUNK_LINE = 4096
_MAX_TRAILER_BYTES = 16 * 1024
# chunk-size is 1*HEXDIG (RFC 9112 §7.1): no sign, no 0x, no underscores, no whitespace; an extension
# (`;name=value`) may follow and is ignored.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?")
_CL = b"\r\ncontent-length:"
_TE = b"\r\ntransfer-encoding:"
NO_BODY, LENGTH, CHUNKED = range(3)


class FramingError(ValueError):
    """A request whose framing cannot be trusted: answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _check_field_names(head: bytes) -> None:
    """Every field line is `name:value` with no whitespace in or after the name (RFC 9112 §5.1)."""
    for line in head.split(b"\r\n")[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
            raise FramingError(400, f"malformed header line {line[:60]!r}")


def body_framing(head: bytes, low: bytes) -> tuple[int, int]:
    """(NO_BODY | LENGTH | CHUNKED, Content-Length) for a request head (`low` is `head.lower()`).

    Raises FramingError for what RFC 9112 says a server must refuse: obsolete line folding, whitespace
    before a colon, more than one Content-Length or Transfer-Encoding, both together, a length that is
    not plain digits, and a transfer coding other than `chunked`."""
    if b"\r\n " in head or b"\r\n\t" in head:
        raise FramingError(400, "obsolete line folding in the request head")
    n_cl = low.count(_CL)
    n_te = low.count(_TE)
    # Cheap screen first: the precise line check runs only when a framing name or " :" appears in a way
    # the exact searches above did not count (a header value mentioning them passes the precise check).
    if (b" :" in low or b"\t:" in low or low.count(b"content-length") != n_cl
            or low.count(b"transfer-encoding") != n_te):
        _check_field_names(head)
    if n_cl > 1 or n_te > 1:
        raise FramingError(400, "more than one Content-Length or Transfer-Encoding header")
    if n_te:
        if n_cl:
            raise FramingError(400, "Content-Length and Transfer-Encoding together")
        te = header_value(low, _TE)
        if te != b"chunked":
            if te is not None and b"chunked" in te:
                raise FramingError(400, "only the chunked transfer coding is supported")
            raise FramingError(501, "only the chunked transfer coding is supported")
        return CHUNKED, 0
    if not n_cl:
        return NO_BODY, 0
    length = header_value(low, _CL) or b""
    if not length.isdigit():  # bytes.isdigit: ASCII digits only
        raise FramingError(400, "bad Content-Length")
    if len(length) > _MAX_LENGTH_DIGITS:
        return LENGTH, 1 << 62  # refused as too large by the caller
    return LENGTH, int(length)


def chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (extensions ignored); ValueError unless it is plain hex digits."""
    m = _CHUNK_SIZE.fullmatch(line)
    if m is None:
        raise ValueError(f"bad chunk size line {line[:40]!r}")
    return int(m.group(1), 16)


class ChunkedBody:
    """Incremental decoder of a chunked request body (rare from clients, so plain and simple)."""

    __slots__ = ("body", "_buf", "_remaining", "_in_trailer", "_trailer_bytes", "done")

    def __init__(self) -> None:
        self.body = bytearray()
        self._buf = b""
        self._remaining = -1  # -1: a size line is next; -2: the CRLF after a chunk's data
        self._in_trailer = False
        self._trailer_bytes = 0
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Consume `data`; returns the bytes after the body's end (a pipelined request), if done.
        Raises ValueError on malformed framing."""
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        while pos < n and not self.done:
            if self._remaining > 0:
                take = min(self._remaining, n - pos)
                self.body += buf[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._remaining = -2
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if n - pos > _MAX_CHUNK_LINE:
                    raise ValueError("chunk size line too long")
                break
            line = buf[pos:end]
            pos = end + 2
            if self._remaining == -2:
                if line:
                    raise ValueError("chunk data not followed by CRLF")
                self._remaining = -1
            elif self._in_trailer:
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > _MAX_TRAILER_BYTES:
                    raise ValueError("trailer section too large")
                self.done = not line
            else:
                size = chunk_size(line)
                if size:
                    self._remaining = size
                else:
                    self._in_trailer = True
        self._buf = buf[pos:]
        rest, self._buf = (self._buf, b"") if self.done else (b"", self._buf)
        return rest
