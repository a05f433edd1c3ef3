"""Mock prefill/decode workers for the router's tests and benchmark: the far side of the router.

A MockWorker is a real aiohttp server on a loopback port speaking the worker API the router uses
(`/generate`, `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`, `/abort_request`).
It records every body it receives, every `/abort_request` and every request whose client went away,
and its answers are scripted through `MockBehavior`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from router import RouterConfig, WorkerSpec
from router.app import RouterApp
from router.config import Role
from router.state import RouterState


@dataclass
class MockBehavior:
    status: int = 200  # an error status answers at once with `error_body`
    error_body: bytes = b'{"error": {"message": "scripted failure", "type": "server_error", "code": 500}}'
    delay_s: float = 0.0  # before the response head
    chunk_delay_s: float = 0.0  # between streamed events
    tokens: int = 3  # tokens generated (streamed events for stream=True)
    health_status: int = 200
    # Exact bytes to stream instead of generated events, written one piece per write (byte-exactness).
    raw_stream: list[bytes] | None = None
    die_after: int | None = None  # streamed events after which the connection is cut (a crash)
    body: bytes | None = None  # exact body of a 200 whole answer instead of a generated one
    headers: dict[str, str] = field(default_factory=dict)  # added to every 200 answer's head
    # Like the engine: a request named by /abort_request ends at once with finish_reason "abort" and
    # no further tokens (a stream with one such event, then [DONE]).
    honor_aborts: bool = False


@dataclass
class MockWorker:
    role: str
    behavior: MockBehavior = field(default_factory=MockBehavior)
    bodies: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)  # rids named by /abort_request
    disconnects: list[str] = field(default_factory=list)  # rids whose client went away mid-request
    health_checks: int = 0
    completed: list[str] = field(default_factory=list)  # rids answered in full (every token sent)
    keep_bodies: bool = True  # False: `bodies` keeps only each rid (tests with huge prompts)
    # `/get_load` (router.dp_routing): the per-DP-group report it answers with; None: a 404, as a worker
    # that gives none.
    dp_report: list[dict] | None = None
    load_polls: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> str:
        app = web.Application(client_max_size=64 << 20)  # the router, not the mock, limits bodies
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._infer)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id}", self._model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/get_load", self._get_load)
        app.router.add_post("/abort_request", self._abort)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        return web.Response(status=self.behavior.health_status, text="ok")

    async def _get_load(self, request: web.Request) -> web.Response:
        self.load_polls += 1
        if self.dp_report is None:
            return web.Response(status=404, text="no such route")
        return web.json_response({"dp_size": len(self.dp_report), "dp_groups": self.dp_report})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "mock-model", "object": "model", "created": 0, "owned_by": "tandem"}]})

    async def _model(self, request: web.Request) -> web.Response:
        if request.match_info["model_id"] != "mock-model":
            return web.json_response({"error": {"message": "no such model", "type": "invalid_request_error",
                                                 "param": "model", "code": "model_not_found"}}, status=404)
        return web.json_response({"id": "mock-model", "object": "model", "created": 0, "owned_by": "tandem"})

    async def _abort(self, request: web.Request) -> web.Response:
        self.aborts.append((await request.json())["rid"])
        return web.json_response({"ok": True})

    async def _sleep(self, rid: str, seconds: float) -> bool:
        """Sleep up to `seconds`; False as soon as `rid` is aborted (when the behaviour honours aborts)."""
        end = time.monotonic() + seconds
        while True:
            if self.behavior.honor_aborts and rid in self.aborts:
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, 0.01))

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.bodies.append(body if self.keep_bodies else {"rid": body.get("rid")})
        self.paths.append(request.path)
        b = self.behavior
        rid = body.get("rid", "")
        try:
            live = await self._sleep(rid, b.delay_s) if b.delay_s else True
            if b.status != 200:
                return web.Response(status=b.status, body=b.error_body, content_type="application/json")
            if not body.get("stream"):
                if not live:
                    return web.Response(status=499, body=b'{"error": {"message": "aborted", "type": "server_error",'
                                        b' "code": "abort"}}', content_type="application/json")
                self.completed.append(rid)
                answer = b.body if b.body is not None else orjson.dumps(_answer(request.path, body, b.tokens,
                                                                                self.role))
                return web.Response(body=answer, content_type="application/json", headers=b.headers)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **b.headers})
            await resp.prepare(request)
            pieces = b.raw_stream if b.raw_stream is not None else _events(request.path, body, b.tokens)
            for i, piece in enumerate(pieces):
                if not live or (b.chunk_delay_s and not await self._sleep(rid, b.chunk_delay_s)):
                    await resp.write(b"data: " + orjson.dumps({"text": "", "meta_info": {
                        "id": rid, "finish_reason": {"type": "abort"}}}) + b"\n\ndata: [DONE]\n\n")
                    await resp.write_eof()
                    return resp
                await resp.write(piece)
                if b.die_after is not None and i + 1 >= b.die_after and request.transport is not None:
                    request.transport.abort()
                    return resp
            await resp.write_eof()
            self.completed.append(rid)
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(rid)
            raise


def _answer(path: str, body: dict, n: int, role: str) -> dict:
    text = " ".join(f"t{i}" for i in range(n))
    usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
    if path == "/v1/chat/completions":
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "mock-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length", "logprobs": None}], "usage": usage}
    if path == "/v1/completions":
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "mock-model",
                "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                "usage": usage}
    return {"text": text, "meta_info": {"id": body.get("rid"), "role": role, "completion_tokens": n}}


def _events(path: str, body: dict, n: int) -> list[bytes]:
    out = []
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    for i in range(n):
        last = i == n - 1
        if path == "/v1/chat/completions":
            ev = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "mock-model",
                  "choices": [{"index": 0, "delta": {"role": "assistant", "content": f"t{i} "} if i == 0
                               else {"content": f"t{i} "}, "finish_reason": "length" if last else None}]}
        elif path == "/v1/completions":
            ev = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "mock-model",
                  "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": "length" if last else None}]}
        else:
            ev = {"text": f"t{i} ", "meta_info": {"id": body.get("rid"), "completion_tokens": i + 1}}
        out.append(b"data: " + orjson.dumps(ev) + b"\n\n")
    if include_usage and path != "/generate":
        obj = "chat.completion.chunk" if path == "/v1/chat/completions" else "text_completion"
        out.append(b"data: " + orjson.dumps({"id": "x", "object": obj, "created": 1, "model": "mock-model",
                                             "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n,
                                                                      "total_tokens": 5 + n}}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


@dataclass
class Cluster:
    prefill: list[MockWorker]
    decode: list[MockWorker]
    router_url: str
    state: RouterState

    def worker(self, url: str) -> MockWorker:
        return next(w for w in (*self.prefill, *self.decode) if w.url == url)

    async def wait_until(self, predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.01)

    def assert_idle(self) -> None:
        """Nothing in flight anywhere in the router: the idle counts the tests check at the end."""
        st = self.state
        assert st.stats.in_flight == 0
        assert all(w.in_flight == 0 for w in st.registry.all_workers()), [w.describe() for w in
                                                                         st.registry.all_workers()]
        assert not st.active


@contextlib.asynccontextmanager
async def cluster(n_prefill: int = 1, n_decode: int = 1, dp_size: int = 0, **config: object) -> AsyncIterator[Cluster]:
    """Mock workers plus an in-process router in front of them (on loopback ports). `dp_size` > 0: every
    worker reports that many idle attention-DP groups on `/get_load`."""
    prefill = [MockWorker("prefill") for _ in range(n_prefill)]
    decode = [MockWorker("decode") for _ in range(n_decode)]
    for w in (*prefill, *decode):
        if dp_size:
            w.dp_report = [{"dp_rank": g, "tokens_in_flight": 0, "free_pages": 100} for g in range(dp_size)]
        await w.start()
    config.setdefault("health_interval_s", 0)  # tests that want probes turn them on
    cfg = RouterConfig(
        prefill=[WorkerSpec(w.url, Role.PREFILL, 9000 + i) for i, w in enumerate(prefill)],
        decode=[WorkerSpec(w.url, Role.DECODE) for w in decode],
        host="127.0.0.1",
        port=0,
        **config,  # type: ignore[arg-type]
    )
    app = RouterApp(cfg)
    await app.start()
    url = f"http://127.0.0.1:{app.port}"
    try:
        yield Cluster(prefill, decode, url, app.state)
    finally:
        await app.close()
        for w in (*prefill, *decode):
            await w.stop()
