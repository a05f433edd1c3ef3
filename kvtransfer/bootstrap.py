"""The bootstrap service a prefill instance runs on its `bootstrap_port` (its client: `kvtransfer.bootstrap_client`).

Prefill ranks register (rank, parallel layout, page and aux layout, transfer engine, control endpoint);
decode ranks look the instance up and cache it. The service checks every registration against the
instance's layout and the ranks already registered, and refuses one that conflicts with a 409.

HTTP API (JSON bodies are `kvtransfer.messages` types; errors are `{"error": {"message", "type", "code"}}`):
    PUT    /v1/ranks       RankRegistration   register or re-register (a restart) a rank
    DELETE /v1/ranks       Deregistration     a rank leaves (only the session that registered it)
    (PUT and DELETE need `Authorization: Bearer <token>` when the service has one: 401/403 otherwise)
    GET    /v1/instance    -> InstanceInfo    the layout and every registered rank
    GET    /v1/rooms/ROOM?wait_s=S -> RoomPlacement   an elastic instance's room: where it runs (waits up to S
                                                      seconds for the room to be placed; 404 if it is not)
    GET    /health         200 when every rank is registered, 503 while some are missing

An elastic instance (`room_placements=True`) changes its layout live: the HTTP process tells the service which
layout a scale's new ranks register with (`expect`), which one serves once the ranks switched (`relayout`),
or that a scale was given up (`abandon`), and hands it every room's placement (`place`, `kvtransfer.placements`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import threading
import uuid
from collections.abc import Callable

from aiohttp import web

from kvtransfer.http_errors import error_response, json_errors
from kvtransfer.mapping import ParallelLayout
from kvtransfer.messages import (
    Deregistration,
    InstanceInfo,
    RankRegistration,
    RoomPlacement,
    decode_json,
    encode_json,
)
from kvtransfer.placements import RoomPlacements
from kvtransfer.state import KVBootstrapError, KVProtocolError

log = logging.getLogger(__name__)


def _error(status: int, message: str, code: str) -> web.Response:
    return error_response(status, message, code)


def _conflict(registration: RankRegistration, layouts: list[ParallelLayout],
              others: list[RankRegistration]) -> str | None:
    """Why `registration` cannot join an instance with ranks `others` whose ranks may register with one of
    `layouts` (its layout, and while a scale runs the one it scales to), or None."""
    parallel = next((p for p in layouts if (p.tp_size, p.dp_size) == (registration.tp_size, registration.dp_size)),
                    None)
    if parallel is None:
        return (
            f"rank {registration.rank} registers tp_size {registration.tp_size} dp_size {registration.dp_size}, "
            f"the instance is tp_size {layouts[0].tp_size} dp_size {layouts[0].dp_size}"
        )
    if registration.mla_core != parallel.mla_core:
        return (f"rank {registration.rank} registers mla_core {registration.mla_core}, the instance is "
                f"mla_core {parallel.mla_core}")
    if not 0 <= registration.rank < parallel.tp_size:
        return f"rank {registration.rank} out of range [0, {parallel.tp_size})"
    for other in others:
        if other.rank == registration.rank:
            continue  # a re-registration (restart) replaces the old entry
        if other.control_endpoint == registration.control_endpoint:
            return f"rank {registration.rank} uses control endpoint {other.control_endpoint} of rank {other.rank}"
        if other.model_fingerprint != registration.model_fingerprint:
            return (f"rank {registration.rank} serves model {registration.model_fingerprint!r}, rank {other.rank} "
                    f"{other.model_fingerprint!r}")
        if other.engine_kind != registration.engine_kind:
            return f"rank {registration.rank} uses a {registration.engine_kind} engine, rank {other.rank} {other.engine_kind}"
        why = registration.page_layout.compatible_with(other.page_layout)
        if why:
            return f"rank {registration.rank}'s page layout does not match rank {other.rank}'s: {why}"
        if registration.aux_layout.slot_bytes != other.aux_layout.slot_bytes:
            return f"rank {registration.rank}'s aux slots differ in size from rank {other.rank}'s"
    return None


class BootstrapService:
    """The prefill instance's registry of ranks, served over HTTP from a thread of its own.

    Supports: registration with conflict checks, re-registration after a rank restarts, deregistration,
    lookup, health. Attributes: `host`, `port` (the bound port: pass 0 to pick a free one), `instance_id`
    (new on every start, so a cached lookup of a restarted instance is recognisably stale).

    Args:
        parallel: the prefill instance's tp_size / dp_size; registrations must agree with it.
        host: interface to listen on.
        port: port to listen on; 0 picks a free one.
        auth_token: registrations and deletions must carry `Authorization: Bearer <auth_token>` (401
            without one, 403 with another; nothing changes either way): the instance hands a secret of its
            own, or the deployment's `--kv-auth-token`, to its ranks at launch, so a stranger cannot
            replace or remove a rank. Lookups and health stay open: decode ranks need them. None: open.
        room_placements: the instance changes its layout live and publishes every room's placement (`place`);
            lookups say so, and decode ranks then map each room with its own placement.
    Call `close()` to stop the server and join its thread.
    """

    def __init__(self, parallel: ParallelLayout, host: str = "127.0.0.1", port: int = 0,
                 auth_token: str | None = None, room_placements: bool = False) -> None:
        self.parallel = parallel
        self.host = host
        self._auth_token = auth_token
        self.instance_id = uuid.uuid4().hex
        self._ranks: dict[int, RankRegistration] = {}
        self._expected: ParallelLayout | None = None  # the layout a running scale's new ranks register with
        self.placements = RoomPlacements() if room_placements else None
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, args=(port,), name="kv-bootstrap", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            self._loop.close()
            raise KVBootstrapError(f"bootstrap service cannot listen on {host}:{port}: {self._start_error}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def num_registered(self) -> int:
        return len(self._ranks)

    # --- server thread ------------------------------------------------------------------------------
    def _serve(self, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start(port))
        except BaseException as exc:  # reported to the constructor, which raises it
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))

    async def _start(self, port: int) -> None:
        app = web.Application(middlewares=[json_errors])
        app.router.add_put("/v1/ranks", self._register)
        app.router.add_delete("/v1/ranks", self._deregister)
        app.router.add_get("/v1/instance", self._instance)
        app.router.add_get("/v1/rooms/{room}", self._room)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    # --- handlers (all run on the server's loop: no lock needed) ------------------------------------
    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """The refusal of a request that may not change the registry, or None when it may."""
        if self._auth_token is None:
            return None
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            return error_response(401, "registering or removing a rank needs the instance's bearer token",
                                  "unauthorized", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given[len("Bearer "):].encode(), self._auth_token.encode()):
            log.warning("bootstrap %s refused a %s with a wrong token from %s", self.address, request.method,
                        request.remote)
            return error_response(403, "wrong bearer token for this instance", "forbidden")
        return None

    async def _register(self, request: web.Request) -> web.Response:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        try:
            registration = decode_json(await request.read(), RankRegistration)
        except KVProtocolError as exc:
            return _error(400, str(exc), "bad_registration")
        layouts = [self.parallel] + ([self._expected] if self._expected is not None else [])
        why = _conflict(registration, layouts, list(self._ranks.values()))
        if why:
            log.warning("bootstrap %s refused a registration: %s", self.address, why)
            return _error(409, why, "conflicting_registration")
        self._ranks[registration.rank] = registration
        return web.json_response({"instance_id": self.instance_id, "registered": len(self._ranks)})

    async def _deregister(self, request: web.Request) -> web.Response:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        try:
            leaving = decode_json(await request.read(), Deregistration)
        except KVProtocolError as exc:
            return _error(400, str(exc), "bad_deregistration")
        current = self._ranks.get(leaving.rank)
        if current is None:
            return _error(404, f"rank {leaving.rank} is not registered", "not_registered")
        if current.session != leaving.session:
            return _error(409, f"rank {leaving.rank} was re-registered by another session", "stale_session")
        del self._ranks[leaving.rank]
        return web.json_response({"registered": len(self._ranks)})

    async def _instance(self, request: web.Request) -> web.Response:
        info = InstanceInfo(
            instance_id=self.instance_id,
            tp_size=self.parallel.tp_size,
            dp_size=self.parallel.dp_size,
            mla_core=self.parallel.mla_core,
            ranks=[self._ranks[r] for r in sorted(self._ranks)],
            room_placements=self.placements is not None,
        )
        return web.Response(body=encode_json(info), content_type="application/json")

    async def _room(self, request: web.Request) -> web.Response:
        if self.placements is None:
            return _error(404, "this prefill instance does not publish room placements (its layout is fixed: "
                               "map rooms with the instance's layout)", "no_placements")
        try:
            room = int(request.match_info["room"])
            wait_s = float(request.query.get("wait_s", "0"))
        except ValueError:
            return _error(400, "the room must be an integer and wait_s a number of seconds", "bad_room")
        if room < 0 or not 0 <= wait_s:
            return _error(400, f"room {room} and wait_s {wait_s} must be non-negative", "bad_room")
        placement = await self.placements.get(room, wait_s)
        if placement is None:
            return _error(404, f"room {room} was not placed on this prefill instance within {wait_s:g} s "
                               "(its request never reached the instance, or it started too long ago)", "unknown_room")
        return web.Response(body=encode_json(placement), content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        complete = set(self._ranks) >= set(range(self.parallel.tp_size))
        body = {
            "status": "ok" if complete else "starting",
            "registered": len(self._ranks),
            "tp_size": self.parallel.tp_size,
        }
        return web.json_response(body, status=200 if complete else 503)

    # --- elastic layout (called from other threads; applied on the server's loop) --------------------
    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Runs `fn` on the server's loop and returns once it ran (handlers see all of it or none of it)."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                fn()
                done.set_result(None)
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        done.result(timeout=10.0)

    def expect(self, layout: ParallelLayout) -> None:
        """A scale to `layout` starts: its ranks (new ones included) may register with it from now on."""
        self._on_loop(lambda: setattr(self, "_expected", layout))

    def relayout(self, layout: ParallelLayout) -> None:
        """The ranks switched to `layout`: lookups give it, and leaving ranks deregister as they exit."""

        def switch() -> None:
            self.parallel, self._expected = layout, None

        self._on_loop(switch)

    def abandon(self) -> None:
        """A scale that did not happen: the instance keeps its layout, and registrations of ranks that never
        joined (killed while joining: they could not deregister) go."""

        def drop() -> None:
            self._expected = None
            for rank in [r for r in self._ranks if r >= self.parallel.tp_size]:
                del self._ranks[rank]

        self._on_loop(drop)

    def place(self, placements: list[RoomPlacement]) -> None:
        """Rooms rank 0 just routed (thread-safe, returns at once); ignored unless the instance publishes them."""
        if self.placements is not None and placements:
            self._loop.call_soon_threadsafe(self.placements.add, placements)

    def close(self) -> None:
        """Stop serving and join the server thread. Idempotent."""
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
