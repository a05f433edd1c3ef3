"""Running one worker instance: rank processes + the HTTP server (+ role extras) until stopped.

Every role's `__main__` parses its flags and calls `serve()` with its rank entry point; this module
owns the lifetimes: the HTTP process starts the ranks, answers /health with 503 until every DP
group reported ready, turns a dead rank into errors for open requests and a non-zero exit, and on
SIGINT/SIGTERM stops the ranks and releases every socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from kvtransfer import http_errors

from ..chat_template import ChatTemplate
from ..config import ModelConfig
from ..runtime.bridge import RankBridge
from ..runtime.disagg import BENCH_CONNECTOR
from ..runtime.elastic import ELASTIC_KEY
from ..runtime.launch import InstanceProcesses, InstanceSpec, LayoutError, RankContext, ipc_addr, launch
from ..runtime.offline import check_layout
from ..runtime.scaling import ElasticScaler, LayoutHooks
from ..tokenizer import load_tokenizer
from .app import ServerConfig, WorkerApp
from .cli import instance_spec
from .elastic import ElasticLayout, live_scale_refusal, scale_handler
from .messages import GenerateRequest, RoomsPlaced
from .protocol import RequestError

log = logging.getLogger(__name__)

DEFAULT_TINY_MODEL = Path("runs/tiny-v3")


def resolve_model_dir(model: str | None) -> str:
    """The given checkpoint, or the embedded default: a tiny random DeepSeek-V3 written on first use."""
    if model:
        return model
    if not (DEFAULT_TINY_MODEL / "config.json").exists():
        from ..tiny_model import write_tiny_model

        write_tiny_model(DEFAULT_TINY_MODEL)
    return str(DEFAULT_TINY_MODEL)


def zmq_addresses(spec: InstanceSpec) -> tuple[str, str]:
    """Inbox (rank 0) and outbox (HTTP process) endpoints: ipc on one node, tcp across nodes."""
    if spec.nnodes == 1:
        return ipc_addr("inbox"), ipc_addr("outbox")
    assert spec.dist_init_addr is not None
    host, port = spec.dist_init_addr.rsplit(":", 1)
    return f"tcp://{host}:{int(port) + 1}", f"tcp://{host}:{int(port) + 2}"


class ReadyGate:
    """/health answers 503 until the ranks are up, so routers don't send work to a loading instance."""

    def __init__(self, bridge: RankBridge) -> None:
        self.bridge = bridge

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path in ("/health", "/health_generate") and not self.bridge.ready:
            reason = self.bridge.dead_reason or "ranks are still starting"
            return http_errors.error_response(503, reason, "not_ready")
        return await handler(request)


class PrefillLookupGate:
    """A decode worker's admission check: the prefill instance a request names is looked up here, on a
    thread of the HTTP process, before the request reaches the ranks. A dead or blackholed prefill host
    then costs its own requests a clean 502, never a stall of the rank loop that every stream of the DP
    group waits on (the ranks' own lookup right after finds the instance just answered). Failures are
    remembered for `BootstrapClient.FAILURE_TTL_S`, successes for `CACHE_TTL_S`.

    A prefill instance that scales live publishes each room's placement (`kvtransfer.placements`): the gate
    fetches it (waiting, up to `placement_wait_s`, for the prefill to route the room) and writes it into the
    request (`BootstrapInfo.prefill_dp_rank` / `prefill_layout`), so that every rank of the decode group maps
    the room alike, with the layout in force when the room started.

    Args:
        timeout_s: each lookup's HTTP timeout (the ranks use the same, `KVTimeouts.http_s`).
        placement_wait_s: how long a request waits for its room to be placed (`KVTimeouts.bootstrap_s`).
    Call `aclose()` to stop its threads and its HTTP session."""

    # How long a request waits for a prefill instance whose ranks are still registering (an elastic scale's new
    # ranks register a moment after the switch; a starting instance is usually not routed to yet).
    NOT_READY_WAIT_S = 10.0

    def __init__(self, timeout_s: float, placement_wait_s: float = 30.0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from kvtransfer.bootstrap_client import BootstrapClient

        self._client = BootstrapClient(timeout_s)
        self.placement_wait_s = placement_wait_s
        # A few threads: one blackholed host must not hold up the lookups of the others.
        self._threads = ThreadPoolExecutor(4, thread_name_prefix="prefill-lookup")
        self._session: Any = None  # aiohttp.ClientSession for placements, made on the server's loop

    async def __call__(self, request: GenerateRequest) -> None:
        from kvtransfer.state import KVBootstrapError

        boot = request.bootstrap
        if boot is None:
            return
        try:
            # An instance not ready (its ranks still registering after a start or a scale) is waited for.
            info = await asyncio.get_running_loop().run_in_executor(
                self._threads, self._client.lookup_ready, boot.host, boot.port,
                min(self.placement_wait_s, self.NOT_READY_WAIT_S))
            if info.room_placements:
                placement = await self._placement(boot.host, boot.port, boot.room)
                boot.prefill_dp_rank = placement.dp_rank
                boot.prefill_layout = (placement.tp_size, placement.dp_size)
        except KVBootstrapError as exc:
            raise RequestError(f"prefill instance {boot.host}:{boot.port} cannot be used: {exc}", 502,
                               "kv_peer_error") from None

    async def _placement(self, host: str, port: int, room: int) -> Any:
        import aiohttp

        from kvtransfer.placements import fetch_placement

        if self._session is None:
            self._session = aiohttp.ClientSession()
        return await fetch_placement(self._session, host, port, room, self.placement_wait_s)

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._client.close)  # its lookup refreshes (each bounded by timeout_s)
        if self._session is not None:
            await self._session.close()


async def _serve_async(args: argparse.Namespace, role: str, spec: InstanceSpec, model_dir: str,
                       entry: Callable[[RankContext], None], role_args: dict[str, Any],
                       on_startup: Callable[[web.Application], Any] | None, layout_hooks: LayoutHooks | None,
                       on_rooms_placed: Callable[[RoomsPlaced], None] | None) -> int:
    config = ModelConfig.from_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, config.eos_token_ids)
    inbox, outbox = zmq_addresses(spec)
    bridge = RankBridge(inbox, outbox, num_dp_groups=spec.dp_size)
    bridge.on_rooms_placed = on_rooms_placed
    bridge.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0

    def on_death(reason: str) -> None:
        nonlocal exit_code
        exit_code = 1
        loop.call_soon_threadsafe(bridge.fail_all, reason)
        loop.call_soon_threadsafe(stop.set)

    if live_scale_refusal(role, spec, config.n_routed_experts, role_args) is None:
        role_args = {**role_args, ELASTIC_KEY: True}
    procs = launch(spec, entry, inbox, outbox, role_args, on_death)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    context = args.context_length or config.max_position_embeddings
    server_config = ServerConfig(served_model=args.served_model_name or Path(model_dir).name,
                                 vocab_size=config.vocab_size, max_context=context, role=role,
                                 extra_info={"tp_size": spec.tp_size, "dp_size": spec.dp_size,
                                             "page_size": args.page_size, "kv_cache_dtype": args.kv_cache_dtype,
                                             **role_args.get("info", {})},
                                 chat_template=ChatTemplate.from_model_dir(model_dir),
                                 tool_call_parser=getattr(args, "tool_call_parser", None),
                                 reasoning_parser=getattr(args, "reasoning_parser", None))
    kv = role_args.get("kv")
    gate = None
    if role == "decode" and kv is not None and kv.connector != BENCH_CONNECTOR:
        gate = PrefillLookupGate(kv.timeouts.http_s, kv.timeouts.bootstrap_s)
    worker = WorkerApp(bridge, tokenizer, server_config, admit=gate)
    app = worker.build()
    app.router.add_post("/scale_elastic_ep", _elastic_handler(args, role, spec, config, entry, procs, bridge, inbox,
                                                              outbox, role_args, server_config, layout_hooks))
    app.middlewares.append(ReadyGate(bridge).middleware)
    if on_startup is not None:
        app.on_startup.append(on_startup)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port, reuse_address=True).start()
        log.info("%s worker on http://%s:%d (tp=%d dp=%d, model %s)", role, args.host, args.port,
                 spec.tp_size, spec.dp_size, model_dir)
        await stop.wait()
    finally:
        # Stop accepting first, then end the ranks, then drop the sockets.
        await runner.cleanup()
        procs.stop()
        bridge.close()
        if gate is not None:
            await gate.aclose()
    if exit_code:
        log.error("instance stopped: %s", procs.death_reason)
    return exit_code


def _elastic_handler(args: argparse.Namespace, role: str, spec: InstanceSpec, config: ModelConfig,
                     entry: Callable[[RankContext], None], procs: InstanceProcesses, bridge: RankBridge, inbox: str,
                     outbox: str, role_args: dict[str, Any], server_config: ServerConfig,
                     hooks: LayoutHooks | None) -> Any:
    """``POST /scale_elastic_ep``: live on a prefill or decode instance of one node with expert parallelism over
    several ranks (``engine.runtime.scaling``); validated and refused (501) elsewhere."""
    eplb = getattr(role_args.get("engine"), "eplb", None)
    redundant = eplb.num_redundant_experts if eplb else 0
    why_not = live_scale_refusal(role, spec, config.n_routed_experts, role_args)
    if why_not is not None:
        layout = ElasticLayout(spec.tp_size, spec.dp_size, config.n_routed_experts, redundant)
        return scale_handler(layout, None, why_not)

    def on_layout(new: InstanceSpec) -> None:
        server_config.extra_info.update(tp_size=new.tp_size, dp_size=new.dp_size)

    scaler = ElasticScaler(spec, entry, procs, bridge, inbox, outbox, role_args, on_layout,
                           args.elastic_ep_join_timeout, hooks)
    return scale_handler(lambda: ElasticLayout(scaler.spec.tp_size, scaler.spec.dp_size, config.n_routed_experts,
                                               redundant), scaler)


def serve(args: argparse.Namespace, role: str, entry: Callable[[RankContext], None],
          role_args: dict[str, Any], on_startup: Callable[[web.Application], Any] | None = None,
          layout_hooks: LayoutHooks | None = None,
          on_rooms_placed: Callable[[RoomsPlaced], None] | None = None) -> int:
    """Runs the instance until SIGINT/SIGTERM (0) or until a rank dies (1). ``layout_hooks``: the role's own
    steps around a live scale; ``on_rooms_placed``: where an elastic prefill instance's room placements go."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = instance_spec(args)
    model_dir = resolve_model_dir(args.model)
    engine_args = role_args.get("engine")
    if engine_args is not None:  # refuse a layout the model cannot split (or fit) before any rank starts
        try:
            check_layout(spec, engine_args)
        except LayoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if spec.node_rank != 0:  # headless node: its ranks join node 0's instance
        inbox, outbox = zmq_addresses(spec)
        procs = launch(spec, entry, inbox, outbox, role_args)
        with contextlib.suppress(KeyboardInterrupt):
            procs.wait()
        procs.stop()
        return 0 if procs.death_reason is None else 1
    return asyncio.run(_serve_async(args, role, spec, model_dir, entry, role_args, on_startup, layout_hooks,
                                    on_rooms_placed))
