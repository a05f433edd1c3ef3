"""The router's endpoints: OpenAI-compatible and SGLang-native inference, health, metrics, admin API.

`RouterApp(config)` builds everything; `start()` opens the port, `close()` stops it and releases the
RouterState (upstream connections, health checker, background tasks).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import socket

import orjson

from router.config import Role, RouterConfig, WorkerSpec
from router.errors import RouterError, error_body
from router.http_server import HttpConnection, HttpRequest, HttpServer
from router.inbound import Kind, check_media_type, parse_inbound
from router.proxy import Proxy, passthrough
from router.state import RouterState
from router.upstream import UpstreamError, build_request

log = logging.getLogger("router.app")
_RID_OK = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_MODELS_TIMEOUT_S = 10.0
_MODEL_PATH = re.compile(rb"/v1/models/[A-Za-z0-9._:%@+\-/]{1,256}")  # passed on to a worker as it is
# Bodies above this are parsed in a thread: parsing costs ~10 ms per MB on the event loop, where every
# other stream would wait for it; below it the hand-off to a thread (~50 µs) costs more than it saves.
_PARSE_IN_THREAD_BYTES = 1 << 20
_H_REQUEST_ID = b"\r\nx-request-id:"
_H_AUTH = b"\r\nauthorization:"
_H_CONTENT_TYPE = b"\r\ncontent-type:"
_H_TRACE = (b"\r\ntraceparent:", b"\r\ntracestate:")
_TRACE_NAMES = (b"traceparent: ", b"tracestate: ")


def _json(conn: HttpConnection, status: int, doc: object) -> None:
    conn.respond(status, orjson.dumps(doc))


def _error(conn: HttpConnection, exc: RouterError, rid: bytes | None = None) -> None:
    extra = b""
    if exc.retry_after_s is not None:
        extra += b"Retry-After: %d\r\n" % exc.retry_after_s
    if rid is not None:
        extra += b"X-Request-ID: " + rid + b"\r\n"
    conn.respond(exc.status, exc.body(), extra_headers=extra)


class Handlers:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.proxy = Proxy(state)
        key = state.config.api_key
        self._expected_auth = f"Bearer {key}".encode() if key else None

    def _check_auth(self, req: HttpRequest) -> None:
        if self._expected_auth is None:
            return
        given = req.find_header(_H_AUTH) or b""
        if not hmac.compare_digest(given, self._expected_auth):
            raise RouterError(401, "missing or wrong API key", code="invalid_api_key")

    # -- inference --------------------------------------------------------------------------------
    async def chat(self, req: HttpRequest, conn: HttpConnection) -> None:
        await self._inference(req, conn, Kind.CHAT)

    async def completions(self, req: HttpRequest, conn: HttpConnection) -> None:
        await self._inference(req, conn, Kind.COMPLETION)

    async def generate(self, req: HttpRequest, conn: HttpConnection) -> None:
        await self._inference(req, conn, Kind.GENERATE)

    async def responses(self, req: HttpRequest, conn: HttpConnection) -> None:
        await self._inference(req, conn, Kind.RESPONSES)

    async def _inference(self, req: HttpRequest, conn: HttpConnection, kind: Kind) -> None:
        state = self.state
        stats = state.stats
        rid = req.find_header(_H_REQUEST_ID)
        if rid is None or not _RID_OK.fullmatch(rid):
            rid = os.urandom(12).hex().encode()
        try:
            if self._expected_auth is not None:
                self._check_auth(req)
            limit = state.config.max_inflight
            if limit and stats.in_flight >= limit:
                stats.rejected_backpressure += 1
                raise RouterError(503, f"router is at its limit of {limit} requests in flight",
                                  code="overloaded", retry_after_s=1)
            check_media_type(req.find_header(_H_CONTENT_TYPE))
            if len(req.body) > _PARSE_IN_THREAD_BYTES:
                inbound = await asyncio.to_thread(parse_inbound, req.body, kind)
            else:
                inbound = parse_inbound(req.body, kind)
            fwd = b""  # trace context; the proxy adds the router's own X-Request-ID per attempt
            for key, name in zip(_H_TRACE, _TRACE_NAMES, strict=True):
                value = req.find_header(key)
                if value is not None and b"\n" not in value:
                    fwd += name + value + b"\r\n"
            stats.in_flight += 1
            try:
                await self.proxy.forward(conn, inbound, rid.decode(), rid, fwd)
            finally:
                stats.in_flight -= 1
        except RouterError as exc:
            if exc.status < 500:
                stats.count_error(f"client_{exc.status}")
            elif exc.code in ("no_worker", "overloaded"):
                stats.count_error(exc.code)
            _error(conn, exc, rid)

    async def abort_request(self, req: HttpRequest, conn: HttpConnection) -> None:
        """SGLang's `POST /abort_request {"rid"}`: forwarded to both workers of that request."""
        try:
            self._check_auth(req)
            doc = _json_object(req.body)
            rid = doc.get("rid")
            if not isinstance(rid, str):
                raise RouterError(400, "'rid' must be a string", param="rid")
        except RouterError as exc:
            return _error(conn, exc)
        entries = self.state.active.find(rid)
        if not entries:
            return _error(conn, RouterError(404, f"no request {rid!r} in flight", code="unknown_rid", param="rid"))
        for prefill, decode, rids in entries:  # a client id may name several requests: it asked for all
            for w in (prefill, decode):
                if w is not None:
                    self.state.send_abort(w, rids)
        _json(conn, 200, {"rid": rid, "aborted": True, "requests": len(entries)})

    # -- passthrough GETs -------------------------------------------------------------------------
    async def models(self, req: HttpRequest, conn: HttpConnection) -> None:
        """`GET /v1/models` and `GET /v1/models/{id}`: a healthy worker's answer (decode's first)."""
        state = self.state
        path = req.path.decode("latin-1")
        try:
            self._check_auth(req)
            candidates = state.registry.candidates(Role.DECODE) or state.registry.candidates(Role.PREFILL)
            if not candidates:
                raise RouterError(503, "no healthy worker", code="no_worker", retry_after_s=1)
            w = candidates[0]
            loop_time = asyncio.get_running_loop().time()
            try:
                up = await state.pool.request(
                    w.host, w.port, build_request("GET", path, w.netloc, b""), loop_time + _MODELS_TIMEOUT_S
                )
                body = await up.read_all()
            except UpstreamError as exc:
                raise RouterError(502, f"worker {w.url} did not answer /v1/models: {exc}") from None
            passthrough(conn, up.status, up.content_type(), body, b"models")
        except RouterError as exc:
            _error(conn, exc)

    async def health(self, req: HttpRequest, conn: HttpConnection) -> None:
        reg = self.state.registry
        n_prefill = len(reg.candidates(Role.PREFILL))
        n_decode = len(reg.candidates(Role.DECODE))
        ok = n_decode > 0 and (n_prefill > 0 or not reg.has_role(Role.PREFILL))
        _json(conn, 200 if ok else 503, {"status": "ok" if ok else "unavailable", "pid": os.getpid(),
                                         "prefill_healthy": n_prefill, "decode_healthy": n_decode})

    async def metrics(self, req: HttpRequest, conn: HttpConnection) -> None:
        group = self.state.group
        siblings = await group.ask_siblings({"op": "snapshot"}) if group is not None else None
        body, content_type = self.state.metrics.render(siblings)
        conn.respond(200, body, content_type.encode())

    # -- admin ------------------------------------------------------------------------------------
    async def list_workers(self, req: HttpRequest, conn: HttpConnection) -> None:
        try:
            self._check_auth(req)
        except RouterError as exc:
            return _error(conn, exc)
        _json(conn, 200, {"workers": [w.describe() for w in self.state.registry.all_workers()]})

    async def add_worker(self, req: HttpRequest, conn: HttpConnection) -> None:
        try:
            self._check_auth(req)
            doc = _json_object(req.body)
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
            return _error(conn, exc)
        doc = worker.describe()
        group = self.state.group
        if group is not None:  # every process takes it before the caller hears back
            told = await group.ask_siblings({"op": "add", "url": spec.url, "role": spec.role.value,
                                             "bootstrap_port": spec.bootstrap_port})  # fmt: skip
            doc["router_processes_updated"] = 1 + len(told)
        _json(conn, 201, doc)

    async def remove_worker(self, req: HttpRequest, conn: HttpConnection) -> None:
        try:
            self._check_auth(req)
            url = req.query.get("url")
            if not url:
                raise RouterError(400, "query parameter 'url' is required", param="url")
            worker = self.state.registry.remove(url)
        except RouterError as exc:
            return _error(conn, exc)
        removed = self.state.registry.get(worker.url) is None
        doc: dict[str, object] = {"url": worker.url, "draining": not removed, "removed": removed,
                                  "in_flight": worker.in_flight}  # fmt: skip
        group = self.state.group
        if group is not None:  # each process drains its own in-flight requests to it
            told = await group.ask_siblings({"op": "remove", "url": worker.url})
            doc["router_processes_updated"] = 1 + len(told)
        _json(conn, 200 if removed else 202, doc)


def _json_object(raw: bytes) -> dict[str, object]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"body must be a JSON object: {exc}") from None
    if not isinstance(doc, dict):
        raise RouterError(400, "body must be a JSON object")
    return doc


class RouterApp:
    """The router of one process: its RouterState and the HTTP server in front of it.

    `await start()` listens on `config.host:config.port` (or on `sock`); `await close()` stops
    accepting, lets running requests finish for a moment, and releases everything the state holds."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.state = RouterState(config)
        h = self._handlers = Handlers(self.state)
        self.routes = {
            (b"POST", b"/v1/chat/completions"): h.chat,
            (b"POST", b"/v1/completions"): h.completions,
            (b"POST", b"/generate"): h.generate,
            (b"POST", b"/v1/responses"): h.responses,
            (b"POST", b"/abort_request"): h.abort_request,
            (b"GET", b"/v1/models"): h.models,
            (b"GET", b"/health"): h.health,
            (b"GET", b"/metrics"): h.metrics,
            (b"GET", b"/workers"): h.list_workers,
            (b"POST", b"/workers"): h.add_worker,
            (b"DELETE", b"/workers"): h.remove_worker,
        }
        self._http: HttpServer | None = None

    async def _no_route(self, req: HttpRequest, conn: HttpConnection) -> None:
        """404 for an unknown path, 405 (with `Allow`) for a known path asked with another method; OpenAI's
        `GET /v1/models/{id}` (the one route with a parameter) goes to the models handler."""
        if req.method == b"GET" and req.path.startswith(b"/v1/models/") and _MODEL_PATH.fullmatch(req.path):
            await self._handlers.models(req, conn)
            return
        path = req.path.decode("latin-1")
        allowed = sorted(m.decode() for m, p in self.routes if p == req.path)
        if allowed:
            conn.respond(405, error_body(405, f"{req.method.decode('latin-1')} is not allowed on {path}",
                                         code="method_not_allowed"),
                         extra_headers=b"Allow: " + ", ".join(allowed).encode() + b"\r\n")
            return
        conn.respond(404, error_body(404, f"no route {req.method.decode('latin-1')} {path}"))

    async def start(self, sock: socket.socket | None = None) -> None:
        await self.state.start()
        cfg = self.config
        http = HttpServer(self.routes, self._no_route, cfg.max_body_bytes,  # type: ignore[arg-type]
                          header_timeout_s=cfg.header_timeout_s, idle_timeout_s=cfg.idle_timeout_s,
                          max_connections=cfg.max_connections)
        try:
            if sock is not None:
                await http.start(sock=sock)
            else:
                await http.start(self.config.host, self.config.port, reuse_port=self.config.processes > 1)
        except BaseException:
            await self.state.close()
            raise
        self._http = http

    @property
    def port(self) -> int:
        assert self._http is not None
        return self._http.port

    @property
    def listening_addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every socket the router listens on."""
        return [] if self._http is None else [s.getsockname()[:2] for s in self._http.sockets]

    async def close(self, grace_s: float = 5.0) -> None:
        if self._http is not None:
            await self._http.close(grace_s)
            self._http = None
        await self.state.close()
