"""Offline generation on a multi-rank instance: what ``python -m engine.generate --tp N --dp M`` runs.

Node 0 starts its ranks with the colocated runner, submits every prompt through a ``RankBridge`` (rank 0
spreads them over the DP groups, least-loaded first) and collects the outputs in prompt order. Other
nodes (``--node-rank > 0``) start their ranks headless and wait for them to end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..llm import resolve_dtype
from ..sampling import SamplingParams
from ..server.messages import GenerateRequest, SamplingSpec
from .bridge import RankBridge
from .colocated import EngineArgs, colocated_entry
from .groups import resolve_ep_backend, validate_model_layout
from .launch import InstanceSpec, LayoutError, RankContext, launch

log = logging.getLogger(__name__)


class InstanceError(RuntimeError):
    """The instance failed (a rank died, or a request was refused); the message says why."""


@dataclass
class RankOutput:
    """One prompt's generated ids and why it stopped."""

    token_ids: list[int]
    finish_reason: str
    cached_tokens: int | None = None  # prompt tokens served by the prefix cache


def check_layout(spec: InstanceSpec, args: EngineArgs) -> None:
    """Start-up validation in the launching process, before any rank is spawned (LayoutError)."""
    config = ModelConfig.from_dir(args.model_dir)
    dtype = resolve_dtype(args.dtype, torch.device(spec.device))
    backend = resolve_ep_backend(args.ep_backend, spec, mode=args.ep_mode, dtype=dtype,
                                 hidden_size=config.hidden_size)
    validate_model_layout(config, spec, backend, args.eplb)
    if args.gpu_memory_gb is not None:
        check_memory(spec, args, args.gpu_memory_gb)


def check_memory(spec: InstanceSpec, args: EngineArgs, gpu_memory_gb: float) -> None:
    """Refuses (LayoutError, with the plan's table) an instance whose weights, activations, CUDA graphs and
    requested KV pool (--max-total-tokens / --num-pages) do not fit in `gpu_memory_gb` per rank."""
    from ..plan import GB, PlanSpec, load_model_config, make_plan

    config, quantization, block, name = load_model_config(args.model_dir)
    dtype = str(resolve_dtype(args.dtype, torch.device(spec.device))).removeprefix("torch.")
    plan = make_plan(config, PlanSpec(
        tp=spec.tp_size, dp=spec.dp_size, quantization=quantization, dtype=dtype,
        kv_cache_dtype=args.kv_cache_dtype, gpu_memory_gb=gpu_memory_gb, mem_fraction=args.mem_fraction,
        page_size=args.page_size, cuda_graph_max_bs=args.cuda_graph_max_bs,
        max_prefill_tokens=args.max_prefill_tokens, max_running=args.max_running,
        fp8_block=block or (128, 128)), name)
    num_pages = args.num_pages or -(-args.max_total_tokens // args.page_size)
    pool = num_pages * args.page_size * plan.kv_bytes_per_token
    why = plan.shortfall(pool)
    if why is not None:
        room = (f"at most {plan.kv_tokens_per_dp_group} KV tokens per DP group fit (--max-total-tokens)"
                if plan.fits else "not even the weights and activations fit: more ranks, FP8 weights or a "
                "smaller --max-prefill-tokens")
        raise LayoutError(f"the instance does not fit in {gpu_memory_gb:g} GB per GPU: {why}; {room}\n"
                          f"{plan.table()}")
    log.info("memory plan: %.1f GB weights + %.1f GB activations/graphs + %.1f GB KV per rank of %.1f GB",
             plan.weights_total / GB, (plan.activations + plan.cuda_graphs) / GB, pool / GB, plan.budget / GB)


def _sampling_spec(params: SamplingParams) -> SamplingSpec:
    return SamplingSpec(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
                        max_new_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
                        ignore_eos=params.ignore_eos)


async def _generate(spec: InstanceSpec, args: EngineArgs, prompts: list[list[int]],
                    params: list[SamplingParams], timeout_s: float, show_progress: bool,
                    entry: Callable[[RankContext], None]) -> list[RankOutput]:
    from ..server.serve import zmq_addresses

    inbox, outbox = zmq_addresses(spec)
    bridge = RankBridge(inbox, outbox, num_dp_groups=spec.dp_size)
    loop = asyncio.get_running_loop()

    def on_death(reason: str) -> None:
        loop.call_soon_threadsafe(bridge.fail_all, reason)

    procs = launch(spec, entry, inbox, outbox, {"engine": args}, on_death)
    bar = tqdm(total=sum(p.max_new_tokens for p in params), unit="tok", desc="generate", disable=not show_progress)

    async def one(i: int) -> RankOutput:
        request = GenerateRequest(rid=str(i), input_ids=prompts[i], sampling=_sampling_spec(params[i]))
        tokens: list[int] = []
        cached: int | None = None
        async for out in bridge.submit(request):
            cached = out.cached_tokens if out.cached_tokens is not None else cached
            if out.error is not None:
                raise InstanceError(f"prompt {i}: {out.error}")
            tokens.extend(out.token_ids)
            bar.update(len(out.token_ids))
            if out.finished:
                return RankOutput(tokens, out.finish_reason or "abort", cached)
        raise InstanceError(f"prompt {i}: the instance ended its output stream early")

    started = time.monotonic()
    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(prompts)))), timeout_s)
    except TimeoutError as exc:
        raise InstanceError(f"generation did not finish within {timeout_s:.0f}s") from exc
    finally:
        bar.close()
        procs.stop()
        bridge.close()
    generated = sum(len(r.token_ids) for r in results)
    log.info("%d prompts, %d tokens in %.1fs on tp=%d dp=%d", len(prompts), generated, time.monotonic() - started,
             spec.tp_size, spec.dp_size)
    return results


def generate_on_ranks(spec: InstanceSpec, args: EngineArgs, prompts: list[list[int]],
                      params: SamplingParams | list[SamplingParams], timeout_s: float = 600.0,
                      show_progress: bool = False,
                      entry: Callable[[RankContext], None] = colocated_entry) -> list[RankOutput]:
    """Runs every prompt on a fresh instance of ``spec`` (node 0) and returns outputs in prompt order.
    ``entry``: what each rank runs (the colocated role; tests pass a variant of it, e.g. with CUDA graphs).

    Raises LayoutError before spawning anything when the model cannot be split over the layout, and
    InstanceError when a rank dies or a prompt is refused (the instance is stopped either way).
    """
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    if spec.node_rank != 0:
        raise ValueError("only node 0 submits prompts; other nodes run run_headless_node()")
    check_layout(spec, args)
    return asyncio.run(_generate(spec, args, prompts, per_prompt, timeout_s, show_progress, entry))


def run_headless_node(spec: InstanceSpec, args: EngineArgs) -> str | None:
    """Starts this node's ranks and waits until they end; returns why they ended (None = stopped cleanly)."""
    from ..server.serve import zmq_addresses

    check_layout(spec, args)
    inbox, outbox = zmq_addresses(spec)
    procs = launch(spec, colocated_entry, inbox, outbox, {"engine": args})
    try:
        procs.wait()
    finally:
        procs.stop()
    return procs.death_reason
