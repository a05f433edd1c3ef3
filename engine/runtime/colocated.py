"""The colocated role: one attention-DP group's requests prefilled and decoded on the same ranks.

This is what `engine.generate --tp N` runs, and what a decode worker runs for requests that come
without bootstrap fields (the router's conditional disaggregation sends short prompts there).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..config import ModelConfig
from ..dbo import DboConfig
from ..ep_moe import ExpertParallelMoE
from ..eplb.config import EplbConfig
from ..grammar import GrammarRuntime, GrammarSpec
from ..kv_pool import KVPool, resolve_kv_cache_dtype
from ..kv_shards import ShardedKVPool
from ..llm import resolve_dtype
from ..model import DeepseekForCausalLM
from ..mps_cap_check import check_gemms_under_sm_cap
from ..parallel import ParallelContext
from ..plan import DEFAULT_MEM_FRACTION
from ..quant import plan_quantization
from ..sampling import SamplingParams
from ..scheduler import Request, Scheduler, StepResult
from ..server.messages import GenerateRequest, SamplingSpec, TokenOutput
from ..step_clock import StepClock
from ..tokenizer import load_tokenizer
from ..weights import load_model
from . import elastic
from .launch import RankContext
from .lockstep import LockstepStepper
from .rank_loop import named_or_least_loaded, run_rank

log = logging.getLogger(__name__)


@dataclass
class EngineArgs:
    """How every rank builds its model shard and KV pool (sent to each rank at spawn)."""

    model_dir: str
    load_format: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # engine.kv_pool.KV_CACHE_DTYPES
    seed: int = 0
    page_size: int = 64
    num_pages: int | None = None
    max_total_tokens: int = 65536
    max_prefill_tokens: int = 8192
    max_running: int = 256
    ep_backend: str = "auto"  # "auto" (a2a over several ranks, local on one), "a2a", "local"
    # Memory plan (engine.plan) checked at start-up: GB per GPU (None: the device's own, on CUDA only),
    # the share of it planned, and the CUDA-graph batch limit the plan reserves graph memory for.
    gpu_memory_gb: float | None = None
    mem_fraction: float = DEFAULT_MEM_FRACTION
    cuda_graph_max_bs: int = 0
    # "high_throughput" or "low_latency" (fixed buffers sized for the largest forward: keep
    # max_prefill_tokens small, or use it where only decode batches run).
    ep_mode: str = "high_throughput"
    quantization: str = "auto"  # engine.quant: "auto" (the checkpoint's), "fp8" or "none"
    # Prefix cache over the KV pool (engine.prefix_cache), --disable-prefix-cache turns it off. On a decode
    # instance it serves the requests it prefills itself, and with --decode-prefix-cache also keeps KV received
    # from prefill instances for the next turn (decode_worker.runner).
    prefix_cache: bool = True
    # None: admission reserves a request's whole life; N: prompt + N output tokens, with retraction.
    reserve_tokens: int | None = None
    # Overlapped decode turns on CUDA (engine.decode_overlap); --disable-overlap-schedule turns them off.
    overlap_schedule: bool = True
    # Expert-parallel load balancing (--enable-eplb / --eplb-config, engine.eplb); None: off.
    eplb: EplbConfig | None = None
    dbo: DboConfig = field(default_factory=DboConfig)  # dual batch overlap (engine.dbo): off by default


@dataclass
class RankEngine:
    config: ModelConfig
    model: DeepseekForCausalLM
    kv_pool: KVPool
    parallel: ParallelContext
    moe: ExpertParallelMoE | None = None  # expert-parallel MoE layers and their load statistics
    grammar: GrammarRuntime | None = None  # structured output's compiler over the checkpoint's tokenizer
    # A rank joining a running instance: builds `moe` once the rank is in the instance's world.
    pending_moe: Callable[[], ExpertParallelMoE] | None = None


def fingerprint_of(engine: RankEngine, args: EngineArgs) -> str:
    """The model fingerprint this rank's KV peers must share (`engine.fingerprint`)."""
    from ..fingerprint import model_fingerprint

    dtype = str(engine.model.dtype).removeprefix("torch.")
    return model_fingerprint(args.model_dir, args.load_format, args.seed, dtype)


def parallel_context_for(ctx: RankContext) -> ParallelContext:
    """The model's view of this rank; process groups come from `groups` when the instance spans ranks."""
    if ctx.spec.tp_size == 1:
        return ParallelContext.single()
    from .groups import build_parallel_context  # torch.distributed groups of a multi-rank instance

    return build_parallel_context(ctx)


def build_rank_engine(ctx: RankContext, args: EngineArgs, expert_parallel: bool = True) -> RankEngine:
    """Builds this rank's model shard and KV pool.

    `expert_parallel=False` keeps the model's own local MoE dispatcher; only valid on one rank, where EP
    is the identity anyway, and without EPLB (its map lives in the EP dispatch). CUDA-graph decode needs it (the EP dispatcher is not capture-safe) at the
    cost of the expert-load recorder.
    """
    if not expert_parallel and ctx.spec.tp_size != 1:
        raise ValueError(f"expert parallelism can only be turned off on one rank, not tp={ctx.spec.tp_size}")
    if not expert_parallel and args.eplb is not None:
        raise ValueError("EPLB needs the expert-parallel MoE dispatch (it holds the logical -> physical map)")
    device = torch.device(ctx.device)
    if device.type == "cpu" and ctx.spec.ranks_per_node > 1:
        # Ranks share the node's cores: more threads than cores makes OpenMP spin-wait against the
        # other ranks (3x the CPU time for the same tokens, measured with 4 ranks on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.spec.ranks_per_node))
    config = ModelConfig.from_dir(args.model_dir)
    from .groups import resolve_ep_backend, validate_model_layout

    dtype = resolve_dtype(args.dtype, device)
    backend = resolve_ep_backend(args.ep_backend, ctx.spec, mode=args.ep_mode, dtype=dtype,
                                 hidden_size=config.hidden_size)
    validate_model_layout(config, ctx.spec, backend, args.eplb)  # LayoutError naming the clashing numbers
    if device.type == "cuda" and args.gpu_memory_gb is None:
        from .offline import check_memory  # the launcher checked already when the memory was given

        check_memory(ctx.spec, args, torch.cuda.mem_get_info(device)[1] / 1e9)
    if device.type == "cuda":  # under an MPS SM cap only: cuBLAS gave wrong products under some caps
        check_gemms_under_sm_cap(config, device, rows=args.max_prefill_tokens, dtype=dtype)
    redundant = args.eplb.num_redundant_experts if args.eplb is not None else 0
    # A rank joining a running instance (elastic EP) builds its shard before its world exists; it meets the
    # instance when its runner starts (`engine.runtime.rank_loop.run_rank`).
    join = ctx.role_args.get(elastic.JOIN_KEY)
    parallel = parallel_context_for(ctx) if join is None else elastic.placeholder_context(ctx, redundant)
    parallel = replace(parallel, redundant_experts=redundant)
    quant = plan_quantization(args.quantization, config, device, dtype)
    model = DeepseekForCausalLM(config, parallel, dtype=dtype, device=device, fp8=quant.model_fp8)
    if join is not None:
        elastic.empty_expert_slots(model)  # its experts come from the ranks holding them, once it has joined
    load_model(model, args.model_dir, args.load_format, args.seed, quant.in_effect)
    moe_factory = None
    if config.n_routed_experts and expert_parallel:
        # The most tokens one rank dispatches: its share of the largest forward of its DP group.
        largest_share = -(-max(args.max_prefill_tokens, args.max_running) // parallel.attn_tp_size)

        def moe_factory() -> ExpertParallelMoE:
            return ExpertParallelMoE(model, backend, args.ep_mode, max_tokens_per_rank=largest_share,
                                     eplb=args.eplb, num_nodes=ctx.spec.nnodes)

    # The EP layer needs the instance's group: a joining rank builds it once it has met the others
    # (`engine.runtime.elastic.join_instance`).
    moe = moe_factory() if moe_factory is not None and join is None else None
    model.dbo = args.dbo
    if args.dbo.enabled and moe is not None and parallel.dp_size > 1:
        # DP groups hold different batches: every forward agrees on its split over the whole instance (a
        # gloo group: the vote is control traffic, like the lockstep's work flag). Built on every rank.
        model.dbo_vote_group = torch.distributed.new_group(backend="gloo")
    num_pages = args.num_pages or -(-args.max_total_tokens // args.page_size)
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype)
    pool: KVPool
    if ctx.spec.mla_core:  # num_pages per rank, as with whole attention: the instance holds tp times more
        pool = ShardedKVPool(num_pages, ctx.spec.tp_size, ctx.rank, config.num_hidden_layers, args.page_size,
                             config.kv_cache_dim, kv_dtype, device, prefix_cache=args.prefix_cache)
    else:
        pool = KVPool(num_pages, config.num_hidden_layers, args.page_size, config.kv_cache_dim, kv_dtype,
                      device, prefix_cache=args.prefix_cache)
    grammar = GrammarRuntime(load_tokenizer(args.model_dir, config.eos_token_ids), config.vocab_size,
                             config.eos_token_ids)
    return RankEngine(config, model, pool, parallel, moe, grammar, moe_factory if join is not None else None)


def engine_gauges(engine: RankEngine) -> dict[str, float]:
    """Instance-wide values for /metrics, the same on every rank (not summed over DP groups): EPLB's."""
    moe = engine.moe
    return moe.eplb.gauges() if moe is not None and moe.eplb is not None else {}


def to_sampling_params(spec: SamplingSpec) -> SamplingParams:
    return SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed,
                          max_new_tokens=spec.max_new_tokens, stop_token_ids=tuple(spec.stop_token_ids),
                          ignore_eos=spec.ignore_eos, presence_penalty=spec.presence_penalty,
                          frequency_penalty=spec.frequency_penalty, repetition_penalty=spec.repetition_penalty,
                          logit_bias=tuple(spec.logit_bias), min_new_tokens=spec.min_new_tokens,
                          min_p=spec.min_p,
                          grammar=GrammarSpec(spec.grammar_kind, spec.grammar) if spec.grammar_kind else None)


def error_output(rid: str, message: str, status: int = 500, code: str | None = None) -> TokenOutput:
    """The final output of a request that failed: `status` is what its client gets (DESIGN.md: 4xx when the
    request was at fault, 5xx when the server or a peer was)."""
    return TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="error", error=message,
                       error_status=status, error_code=code)


def status_of(exc: BaseException) -> tuple[int, str]:
    """HTTP status and code for an exception raised while admitting a request. The engine's ValueErrors
    are its input checks (empty prompt, token outside the vocabulary, prompt beyond the context or the
    KV pool): the request is at fault. A TP/DP pairing or `data_parallel_rank` the mapping cannot serve is
    what the request asked for; any other KV-plane failure is the named peer's (a bad gateway)."""
    from kvtransfer.state import KVMappingError, KVTransferError  # engine may import kvtransfer

    if isinstance(exc, KVMappingError):
        return 400, "unservable_pairing"
    if isinstance(exc, KVTransferError):
        return 502, "kv_peer_error"
    if isinstance(exc, ValueError):
        return 400, "invalid_request"
    return 500, "internal_error"


def rejected_output(rid: str, exc: BaseException, prefix: str = "") -> TokenOutput:
    """`error_output` for a request refused at admission by `exc` (status chosen by `status_of`)."""
    status, code = status_of(exc)
    return error_output(rid, prefix + str(exc), status, code)


def duplicate_output(rid: str) -> TokenOutput:
    return error_output(rid, f"request id {rid!r} is already running", 409, "duplicate_request_id")


def outputs_of(result: StepResult, prompt_len: dict[str, int]) -> list[TokenOutput]:
    """One TokenOutput per request that produced a token this step (at most one token each), and an error
    output per request that failed in it."""
    outs = [error_output(req.request_id, req.error or "the request failed") for req in result.failed]
    for req, token in result.new_tokens:
        outs.append(TokenOutput(rid=req.request_id, token_ids=[token], finished=req.finished,
                                finish_reason=req.finish_reason if req.finished else None,
                                prompt_tokens=prompt_len.get(req.request_id, len(req.prompt_ids)),
                                cached_tokens=req.cached_tokens,
                                logprobs=req.output_logprobs[-1:] if req.return_logprob else [],
                                top_logprobs=req.output_top_logprobs[-1:] if req.top_logprobs else [],
                                prompt_logprobs=req.prompt_logprob_values if len(req.output_ids) == 1 else [],
                                prompt_top_logprobs=req.prompt_top_logprobs if len(req.output_ids) == 1 else []))
    return outs


class ColocatedRunner:
    """`StepRunner` over the engine's scheduler for this rank's DP group."""

    def __init__(self, engine: RankEngine, args: EngineArgs) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine.model, engine.kv_pool, args.max_prefill_tokens, args.max_running,
                                   engine.config.eos_token_ids, reserve_tokens=args.reserve_tokens,
                                   grammar=engine.grammar,
                                   overlap=args.overlap_schedule and engine.kv_pool.tensor.device.type == "cuda")
        # Phase times of this rank's decode turns (the rank loop opens and closes each turn).
        self.clock = self.scheduler.clock = StepClock(engine.kv_pool.tensor.device)
        self.requests: dict[str, Request] = {}
        self._pending: list[TokenOutput] = []
        self._emit: Callable[[list[TokenOutput]], None] | None = None
        parallel = engine.parallel
        self.stepper = LockstepStepper(self.scheduler, engine.model, parallel, engine.moe,
                                       self._control_group(parallel))

    def _control_group(self, parallel: ParallelContext) -> object | None:
        # The work flag is control traffic: a gloo group even when the model's collectives use NCCL. A joining
        # rank has no world yet: `regroup` makes it once it has one.
        if parallel.dp_size > 1 and self.engine.model.device.type == "cuda" and torch.distributed.is_initialized():
            return torch.distributed.new_group(backend="gloo")
        return None

    def add(self, request: GenerateRequest) -> None:
        try:
            req = self.scheduler.add(request.input_ids, to_sampling_params(request.sampling), request.rid)
        except ValueError as exc:
            self._pending.append(rejected_output(request.rid, exc))
            return
        req.return_logprob, req.top_logprobs = request.return_logprob, request.top_logprobs
        req.prompt_logprobs = request.prompt_logprobs
        self.requests[request.rid] = req

    def abort(self, rid: str) -> list[TokenOutput]:
        req = self.requests.pop(rid, None)
        if req is None:
            return []
        self.scheduler.abort(req)
        return [TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="abort")]

    def num_requests(self) -> int:
        return len(self.requests)

    def bind_emitter(self, emit: Callable[[list[TokenOutput]], None]) -> None:
        """Send outputs that are ready before a turn's forward through `emit` at once (see `StepRunner`)."""
        self._emit = emit

    def step(self) -> list[TokenOutput]:
        outs, self._pending = self._pending, []
        if outs and self._emit is not None:
            # Ready before the forward (a decode request's first token once its KV landed, errors): out
            # now, not one decode step later. The forward still runs on every rank, as lockstep needs.
            self._emit(outs)
            outs = []
            self.clock.lap("outputs")
        result = self.stepper.step()  # on every rank, also those without work (MoE collectives)
        outs.extend(outputs_of(result, {}))
        for req in result.finished:
            self.requests.pop(req.request_id, None)
        self.clock.lap("outputs")
        return outs

    def regroup(self, ctx: RankContext, parallel: ParallelContext) -> None:
        """Elastic EP: the instance re-formed (``engine.runtime.elastic``); this runner's groups follow it (and a
        joining rank's EP layer, built once it joined)."""
        self.stepper.parallel = parallel
        self.stepper.moe = self.engine.moe
        self.stepper.control_group = self._control_group(parallel)

    def choose_dp_rank(self, request: GenerateRequest, loads: list[int]) -> int:
        if request.sampling.seed is None and request.sampling.temperature > 0:
            # Rank 0 draws the seed before the broadcast, so every rank of the DP group samples the same
            # token; unseeded per-rank generators would diverge and desynchronise the group.
            request.sampling.seed = random.getrandbits(63)
        return named_or_least_loaded(request, loads)

    def gauges(self) -> dict[str, float]:
        return engine_gauges(self.engine)
    def group_load(self) -> dict[str, int]:
        """This DP group's load as `/server_info`'s `dp_groups` and the router's DP choice read it: requests
        in the batch, requests waiting to join it, and the tokens whose KV the group holds or will hold."""
        scheduler = self.scheduler
        return {"running_requests": len(scheduler.running), "queued_requests": len(scheduler.waiting),
                "tokens_in_flight": sum(r.seq_len for r in scheduler.running)
                + sum(r.seq_len for r in scheduler.waiting)}

    def status_counts(self) -> dict[str, int]:
        return {**self.engine.kv_pool.status_counts(),
                "prefill_tokens_computed": self.scheduler.prefill_computed_tokens,
                "retractions": self.scheduler.retractions, **self.group_load(), **self.clock.counters()}

    def close(self) -> None:
        for req in list(self.requests.values()):
            self.scheduler.abort(req)
        self.requests.clear()
        self.stepper.close()
        if self.engine.moe is not None:
            self.engine.moe.close()
        self.engine.kv_pool.close()


def colocated_entry(ctx: RankContext) -> None:
    args: EngineArgs = ctx.role_args["engine"]
    run_rank(ctx, ColocatedRunner(build_rank_engine(ctx, args), args))
