"""The aiohttp application: OpenAI-compatible and SGLang-native endpoints, health, metrics, admin API.

`create_app(config)` builds everything; the app's start-up and clean-up hooks own the RouterState.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re

import orjson
from aiohttp import web

from router.config import Role, RouterConfig, WorkerSpec
from router.errors import RouterError, error_body
from router.inbound import Kind, parse_inbound
from router.proxy import Proxy, passthrough_response
from router.state import RouterState
from router.upstream import UpstreamError, build_request

log = logging.getLogger("router.app")
STATE_KEY = web.AppKey("router_state", RouterState)
_RID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_MODELS_TIMEOUT_S = 10.0


def _json(status: int, doc: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


def _error(exc: RouterError, rid: str | None = None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if rid is not None:
        headers["X-Request-ID"] = rid
    return web.Response(body=exc.body(), status=exc.status, headers=headers)


class Handlers:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.proxy = Proxy(state)
        key = state.config.api_key
        self._expected_auth = f"Bearer {key}".encode() if key else None

    def _check_auth(self, request: web.Request) -> None:
        if self._expected_auth is None:
            return
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._expected_auth):
            raise RouterError(401, "missing or wrong API key", code="invalid_api_key")

    # -- inference --------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, Kind.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, Kind.COMPLETION)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, Kind.GENERATE)

    async def _inference(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        state = self.state
        stats = state.stats
        headers = request.headers
        rid = headers.get("X-Request-ID")
        if rid is None or not _RID_OK.fullmatch(rid):
            rid = os.urandom(12).hex()
        try:
            self._check_auth(request)
            limit = state.config.max_inflight
            if limit and stats.in_flight >= limit:
                stats.rejected_backpressure += 1
                raise RouterError(503, f"router is at its limit of {limit} requests in flight",
                                  code="overloaded", retry_after_s=1)
            if (request.content_length or 0) > state.config.max_body_bytes:
                raise RouterError(413, f"request body over {state.config.max_body_bytes} bytes",
                                  code="body_too_large")
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise RouterError(413, f"request body over {state.config.max_body_bytes} bytes",
                                  code="body_too_large") from None
            inbound = parse_inbound(raw, kind)
            fwd = b"X-Request-ID: " + rid.encode() + b"\r\n"
            for name in ("traceparent", "tracestate"):
                value = headers.get(name)
                if value is not None and "\r" not in value and "\n" not in value:
                    fwd += f"{name}: {value}\r\n".encode("latin-1", "replace")
            stats.in_flight += 1
            try:
                return await self.proxy.forward(request, inbound, rid, fwd)
            finally:
                stats.in_flight -= 1
        except RouterError as exc:
            if exc.status < 500:
                stats.count_error(f"client_{exc.status}")
            elif exc.code in ("no_worker", "overloaded"):
                stats.count_error(exc.code)
            return _error(exc, rid)

    async def abort_request(self, request: web.Request) -> web.Response:
        """SGLang's `POST /abort_request {"rid"}`: forwarded to both workers of that request."""
        try:
            self._check_auth(request)
            doc = await _read_json_object(request)
            rid = doc.get("rid")
            if not isinstance(rid, str):
                raise RouterError(400, "'rid' must be a string", param="rid")
        except RouterError as exc:
            return _error(exc)
        entry = self.state.active.get(rid)
        if entry is None:
            return _json(404, {"rid": rid, "aborted": False})
        prefill, decode, rids = entry
        for w in (prefill, decode):
            if w is not None:
                self.state.send_abort(w, rids)
        return _json(200, {"rid": rid, "aborted": True})

    # -- passthrough GETs -------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        state = self.state
        try:
            self._check_auth(request)
            candidates = state.registry.candidates(Role.DECODE) or state.registry.candidates(Role.PREFILL)
            if not candidates:
                raise RouterError(503, "no healthy worker", code="no_worker", retry_after_s=1)
            w = candidates[0]
            loop_time = asyncio.get_running_loop().time()
            try:
                conn = await state.pool.request(
                    w.host, w.port, build_request("GET", "/v1/models", w.netloc, b""), loop_time + _MODELS_TIMEOUT_S
                )
                body = await conn.read_all()
            except UpstreamError as exc:
                raise RouterError(502, f"worker {w.url} did not answer /v1/models: {exc}") from None
            return passthrough_response(conn.status, conn.content_type(), body, "models")
        except RouterError as exc:
            return _error(exc)

    async def health(self, request: web.Request) -> web.Response:
        reg = self.state.registry
        n_prefill = len(reg.candidates(Role.PREFILL))
        n_decode = len(reg.candidates(Role.DECODE))
        ok = n_decode > 0 and (n_prefill > 0 or not reg.has_role(Role.PREFILL))
        return _json(200 if ok else 503, {"status": "ok" if ok else "unavailable", "pid": os.getpid(),
                                          "prefill_healthy": n_prefill, "decode_healthy": n_decode})

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.state.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- admin ------------------------------------------------------------------------------------
    async def list_workers(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except RouterError as exc:
            return _error(exc)
        return _json(200, {"workers": [w.describe() for w in self.state.registry.all_workers()]})

    async def add_worker(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
            doc = await _read_json_object(request)
            url, role, port = doc.get("url"), doc.get("role"), doc.get("bootstrap_port")
            if not isinstance(url, str) or role not in ("prefill", "decode"):
                raise RouterError(400, "body must be {'url': str, 'role': 'prefill'|'decode', "
                                       "'bootstrap_port': int (prefill, optional)}")
            if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
                raise RouterError(400, "'bootstrap_port' must be an integer", param="bootstrap_port")
            try:
                spec = WorkerSpec(url, Role(role), port)
            except ValueError as exc:
                raise RouterError(400, str(exc)) from None
            worker = self.state.registry.add(spec)
            worker.next_probe_at = 0.0  # probe it at once
        except RouterError as exc:
            return _error(exc)
        return _json(201, worker.describe())

    async def remove_worker(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
            url = request.query.get("url")
            if not url:
                raise RouterError(400, "query parameter 'url' is required", param="url")
            worker = self.state.registry.remove(url)
        except RouterError as exc:
            return _error(exc)
        removed = self.state.registry.get(worker.url) is None
        return _json(200 if removed else 202, {"url": worker.url, "draining": not removed,
                                               "removed": removed, "in_flight": worker.in_flight})


async def _read_json_object(request: web.Request) -> dict[str, object]:
    try:
        doc = orjson.loads(await request.read())
    except (orjson.JSONDecodeError, web.HTTPRequestEntityTooLarge) as exc:
        raise RouterError(400, f"body must be a JSON object: {exc}") from None
    if not isinstance(doc, dict):
        raise RouterError(400, "body must be a JSON object")
    return doc


async def _not_found(request: web.Request) -> web.Response:
    return web.Response(body=error_body(404, f"no route {request.method} {request.path}"), status=404,
                        headers={"Content-Type": "application/json"})


def create_app(config: RouterConfig) -> web.Application:
    """The router as an aiohttp app. Serve it with `handler_cancellation=True` (router.server does)
    so that a client disconnect cancels the handler and both workers are aborted at once."""
    state = RouterState(config)
    h = Handlers(state)
    # +1: aiohttp refuses bodies *over* client_max_size; the handler then answers 413 in OpenAI form.
    app = web.Application(client_max_size=config.max_body_bytes + 1)
    app[STATE_KEY] = state
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/generate", h.generate)
    app.router.add_post("/abort_request", h.abort_request)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/workers", h.list_workers)
    app.router.add_post("/workers", h.add_worker)
    app.router.add_delete("/workers", h.remove_worker)
    app.router.add_route("*", "/{tail:.*}", _not_found)  # JSON 404 instead of aiohttp's text one

    async def on_startup(app: web.Application) -> None:
        await state.start()

    async def on_cleanup(app: web.Application) -> None:
        await state.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
