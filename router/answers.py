"""What the router checks and rewrites in a worker's answer before the client sees it.

Two jobs, both on the bytes of an answer (whole, or streamed piece by piece):
- Request ids: workers know a request by the router's own id (unique per attempt, whatever the client
  sent: a client reusing an `X-Request-ID` or body `rid` must not collide with, or abort, another
  request). Wherever a worker echoes that id (`meta_info.id`, `chatcmpl-<id>`), the client's id is put
  back. The router's id is 24 random hex digits, so it never occurs in an answer by chance.
- Failures dressed as successes: an answer that ends with `finish_reason: "abort"`, that carries an
  error object inside a 200, or a stream that reaches `[DONE]` without any output is a failed request.
  A whole answer becomes an OpenAI-style 502; a stream gets an SSE error event (its head is already
  out), as SGLang reports errors in-stream. The caller learns of it through `failure` and aborts the
  pair's other half.
"""

from __future__ import annotations

import os
import re
from typing import Any

import orjson

from router.errors import error_body

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_MAX_PARTIAL = 1 << 20  # bytes of one unfinished event held back at most; past it they are passed on
_ABORTED = "the worker aborted the request before it finished"
_EMPTY = "the worker ended the stream without any output"


def new_request_id() -> str:
    """A router-side request id: 96 random bits, unique across requests, attempts and processes."""
    return os.urandom(12).hex()


class IdRewriter:
    """Replaces the router's id `internal` (and `internal-<i>` of a batch) by the client's ids."""

    __slots__ = ("internal", "internal_b", "_needle", "_pattern", "_single", "_items", "single", "batch")
    _pattern: re.Pattern[bytes] | None

    def __init__(self, internal: str, client: str, items: list[str] | None) -> None:
        self.internal = internal
        self._needle = self.internal_b = internal.encode()
        # The replacement goes inside a JSON string: escaped as one.
        self._single = orjson.dumps(client)[1:-1]
        self._items = None if items is None else [orjson.dumps(i)[1:-1] for i in items]
        self.single, self.batch = self._single, self._items  # read by StreamGuard's fast path
        # A pattern only for a batch: compiling one per request (each id is new, so re's cache never
        # hits) would cost more than the rest of the request's handling here.
        self._pattern = None if items is None else re.compile(re.escape(self._needle) + rb"-(\d+)")

    def __call__(self, data: bytes) -> bytes:
        if self._needle not in data:
            return data
        if self._items is None or self._pattern is None:
            return data.replace(self._needle, self._single)
        items = self._items

        def swap(m: re.Match[bytes]) -> bytes:
            i = int(m.group(1))
            return items[i] if i < len(items) else m.group(0)

        return self._pattern.sub(swap, data)


def _aborted(doc: dict[str, Any]) -> bool:
    for choice in doc.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason") == "abort":
            return True
    meta = doc.get("meta_info")
    if isinstance(meta, dict):
        reason = meta.get("finish_reason")
        if reason == "abort" or (isinstance(reason, dict) and reason.get("type") == "abort"):
            return True
    return False


def _failure_of(doc: object) -> str | None:
    """Why a decoded answer (or one streamed event) is a failure, or None."""
    if isinstance(doc, list):  # a batch /generate answers with one object per prompt
        for item in doc:
            reason = _failure_of(item)
            if reason is not None:
                return reason
        return None
    if not isinstance(doc, dict):
        return None
    err = doc.get("error")
    if err is not None:
        message = err.get("message") if isinstance(err, dict) else err
        return f"worker error: {message}"
    return _ABORTED if _aborted(doc) else None


def whole_answer_failure(body: bytes) -> str | None:
    """Why a worker's 2xx whole answer is a failure, or None (cheap when it is not)."""
    if b"abort" not in body and b'"error"' not in body:
        return None
    try:
        return _failure_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def failure_event(message: str) -> bytes:
    return b"data: " + error_body(502, message, code="request_failed") + b"\n\n"


class StreamGuard:
    """Passes a worker's SSE stream on event by event (an event split across reads is held back until
    its end arrives), renaming ids and turning a failure into an error event.

    `failure` is set at the first sign of one; `worker_sent_error` says the worker itself sent the
    error event (nothing is added then)."""

    __slots__ = ("_rename", "_partial", "_output_seen", "failure", "worker_sent_error", "_told")

    def __init__(self, rename: IdRewriter) -> None:
        self._rename = rename
        self._partial = b""
        self._output_seen = False
        self.failure: str | None = None
        self.worker_sent_error = False
        self._told = False  # the client has been sent an error event (the worker's or ours)

    def feed(self, data: bytes) -> bytes:
        """The bytes to send the client for `data`, the next bytes of the stream."""
        # Fast path, once output has been seen: whole events (as workers write them) with no sign of
        # a failure; this runs once per streamed event, so it is kept to a few C-level scans.
        if self._output_seen and not self._partial and data.endswith(b"\n\n") \
                and b"abort" not in data and b'"error"' not in data:
            rename = self._rename
            if rename.internal_b not in data:
                return data
            return data.replace(rename.internal_b, rename.single) if rename.batch is None else rename(data)
        buf = self._partial + data if self._partial else data
        cut = buf.rfind(b"\n\n") + 2
        if cut < 2:
            cut = buf.rfind(b"\r\n\r\n") + 4
            if cut < 4:
                if len(buf) > _MAX_PARTIAL:  # not SSE as workers write it: pass it on as it is
                    self._partial = b""
                    return self._rename(buf)
                self._partial = buf
                return b""
        if cut == len(buf):
            complete, self._partial = buf, b""
        else:
            complete, self._partial = buf[:cut], buf[cut:]
        # The common event (output, no failure) costs two substring scans and the id rename.
        if self._output_seen and b"abort" not in complete and b'"error"' not in complete:
            return self._rename(complete)
        return self._rename(self._inspect(complete))

    def end(self) -> bytes:
        """Bytes still held back when the stream ends (an unterminated last event)."""
        rest, self._partial = self._partial, b""
        return self._rename(self._inspect(rest)) if rest else b""

    def _inspect(self, complete: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        for m in _EVENT_END.finditer(complete):
            out.extend(self._event(complete[pos : m.end()]))
            pos = m.end()
        if pos < len(complete):
            out.extend(self._event(complete[pos:]))
        return b"".join(out)

    def _event(self, event: bytes) -> list[bytes]:
        payload = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
        if not payload:
            return [event]  # a comment or keep-alive
        if payload == b"[DONE]":
            if not self._output_seen and not self._told:
                self._fail(_EMPTY)
                return [failure_event(_EMPTY), event]
            return [event]
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._output_seen = True
            return [event]
        reason = _failure_of(doc)
        if reason is None:
            self._output_seen = True
            return [event]
        self._fail(reason)
        if isinstance(doc, dict) and "error" in doc:
            self.worker_sent_error = True
            self._told = True
            return [event]
        if self._told:
            return [event]
        self._told = True
        return [event, failure_event(reason)]

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
