"""The worker's aiohttp application: OpenAI-compatible and SGLang-native endpoints over a backend.

The backend (`EngineBackend`) is whatever runs the model — the rank processes of an instance in
production, anything that yields `TokenOutput`s in tests. The app owns validation, detokenization,
SSE framing, and abort on client disconnect; it never touches torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from kvtransfer import http_errors

from ..chat_template import ChatTemplate
from .detokenize import IncrementalDetokenizer
from .messages import GenerateRequest, TokenOutput
from .protocol import (
    ParsedRequest,
    RequestError,
    TextCodec,
    error_body,
    generate_response,
    openai_chunk,
    openai_logprobs,
    openai_response,
    parse_request,
    usage,
)

MAX_BODY_BYTES = 32 * 1024 * 1024


class EngineBackend(Protocol):
    def submit(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Runs a request; yields its outputs, the last with `finished` set."""
        ...

    async def abort(self, rid: str) -> None: ...

    def info(self) -> dict[str, Any]:
        """Load and pool counts for /server_info and /metrics."""
        ...


@dataclass
class ServerConfig:
    served_model: str
    vocab_size: int
    max_context: int
    role: str  # "prefill" | "decode" | "colocated"
    extra_info: dict[str, Any] = field(default_factory=dict)
    chat_template: ChatTemplate | None = None  # None: DeepSeek-V3's layout


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(message: str, status: int, code: str | None = None, param: str | None = None) -> web.Response:
    return http_errors.error_response(status, message, code, param)


class WorkerApp:
    """Routes and per-request plumbing; `build()` returns the aiohttp application."""

    def __init__(self, backend: EngineBackend, codec: TextCodec, config: ServerConfig,
                 metrics_text: Callable[[], bytes] | None = None,
                 admit: Callable[[GenerateRequest], Awaitable[None]] | None = None) -> None:
        self.backend = backend
        # Checked before a parsed request reaches the backend (raises RequestError to refuse it): a decode
        # worker looks the named prefill instance up here, off the rank loop (`serve.PrefillLookupGate`).
        self._admit = admit
        self.codec = codec
        self.config = config
        self._metrics_text = metrics_text
        self.num_requests = 0
        self.num_errors = 0
        self.inflight = 0

    def build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[http_errors.json_errors])
        app.router.add_post("/generate", self._handler("generate"))
        app.router.add_post("/v1/completions", self._handler("completion"))
        app.router.add_post("/v1/chat/completions", self._handler("chat"))
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/abort_request", self.abort_request)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.config.served_model, "object": "model", "owned_by": "tandem", "created": 0,
                "max_model_len": self.config.max_context}
        return json_response({"object": "list", "data": [card]})

    async def server_info(self, request: web.Request) -> web.Response:
        info = {"role": self.config.role, "served_model": self.config.served_model,
                "max_context": self.config.max_context, "inflight": self.inflight,
                "num_requests": self.num_requests, "num_errors": self.num_errors}
        info.update(self.config.extra_info)
        info.update(self.backend.info())
        return json_response(info)

    async def metrics(self, request: web.Request) -> web.Response:
        if self._metrics_text is not None:
            return web.Response(body=self._metrics_text(), content_type="text/plain")
        lines = [
            f"tandem_worker_requests_total {self.num_requests}",
            f"tandem_worker_errors_total {self.num_errors}",
            f"tandem_worker_inflight {self.inflight}",
        ]
        for key, value in self.backend.info().items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                lines.append(f"tandem_worker_{key} {value}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            return error_response("the request body is not valid JSON", 400)
        rid = body.get("rid") if isinstance(body, dict) else None
        if not isinstance(rid, str):
            return error_response("'rid' (string) is required", 400)
        await self.backend.abort(rid)
        return json_response({"success": True})

    def _handler(self, kind: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, kind)

        return handle

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.num_requests += 1
        try:
            raw = await request.read()
            body = orjson.loads(raw)
            parsed = parse_request(body, kind, self.codec, self.config.vocab_size,
                                   self.config.served_model, self.config.max_context, self.config.chat_template)
        except web.HTTPRequestEntityTooLarge:
            self.num_errors += 1
            return error_response(f"the request body exceeds {MAX_BODY_BYTES} bytes", 413)
        except orjson.JSONDecodeError:
            self.num_errors += 1
            return error_response("the request body is not valid JSON", 400)
        except RequestError as exc:
            self.num_errors += 1
            return error_response(str(exc), exc.status, exc.code, exc.param)
        rid = request.headers.get("X-Request-ID")
        if rid and "rid" not in body:
            parsed.request.rid = rid
        if self._admit is not None:
            try:
                await self._admit(parsed.request)
            except RequestError as exc:
                self.num_errors += 1
                return error_response(str(exc), exc.status, exc.code, exc.param)
        self.inflight += 1
        finished = False
        try:
            if parsed.stream:
                response = await self._stream(request, parsed)
            else:
                response = await self._collect(parsed)
            finished = True
            return response
        finally:
            self.inflight -= 1
            if not finished:  # client went away or the handler failed: stop the work
                await asyncio.shield(self.backend.abort(parsed.request.rid))

    async def _stop_early(self, parsed: ParsedRequest, out: TokenOutput) -> TokenOutput:
        """A stop string ended the text with `out`: end the engine's request there too (unless it ended
        already). Returns `out` as the last output, finished with reason "stop"."""
        if not out.finished:
            await self.backend.abort(parsed.request.rid)
        return dataclasses.replace(out, finished=True, finish_reason="stop")

    async def _collect(self, parsed: ParsedRequest) -> web.Response:
        detok = IncrementalDetokenizer(self.codec, parsed.stop)
        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        last: TokenOutput | None = None
        async for out in self.backend.submit(parsed.request):
            detok.push(out.token_ids)
            logprobs.extend(out.logprobs)
            tops.extend(out.top_logprobs)
            last = out
            if detok.stopped is not None:
                last = await self._stop_early(parsed, out)
                break
        if last is None or last.error is not None:
            return self._failed(last)
        detok.flush()
        text = detok.text
        prompt_tokens = len(parsed.request.input_ids)
        if parsed.kind == "generate":
            body = generate_response(parsed, text, detok.ids, last.finish_reason, prompt_tokens, logprobs, tops,
                                     self.codec)
        else:
            choice_logprobs = openai_logprobs(parsed, self.codec, detok.ids, logprobs, len(parsed.echo_prompt),
                                              tops)  # fmt: skip
            body = openai_response(parsed, text, last.finish_reason, prompt_tokens, len(detok.ids), choice_logprobs)
        return json_response(body)

    def _failed(self, last: TokenOutput | None) -> web.Response:
        """The error answer of a request that ended without its output: the status its runner chose (4xx:
        the request was at fault), 499 for an abort, 500 when the ranks said nothing."""
        self.num_errors += 1
        if last is None:
            return error_response("the request produced no output", 500, "no_output")
        if last.finish_reason == "abort":
            return error_response(last.error or "the request was aborted", 499, "aborted")
        return error_response(last.error or "the request failed", last.error_status, last.error_code)

    async def _stream(self, request: web.Request, parsed: ParsedRequest) -> web.StreamResponse:
        outputs = aiter(self.backend.submit(parsed.request))
        # A request refused before its first token (bad input, an unusable peer) gets its HTTP status,
        # not a 200 whose stream carries the error: clients and the router see the status first.
        first = await anext(outputs, None)
        if first is None or first.error is not None:
            return self._failed(first)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        detok = IncrementalDetokenizer(self.codec, parsed.stop)
        created = int(time.time())
        prompt_tokens = len(parsed.request.input_ids)
        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        sent_any = False
        unsent = 0  # output tokens not yet in a chunk (held back with a partial character)
        text_sent = 0  # characters of output text already sent, for completions' text_offset
        async for out in _prepend(first, outputs):
            if out.error is not None:
                self.num_errors += 1
                err = error_body(out.error, http_errors.error_type(out.error_status), out.error_code)
                await response.write(b"data: " + orjson.dumps(err) + b"\n\n")
                break
            delta = detok.push(out.token_ids) if not out.finished else detok.push(out.token_ids) + detok.flush()
            logprobs.extend(out.logprobs)
            tops.extend(out.top_logprobs)
            stopping = detok.stopped is not None
            if stopping:
                out = await self._stop_early(parsed, out)
            if parsed.kind == "generate":
                chunk = generate_response(parsed, detok.text, list(detok.ids),
                                          out.finish_reason if out.finished else None, prompt_tokens, logprobs, tops,
                                          self.codec)
            else:
                unsent += len(out.token_ids)
                if not delta and not out.finished:
                    continue
                ids = detok.ids[len(detok.ids) - unsent :]
                chunk_logprobs = openai_logprobs(parsed, self.codec, ids, logprobs[len(logprobs) - unsent :],
                                                 text_sent, tops[len(tops) - unsent :])  # fmt: skip
                chunk = openai_chunk(parsed, delta, out.finish_reason if out.finished else None, created,
                                     first=not sent_any, logprobs=chunk_logprobs)
                sent_any, unsent, text_sent = True, 0, text_sent + len(delta)
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if stopping:
                break
        if parsed.include_usage and parsed.kind != "generate":
            tail = openai_chunk(parsed, "", None, created)
            tail["choices"] = []
            tail["usage"] = usage(prompt_tokens, len(detok.ids))
            await response.write(b"data: " + orjson.dumps(tail) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _prepend(first: TokenOutput, rest: AsyncIterator[TokenOutput]) -> AsyncIterator[TokenOutput]:
    yield first
    async for out in rest:
        yield out
