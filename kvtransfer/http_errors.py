"""Tandem's HTTP error answers for every aiohttp server (workers, bootstrap service); the body itself is
``kvtransfer.protocol.error_document``'s, which the router writes too.

DESIGN.md: a bad request is a 4xx and a worker fault a 5xx, both with OpenAI's body
`{"error": {"message", "type", "code", "param"}}`. It lives in `kvtransfer` because the bootstrap service
(here) and the workers (`engine.server`, which may import `kvtransfer`) both answer with it; the
middleware turns aiohttp's own answers (404 no such route, 405 wrong method, 413 body too large), which
are plain text, into the same body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from kvtransfer.protocol import error_document

_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          413: "request_too_large", 415: "unsupported_media_type"}


def error_response(status: int, message: str, code: str | int | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = msgspec.json.encode(error_document(status, message, code, param))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's HTTP exceptions (raised by routing or by a handler) as the JSON error body. Redirects and
    successes pass through; anything else propagates (aiohttp answers it as a 500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no route {request.method} {request.path}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        return error_response(exc.status, message, _CODES.get(exc.status, exc.status), headers=headers)
