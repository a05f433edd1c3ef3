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
from kvtransfer import protocol as pd

from ..chat_template import ChatTemplate
from . import responses
from .chat_output import ChatOutputSplitter
from .detokenize import IncrementalDetokenizer
from .messages import GenerateRequest, TokenOutput
from .protocol import ParsedRequest, RequestError, TextCodec, error_document, parse_request
from .replies import (
    echo_logprobs,
    generate_response,
    merge_parts,
    openai_choice,
    openai_chunk,
    openai_logprobs,
    openai_response,
    sglang_input_logprobs,
    splitter_for,
    usage,
    vllm_prompt_logprobs,
)

MAX_BODY_BYTES = 32 * 1024 * 1024
# The per-DP-group gauges of /metrics (`tandem_worker_dp_<key>{dp_rank="g"}`), from `dp_groups` of the info.
DP_GROUP_METRICS = ("running_requests", "queued_requests", "tokens_in_flight", "free_pages")


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
    tool_call_parser: str | None = None  # "deepseekv3": chat `tools` honoured (engine.server.tools)
    reasoning_parser: str | None = None  # "deepseek-r1": chat answers split into reasoning and content


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
        self.created = int(time.time())  # the models' `created`: when this server started serving them

    def build(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[http_errors.json_errors])
        app.router.add_post("/generate", self._handler("generate"))
        app.router.add_post("/v1/completions", self._handler("completion"))
        app.router.add_post("/v1/chat/completions", self._handler("chat"))
        app.router.add_post("/v1/responses", self._handler("responses"))
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id:.+}", self.model)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/get_load", self.get_load)
        app.router.add_post("/abort_request", self.abort_request)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def _card(self) -> dict[str, Any]:
        return {"id": self.config.served_model, "object": "model", "owned_by": "tandem", "created": self.created,
                "max_model_len": self.config.max_context}

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._card()]})

    async def model(self, request: web.Request) -> web.Response:
        """OpenAI's `GET /v1/models/{model}`: the card, or a 404 `model_not_found` as OpenAI and vLLM answer."""
        model_id = request.match_info["model_id"]
        if model_id != self.config.served_model:
            return error_response(f"The model `{model_id}` does not exist.", 404, "model_not_found", "model")
        return json_response(self._card())

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
        info = self.backend.info()
        for key, value in info.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                lines.append(f"tandem_worker_{key} {value}")
        # Per attention-DP group, labelled by its rank (the sums above hide an idle group beside a full one).
        for group in info.get("dp_groups", ()):
            for key in DP_GROUP_METRICS:
                lines.append(f'tandem_worker_dp_{key}{{dp_rank="{group["dp_rank"]}"}} {group.get(key, 0)}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def get_load(self, request: web.Request) -> web.Response:
        """SGLang's `/get_load`, kept small for routers that poll it often: the per-DP-group load alone."""
        info = self.backend.info()
        groups = info.get("dp_groups", [])
        return json_response({"dp_size": self.config.extra_info.get("dp_size", len(groups) or 1),
                              "dp_groups": groups})

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
            check_media_type(request.headers.get("Content-Type"))
            raw = await request.read()
            body = orjson.loads(raw)
            if kind == "responses":  # served as the chat request it means (engine.server.responses)
                body = responses.to_chat_body(body)
            parsed = parse_request(body, "chat" if kind == "responses" else kind, self.codec, self.config.vocab_size, self.config.served_model,
                                   self.config.max_context, self.config.chat_template,
                                   header_rid=request.headers.get("X-Request-ID") or None,
                                   tool_call_parser=self.config.tool_call_parser,
                                   reasoning_parser=self.config.reasoning_parser,
                                   # On prefill `data_parallel_rank` names the decode instance's group.
                                   dp_size=None if self.config.role == "prefill"
                                   else int(self.config.extra_info.get("dp_size", 1)))
        except web.HTTPRequestEntityTooLarge:
            self.num_errors += 1
            return error_response(f"the request body exceeds {MAX_BODY_BYTES} bytes", 413)
        except orjson.JSONDecodeError:
            self.num_errors += 1
            return error_response("the request body is not valid JSON", 400)
        except RequestError as exc:
            self.num_errors += 1
            return error_response(str(exc), exc.status, exc.code, exc.param)
        if kind == "responses":  # its output has no reasoning part: the text is all output_text
            parsed.responses, parsed.reasoning = True, False
        if self._admit is not None:
            try:
                for engine_request in parsed.requests:  # one look-up per prefill host: cached after the first
                    await self._admit(engine_request)
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
                await asyncio.shield(self._abort_all(parsed))

    async def _abort_all(self, parsed: ParsedRequest, finished: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        for i, req in enumerate(parsed.requests):
            if i not in finished:
                await self.backend.abort(req.rid)

    async def _stop_early(self, rid: str, out: TokenOutput) -> TokenOutput:
        """A stop string ended the text with `out`: end the engine's request there too (unless it ended
        already). Returns `out` as the last output, finished with reason "stop"."""
        if not out.finished:
            await self.backend.abort(rid)
        return dataclasses.replace(out, finished=True, finish_reason="stop")

    async def _collect_one(self, parsed: ParsedRequest, index: int) -> Choice:
        choice = Choice(index, IncrementalDetokenizer(self.codec, parsed.stop, parsed.include_stop))
        rid = parsed.requests[index].rid
        async for out in self.backend.submit(parsed.requests[index]):
            choice.detok.push(out.token_ids)
            choice.logprobs.extend(out.logprobs)
            choice.tops.extend(out.top_logprobs)
            choice.last = out
            choice.cached = out.cached_tokens if out.cached_tokens is not None else choice.cached
            choice.reused = out.kv_reused_tokens if out.kv_reused_tokens is not None else choice.reused
            if out.prompt_logprobs:
                choice.prompt_logprobs, choice.prompt_tops = out.prompt_logprobs, out.prompt_top_logprobs
            if choice.detok.stopped is not None:
                choice.last = await self._stop_early(rid, out)
                break
        if choice.last is None or choice.last.error is not None:
            raise ChoiceFailed(choice.last)
        choice.detok.flush()
        return choice

    async def _collect(self, parsed: ParsedRequest) -> web.Response:
        tasks = [asyncio.ensure_future(self._collect_one(parsed, i)) for i in range(len(parsed.requests))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
        failed = next((t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
        if failed is not None:  # one choice failed: the request fails, and its other choices stop
            await self._abort_all(parsed, {i for i, t in enumerate(tasks) if t.done() and not t.cancelled()
                                           and t.exception() is None})
            if isinstance(failed, ChoiceFailed):
                return self._failed(failed.last)
            raise failed
        choices = [t.result() for t in tasks]
        prompts = [len(r.input_ids) for r in parsed.requests]
        scored = parsed.request.prompt_logprobs >= 0
        if parsed.responses:
            c = choices[0]
            doc = responses.response_object(parsed.response_id, parsed.model, c.detok.text, c.finish_reason,
                                            prompts[0], len(c.detok.ids))
            return with_reuse_header(choices, json_response(doc))
        if parsed.kind == "generate":
            docs = [generate_response(parsed, c.index, c.detok.text, c.detok.ids, c.finish_reason, prompts[c.index],
                                      c.logprobs, c.tops, self.codec, c.cached) for c in choices]
            for doc, c in zip(docs, choices, strict=True):
                if c.finish_reason == "stop":
                    doc["meta_info"]["finish_reason"]["matched"] = matched_stop(c.detok, c.finish_reason)
            if scored:
                for doc, c in zip(docs, choices, strict=True):
                    doc["meta_info"].update(sglang_input_logprobs(parsed, self.codec, parsed.requests[c.index].input_ids,
                                                                  c.prompt_logprobs, c.prompt_tops))
            return with_reuse_header(choices, json_response(docs if parsed.batch or parsed.n > 1 else docs[0]))
        docs = []
        for c in choices:
            logprobs = openai_logprobs(parsed, self.codec, c.detok.ids, c.logprobs, len(parsed.echo_prompts[c.index]),
                                       c.tops)
            prompt = parsed.requests[c.index].input_ids
            if scored and parsed.echo_logprobs:
                logprobs = echo_logprobs(self.codec, prompt, c.prompt_logprobs, c.prompt_tops, logprobs,
                                         parsed.request.top_logprobs)
            doc = openai_choice(parsed, c.index, c.detok.text, c.finish_reason, logprobs)
            doc["matched_stop"] = matched_stop(c.detok, c.finish_reason)
            if scored and not parsed.echo_logprobs and parsed.kind == "completion":
                doc["prompt_logprobs"] = vllm_prompt_logprobs(self.codec, prompt, c.prompt_logprobs, c.prompt_tops)
            docs.append(doc)
        body = openai_response(parsed, docs, prompt_tokens(parsed), sum(len(c.detok.ids) for c in choices),
                               cached_tokens(parsed, choices))
        if scored and parsed.kind == "chat":  # vLLM puts a chat's prompt logprobs beside its choices
            body["prompt_logprobs"] = vllm_prompt_logprobs(self.codec, parsed.request.input_ids,
                                                           choices[0].prompt_logprobs, choices[0].prompt_tops)
        return with_reuse_header(choices, json_response(body))

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
        streams = [aiter(self.backend.submit(r)) for r in parsed.requests]
        # A request refused before its first token (bad input, an unusable peer) gets its HTTP status,
        # not a 200 whose stream carries the error: clients and the router see the status first.
        firsts = await asyncio.gather(*(anext(s, None) for s in streams))
        bad = next((f for f in firsts if f is None or f.error is not None), False)
        if bad is not False:
            await self._abort_all(parsed, {i for i, f in enumerate(firsts) if f is not None and f.finished})
            return self._failed(bad)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **reuse_header(firsts[0].kv_reused_tokens, firsts[0].prompt_tokens)})  # type: ignore[union-attr]
        await response.prepare(request)
        created = int(time.time())
        choices = [StreamedChoice(i, IncrementalDetokenizer(self.codec, parsed.stop, parsed.include_stop), parsed.echo_prompts[i],
                                  splitter=splitter_for(parsed)) for i in range(len(parsed.requests))]
        queue: asyncio.Queue[tuple[int, TokenOutput | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for out in _prepend(firsts[index], streams[index]):  # type: ignore[arg-type]
                    await queue.put((index, out))
            finally:
                await queue.put((index, None))

        pumps = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
        done: set[int] = set()
        events = _ResponsesEvents(parsed, created, response) if parsed.responses else None
        if events is not None:
            await events.start()
        try:
            while len(done) < len(streams):
                index, out = await queue.get()
                if out is None:
                    done.add(index)
                    continue
                if index in done:
                    continue
                if out.error is not None:
                    self.num_errors += 1
                    err = error_document(out.error_status, out.error, out.error_code)
                    await response.write(b"data: " + orjson.dumps(err) + b"\n\n")
                    await self._abort_all(parsed, done | {index})
                    break
                chunk, ended = await self._stream_step(parsed, choices[index], out, created)
                if chunk is not None and events is not None:
                    await events.delta(chunk["choices"][0]["delta"].get("content") or "")
                elif chunk is not None:
                    await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if ended:
                    done.add(index)
        finally:
            for task in pumps:
                task.cancel()
        if events is not None:  # the Responses stream ends with its completed event, no [DONE]
            last = choices[0]
            await events.finish(last.detok.text, last.finish_reason, len(parsed.request.input_ids),
                                len(last.detok.ids))
            await response.write_eof()
            return response
        if parsed.include_usage and parsed.kind != "generate":
            tail = openai_chunk(parsed, "", None, created)
            tail["choices"] = []
            tail["usage"] = usage(prompt_tokens(parsed), sum(len(c.detok.ids) for c in choices),
                                  cached_tokens(parsed, choices))
            await response.write(b"data: " + orjson.dumps(tail) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stream_step(self, parsed: ParsedRequest, choice: StreamedChoice, out: TokenOutput, created: int
                           ) -> tuple[dict | None, bool]:
        """The chunk (or None: held back) for one output of `choice`, and whether the choice has ended."""
        detok = choice.detok
        delta = detok.push(out.token_ids) if not out.finished else detok.push(out.token_ids) + detok.flush()
        choice.logprobs.extend(out.logprobs)
        choice.tops.extend(out.top_logprobs)
        choice.cached = out.cached_tokens if out.cached_tokens is not None else choice.cached
        rid = parsed.requests[choice.index].rid
        if detok.stopped is not None:
            out = await self._stop_early(rid, out)
        reason = out.finish_reason if out.finished else None
        choice.finish_reason = reason or choice.finish_reason
        if parsed.kind == "generate":
            prompt = len(parsed.requests[choice.index].input_ids)
            doc = generate_response(parsed, choice.index, detok.text, list(detok.ids), reason, prompt,
                                    choice.logprobs, choice.tops, self.codec, choice.cached)
            if reason == "stop":
                doc["meta_info"]["finish_reason"]["matched"] = matched_stop(detok, reason)
            return doc, out.finished
        choice.unsent += len(out.token_ids)
        if not delta and not out.finished and not choice.echo:
            return None, False
        ids = detok.ids[len(detok.ids) - choice.unsent :]
        logprobs = openai_logprobs(parsed, self.codec, ids, choice.logprobs[len(choice.logprobs) - choice.unsent :],
                                   choice.text_sent, choice.tops[len(choice.tops) - choice.unsent :])
        text = choice.echo + delta  # a completion's echoed prompt goes out with its first chunk
        parts = None
        if choice.splitter is not None:  # chat: reasoning, content and tool calls apart
            pieces = choice.splitter.feed(delta) + (choice.splitter.finish() if out.finished else [])
            parts = merge_parts(pieces)
            if out.finished and choice.splitter.tool_calls:
                reason = "tool_calls"
            if not parts and not out.finished and choice.sent_any:
                return None, False  # all held back (a marker may be forming): the tokens go with a later chunk
        chunk = openai_chunk(parsed, text, reason, created, first=not choice.sent_any, logprobs=logprobs,
                             index=choice.index, parts=parts)
        if parsed.continuous_usage:
            chunk["usage"] = usage(len(parsed.requests[choice.index].input_ids), len(detok.ids), choice.cached)
        if out.finished:
            chunk["choices"][0]["matched_stop"] = matched_stop(detok, reason)
        choice.sent_any, choice.unsent, choice.echo = True, 0, ""
        choice.text_sent += len(delta)
        return chunk, out.finished


def check_media_type(content_type: str | None) -> None:
    """A body is JSON: one labelled otherwise (an HTML form's `application/x-www-form-urlencoded`) is a 415.
    An unlabelled one is read as JSON, as curl-less clients send it."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise RequestError(f"the request body must be application/json, not {media}", status=415,
                           code="unsupported_media_type")


def matched_stop(detok: IncrementalDetokenizer, finish_reason: str | None) -> str | int | None:
    """SGLang's `matched_stop`: the stop string that ended the text, else the token that did (EOS or a stop
    token id), None when it did not end by a stop."""
    if finish_reason != "stop":
        return None
    if detok.stopped is not None:
        return detok.stopped
    return detok.ids[-1] if detok.ids else None


def prompt_tokens(parsed: ParsedRequest) -> int:
    """Prompt tokens of the answer's usage: each prompt once, however many choices sample it (OpenAI's and
    vLLM's count)."""
    return sum(len(r.input_ids) for i, r in enumerate(parsed.requests) if i % parsed.n == 0)


def cached_tokens(parsed: ParsedRequest, choices: list[Choice] | list[StreamedChoice]) -> int | None:
    """Prompt tokens served by the prefix cache, counted like `prompt_tokens` (each prompt once); None when
    no choice knows (a decode worker's disaggregated requests)."""
    known = [c.cached for c in choices if c.index % parsed.n == 0 and c.cached is not None]
    return sum(known) if known else None


def reuse_header(reused: int | None, prompt_tokens: int) -> dict[str, str]:
    """Decode-side reuse (`kvtransfer.protocol.KV_REUSED_HEADER`): a header, not a body field, so that
    OpenAI-shaped answers stay as they are and the router reads it from the head it parses anyway."""
    return {} if reused is None else {pd.KV_REUSED_HEADER: f"{reused}/{prompt_tokens}"}


def with_reuse_header(choices: list[Choice], response: web.Response) -> web.Response:
    """`response` with the decode-side reuse header of its first choice, where there is one."""
    if choices and choices[0].last is not None:
        response.headers.update(reuse_header(choices[0].reused, choices[0].last.prompt_tokens))
    return response


@dataclass
class Choice:
    """One choice of a whole answer as it is collected."""

    index: int
    detok: IncrementalDetokenizer
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    last: TokenOutput | None = None
    prompt_logprobs: list[float | None] = field(default_factory=list)  # when the request asked for them
    prompt_tops: list[list[tuple[int, float]]] = field(default_factory=list)
    cached: int | None = None  # prompt tokens from the prefix cache, when this instance prefilled the prompt
    reused: int | None = None  # decode-side reuse: prompt tokens whose KV this instance held already

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason if self.last is not None else None


@dataclass
class StreamedChoice:
    """One choice of a streamed answer: what was sent of it so far."""

    index: int
    detok: IncrementalDetokenizer
    echo: str = ""  # the echoed prompt, until the first chunk carries it
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    sent_any: bool = False
    finish_reason: str | None = None
    splitter: ChatOutputSplitter | None = None  # chat with tools or a reasoning parser
    unsent: int = 0  # output tokens not yet in a chunk (held back with a partial character)
    text_sent: int = 0  # characters of output text already sent, for completions' text_offset
    cached: int | None = None  # prompt tokens from the prefix cache, when this instance prefilled the prompt

    def __post_init__(self) -> None:
        self.text_sent = len(self.echo)


class _ResponsesEvents:
    """The events of a streamed Responses answer (one message, one text part), as OpenAI sends them."""

    def __init__(self, parsed: ParsedRequest, created: int, response: web.StreamResponse) -> None:
        self.parsed, self.created, self.response = parsed, created, response
        self.sequence = 0
        self.item = f"msg_{parsed.response_id}"

    async def _send(self, kind: str, **fields: Any) -> None:
        doc = responses.event(kind, self.sequence, **fields)
        self.sequence += 1
        await self.response.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n")

    def _object(self, text: str | None, reason: str | None = None, prompt: int = 0, output: int = 0) -> dict:
        return responses.response_object(self.parsed.response_id, self.parsed.model, text, reason, prompt, output,
                                         self.created)

    async def start(self) -> None:
        await self._send("response.created", response=self._object(None))
        await self._send("response.output_item.added", output_index=0, item={
            "type": "message", "id": self.item, "status": "in_progress", "role": "assistant", "content": []})
        await self._send("response.content_part.added", item_id=self.item, output_index=0, content_index=0,
                         part={"type": "output_text", "text": "", "annotations": []})

    async def delta(self, text: str) -> None:
        if text:
            await self._send("response.output_text.delta", item_id=self.item, output_index=0, content_index=0,
                             delta=text)

    async def finish(self, text: str, reason: str | None, prompt: int, output: int) -> None:
        whole = self._object(text, reason, prompt, output)
        part = whole["output"][0]["content"][0]
        await self._send("response.output_text.done", item_id=self.item, output_index=0, content_index=0, text=text)
        await self._send("response.content_part.done", item_id=self.item, output_index=0, content_index=0, part=part)
        await self._send("response.output_item.done", output_index=0, item=whole["output"][0])
        kind = "response.completed" if whole["status"] == "completed" else "response.incomplete"
        await self._send(kind, response=whole)


class ChoiceFailed(Exception):
    def __init__(self, last: TokenOutput | None) -> None:
        super().__init__(last.error if last is not None else "no output")
        self.last = last


async def _prepend(first: TokenOutput, rest: AsyncIterator[TokenOutput]) -> AsyncIterator[TokenOutput]:
    yield first
    async for out in rest:
        yield out
