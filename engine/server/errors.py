"""The worker API's client error: a 4xx with OpenAI's body (`kvtransfer.http_errors` writes it)."""

from __future__ import annotations


class RequestError(ValueError):
    """A client error: becomes a 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param  # OpenAI's `param`: the request field at fault, where one is
