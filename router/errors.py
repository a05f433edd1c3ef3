"""OpenAI-style error bodies: `{"error": {"message", "type", "code"}}` (DESIGN.md, Errors and limits)."""

from __future__ import annotations

import orjson

from kvtransfer.protocol import error_document


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """The JSON error document for `status` (`kvtransfer.protocol.error_document`); `code` defaults to the
    status number as a string."""
    return orjson.dumps(error_document(status, message, code or str(status), param))


def is_openai_error(body: bytes) -> bool:
    """True when `body` already is an OpenAI-style error document (then it is passed on unchanged)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict) and "message" in doc["error"]


class RouterError(Exception):
    """A request the router answers itself with `status` and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code, self.param)


class BadRequest(RouterError):
    """The client's request is malformed or has a field of the wrong type (400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message, code="invalid_request", param=param)
