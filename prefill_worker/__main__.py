"""Prefill worker: computes prompts' KV and pushes it into the decode instance the router paired it with.

    python -m prefill_worker --model DIR --tp N [--dp M] --port P --bootstrap-port B \
        --transfer-backend nixl|mooncake [--device cpu|cuda] [--page-size] [--max-prefill-tokens]

Every request must carry bootstrap_host / bootstrap_port / bootstrap_room (the router adds them); one
without them is refused with a 400. The reply (SGLang's shape, the first output token) comes once the KV
has landed on the decode side; the client's answer streams from the decode worker.
With `--kv-connector bench` the KV is computed and dropped (prefill profiled alone: no bootstrap service,
no transfer engine, bootstrap fields optional; responses carry `x-tandem-kv-connector: bench`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from engine.config import ModelConfig
from engine.runtime.disagg import BENCH_CONNECTOR, add_kv_flags, auth_token, kv_args, mark_bench_responses
from engine.server.cli import add_common_flags, add_elastic_flags, engine_args, instance_spec
from engine.server.elastic import live_scale_refusal
from engine.server.protocol import error_document
from engine.server.serve import resolve_model_dir, serve
from kvtransfer import protocol as pd
from kvtransfer.bootstrap import BootstrapService
from prefill_worker.elastic import BootstrapLayoutHooks, parallel_layout
from prefill_worker.runner import prefill_entry

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default
INFERENCE_PATHS = frozenset(("/generate", "/v1/completions", "/v1/chat/completions"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prefill_worker",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_flags(parser)
    role = parser.add_argument_group("prefill")
    role.add_argument(
        "--bootstrap-port",
        "--disaggregation-bootstrap-port",
        dest="bootstrap_port",
        type=int,
        default=DEFAULT_BOOTSTRAP_PORT,
        help="port of this instance's bootstrap service (decode ranks look its layout up there)",
    )
    add_elastic_flags(role)
    add_kv_flags(parser)
    return parser


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def bootstrap_guard(
    dp_size: int | None,
) -> Callable[
    [web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[web.StreamResponse]
]:
    """Middleware: an inference request without the bootstrap fields (or naming a DP group this instance
    lacks) is a 400 here, before anything is queued; the body is cached for the handler. `dp_size` None: an
    instance that scales live, whose rank 0 takes a named group as a hint (`PrefillRunner.choose_dp_rank`)."""

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method != "POST" or request.path not in INFERENCE_PATHS:
            return await handler(request)
        try:
            body = orjson.loads(await request.read())
        except (orjson.JSONDecodeError, web.HTTPRequestEntityTooLarge):
            return await handler(request)  # the handler answers these with its own errors
        if isinstance(body, dict):
            message, code, param = None, "missing_bootstrap", None
            if body.get(pd.BOOTSTRAP_HOST) is None or body.get(pd.BOOTSTRAP_ROOM) is None:
                message = (
                    f"a prefill worker needs '{pd.BOOTSTRAP_HOST}', '{pd.BOOTSTRAP_PORT}' and "
                    f"'{pd.BOOTSTRAP_ROOM}' (send requests through the router)"
                )
            # `data_parallel_rank` names the decode instance's group; this instance's is this one.
            dp = body.get(pd.DISAGG_PREFILL_DP_RANK)
            if isinstance(dp, int) and dp_size is not None and not 0 <= dp < dp_size:
                message = (
                    f"'{pd.DISAGG_PREFILL_DP_RANK}' {dp} is out of range: this instance has dp_size {dp_size}"
                )
                code, param = "invalid_request", pd.DISAGG_PREFILL_DP_RANK
            if message is not None:
                return web.Response(
                    body=orjson.dumps(error_document(400, message, code=code, param=param)),
                    status=400,
                    content_type="application/json",
                )
        return await handler(request)

    return guard


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = instance_spec(args)  # a layout that cannot run fails here, before any rank starts
        engine = engine_args(args)
        # Ranks of every node register with node 0's service; node 0 runs it in its HTTP process.
        service_host = args.dist_init_addr.rsplit(":", 1)[0] if spec.nnodes > 1 else _connect_host(args.host)
        token = auth_token(args, spec.nnodes)
        kv = kv_args(args, bootstrap_addr=f"{service_host}:{args.bootstrap_port}", token=token)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    role_args = {
        "engine": engine,
        "kv": kv,
        "info": {
            "bootstrap_port": args.bootstrap_port,
            "transfer_backend": kv.backend,
            "kv_connector": kv.connector,
        },
    }
    if kv.connector == BENCH_CONNECTOR:  # no decode side: no bootstrap service, no bootstrap guard
        return serve(args, "prefill", prefill_entry, role_args, on_startup=mark_bench_responses)

    if spec.node_rank != 0:
        return serve(args, "prefill", prefill_entry, role_args)
    # An instance that can scale live publishes where each room runs: decode maps every room with the layout
    # in force when it started (prefill_worker.elastic).
    config = ModelConfig.from_dir(resolve_model_dir(args.model))
    elastic = live_scale_refusal("prefill", spec, config.n_routed_experts, role_args) is None
    service = BootstrapService(parallel_layout(spec), host=args.host, port=args.bootstrap_port, auth_token=token,
                               room_placements=elastic)
    hooks = BootstrapLayoutHooks(service)

    async def on_startup(app: web.Application) -> None:
        # The app is not frozen yet during start-up: middlewares can still be added.
        app.middlewares.append(bootstrap_guard(None if elastic else spec.dp_size))

    try:
        return serve(args, "prefill", prefill_entry, role_args, on_startup=on_startup,
                     layout_hooks=hooks if elastic else None, on_rooms_placed=hooks.rooms_placed)
    finally:
        service.close()


if __name__ == "__main__":
    sys.exit(main())
