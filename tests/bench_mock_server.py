"""A mock OpenAI/SGLang streaming server with set delays: the far side for the serving-benchmark tests.

    python tests/bench_mock_server.py --port 0 --ttft-ms 20 --itl-ms 2 [--fail-every 4]

Prints ``PORT <n>`` on stdout once listening. Streams the first chunk after ``--ttft-ms``, then one
every ``--itl-ms``, each of ``--tokens-per-chunk`` tokens (default 1), for exactly ``max_tokens`` tokens
(it never stops early: EOS is not modelled).
``--fail-every k`` answers every k-th generation request with HTTP 500 and an OpenAI error body;
``--fail-midstream-every k`` sends an error event after the first token instead. ``--kv-connector`` sets
the header a worker running a benchmarking KV connector would set.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from typing import Any

import orjson
from aiohttp import web

KV_CONNECTOR_HEADER = "x-tandem-kv-connector"


class MockServer:
    """Request handlers sharing one counter, so failures land on a predictable share of requests."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._counter = itertools.count(1)

    def _error(self, status: int, message: str) -> web.Response:
        body = {"error": {"message": message, "type": "mock_error", "code": status}}
        return web.json_response(body, status=status, dumps=lambda v: orjson.dumps(v).decode())

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-model", "object": "model"}]})

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _stream(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body: dict[str, Any] = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "body is not JSON")
        number = next(self._counter)
        if self.args.fail_every and number % self.args.fail_every == 0:
            return self._error(500, "injected failure")
        if kind == "sglang":
            params = body.get("sampling_params") or {}
            max_tokens, prompt = params.get("max_new_tokens"), body.get("input_ids", body.get("text"))
        elif kind == "chat":
            max_tokens = body.get("max_tokens")
            prompt = " ".join(m["content"] for m in body.get("messages") or [])
        else:
            max_tokens, prompt = body.get("max_tokens"), body.get("prompt")
        if not isinstance(max_tokens, int) or max_tokens < 1 or prompt is None:
            return self._error(400, "max_tokens must be a positive integer and a prompt is required")
        if not body.get("stream"):
            return self._error(400, "the mock only streams")
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if self.args.kv_connector:
            response.headers[KV_CONNECTOR_HEADER] = self.args.kv_connector
        await response.prepare(request)
        await asyncio.sleep(self.args.ttft_ms / 1e3)
        fail_midstream = bool(self.args.fail_midstream_every and number % self.args.fail_midstream_every == 0)
        per_chunk = self.args.tokens_per_chunk
        for chunk_index, first in enumerate(range(0, max_tokens, per_chunk)):
            if chunk_index:
                await asyncio.sleep(self.args.itl_ms / 1e3)
            if fail_midstream and chunk_index == 1:
                event: dict[str, Any] = {"error": {"message": "injected mid-stream failure", "code": 500}}
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
                return response
            last = min(first + per_chunk, max_tokens)
            chunk = self._chunk(kind, first, last, max_tokens, prompt_tokens)
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if include_usage and kind != "sglang":
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                     "total_tokens": prompt_tokens + max_tokens}
            await response.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    def _chunk(kind: str, first: int, last: int, max_tokens: int, prompt_tokens: int) -> dict[str, Any]:
        """The event carrying tokens ``first`` to ``last - 1``."""
        text = "".join(f" t{i}" for i in range(first, last))
        finish = "length" if last == max_tokens else None
        if kind == "sglang":
            meta = {"prompt_tokens": prompt_tokens, "completion_tokens": last,
                    "finish_reason": {"type": "length"} if finish else None}
            # Like SGLang's events: every output id so far (a chat client appends them to its history).
            return {"text": text, "output_ids": [1000 + i for i in range(last)], "meta_info": meta}
        if kind == "chat":
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
        return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "chat")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "sglang")


def build_app(args: argparse.Namespace) -> web.Application:
    server = MockServer(args)
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/health", server.health)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/generate", server.generate)
    return app


async def _serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(build_app(args), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=2.0)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fail-midstream-every", type=int, default=0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--kv-connector", default="")
    try:
        asyncio.run(_serve(p.parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
