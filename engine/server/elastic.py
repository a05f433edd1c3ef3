"""``POST /scale_elastic_ep {"new_data_parallel_size": N}`` (vLLM's elastic-EP endpoint): checks and answer.

A size the instance cannot take (not a power of two, experts that would not split over the new ranks, fewer
than two ranks; each DP group keeps its attn_tp ranks, so attention splits as before) is a 400 naming the
numbers; the current size is a 200 with nothing to do. Any other size goes to the instance's
``ElasticScaler`` (``engine.runtime.scaling``: new ranks join, leaving ranks drain, the instance re-forms
between two steps): a 200 with the scale's timings, or a 503 (409 while another scale runs) saying why it
did not happen and that the instance serves at its old size. An instance that cannot scale live
(``live_scale_refusal``: several nodes, one rank, a dense model, DBO, MLA-core DP) answers 501.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from kvtransfer import http_errors

from ..runtime.disagg import BENCH_CONNECTOR
from ..runtime.launch import InstanceSpec
from ..runtime.scaling import ElasticScaler, ScaleError


@dataclass(frozen=True)
class ElasticLayout:
    """What the checks need of the running instance."""

    tp_size: int
    dp_size: int
    num_experts: int  # routed experts (0: a dense model)
    redundant_experts: int  # EPLB's extra slots

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.dp_size


def live_scale_refusal(role: str, spec: InstanceSpec, num_experts: int, role_args: dict[str, Any]) -> str | None:
    """Why this instance cannot be scaled live, or None when it can (decode and prefill instances of one node
    running expert parallelism over at least two ranks)."""
    engine = role_args.get("engine")
    kv = role_args.get("kv")
    if role not in ("decode", "prefill"):
        return f"a {role} instance cannot be scaled live (elastic EP is built for prefill and decode instances)"
    if spec.nnodes > 1:
        return "an instance over several nodes cannot be scaled live"
    if spec.tp_size < 2 or not num_experts:
        return "only an instance running expert parallelism over at least 2 ranks can be scaled live"
    if kv is not None and kv.connector == BENCH_CONNECTOR:
        return "a bench-connector instance cannot be scaled live"
    if engine is not None and engine.dbo.enabled:
        # DBO's split vote runs over a group of the launch-time world, which a re-formed world would not have.
        return "an instance with dual batch overlap (--enable-dbo) cannot be scaled live yet"
    if spec.mla_core:
        return "an instance with --attention-dp mla-core cannot be scaled live yet"
    return None


def scale_problems(layout: ElasticLayout, new_dp: int) -> list[str]:
    """Why ``new_dp`` attention-DP groups (of the same ``attn_tp`` ranks each) cannot hold this model."""
    problems = []
    new_tp = new_dp * layout.attn_tp_size
    if new_tp < 2:
        problems.append(f"new_data_parallel_size {new_dp} leaves {new_tp} rank: elastic EP keeps at least 2 ranks")
    if new_dp & (new_dp - 1):
        problems.append(f"new_data_parallel_size {new_dp} is not a power of two (rank mapping serves powers of two)")
    physical = layout.num_experts + layout.redundant_experts
    if physical and physical % new_tp:
        extra = f" + {layout.redundant_experts} redundant" if layout.redundant_experts else ""
        problems.append(f"{layout.num_experts}{extra} experts do not split evenly over {new_tp} ranks "
                        f"({new_dp} DP groups x attn_tp {layout.attn_tp_size})")
    return problems


def scale_handler(layout: ElasticLayout | Callable[[], ElasticLayout], scaler: ElasticScaler | None = None,
                  why_not: str = "scaling this instance live is not supported") -> Any:
    """The aiohttp handler of ``POST /scale_elastic_ep``: ``layout`` is the instance's (or a function giving the
    current one); without ``scaler`` every real change is a 501 carrying ``why_not``."""

    async def handle(request: web.Request) -> web.Response:
        current = layout() if callable(layout) else layout
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            return http_errors.error_response(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return http_errors.error_response(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - {"new_data_parallel_size"})
        if unknown:
            return http_errors.error_response(400, f"unknown field(s) {', '.join(unknown)}", "invalid_request",
                                              unknown[0])
        new_dp = body.get("new_data_parallel_size")
        if not isinstance(new_dp, int) or isinstance(new_dp, bool) or new_dp < 1:
            return http_errors.error_response(400, "'new_data_parallel_size' must be an integer >= 1",
                                              "invalid_request", "new_data_parallel_size")
        if new_dp == current.dp_size:
            return _json({"success": True, "data_parallel_size": new_dp,
                          "message": "the instance already has this size"})
        problems = scale_problems(current, new_dp)
        if problems:
            return http_errors.error_response(400, "cannot scale: " + "; ".join(problems), "invalid_request",
                                              "new_data_parallel_size")
        if scaler is None:
            return http_errors.error_response(
                501, f"{why_not}; the instance keeps serving at data_parallel_size {current.dp_size}",
                "not_implemented", "new_data_parallel_size")
        try:
            result = await scaler.scale(new_dp)
        except ScaleError as exc:
            return http_errors.error_response(exc.status, str(exc), exc.code, "new_data_parallel_size")
        return _json(result.body())

    return handle


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")
