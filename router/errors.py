"""OpenAI-style error bodies: `{"error": {"message", "type", "code"}}` (DESIGN.md, Errors and limits)."""

from __future__ import annotations

import orjson

# HTTP status -> OpenAI error type, for bodies the router writes itself.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """The JSON error document for `status`; `code` defaults to the status number as a string."""
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                "param": param,
                "code": code or str(status),
            }
        }
    )


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
