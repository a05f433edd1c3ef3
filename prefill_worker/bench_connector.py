"""The prefill role with the benchmarking KV connector (`--kv-connector bench`): prefill profiled alone.

Each request is prefilled exactly as for a real decode peer (same batcher, same chunking, same first-token
sampling), then its KV is dropped: the pages go back to the pool at the step its last chunk completes and
the reply (SGLang's shape: the first output token) goes out at once. No transfer engine, no bootstrap
service, no decode instance; bootstrap fields are optional. The numbers leave out the KV transfer, so
they are not end-to-end; the worker says so (`engine.runtime.disagg`).
"""

from __future__ import annotations

import random

import torch

from engine.runtime.colocated import (
    EngineArgs,
    RankEngine,
    duplicate_output,
    error_output,
    rejected_output,
    to_sampling_params,
)
from engine.runtime.launch import RankContext
from engine.runtime.lockstep import LockstepStepper
from engine.runtime.rank_loop import least_loaded
from engine.server.messages import GenerateRequest, TokenOutput
from kvtransfer.mapping import ParallelLayout, prefill_dp_group
from kvtransfer.state import KVTransferError
from prefill_worker.batcher import PrefillBatcher, PrefillJob
from prefill_worker.runner import LockstepBatcher


class BenchPrefillRunner:
    """`StepRunner` of a prefill worker whose KV goes nowhere.

    Args:
        ctx: this rank.
        engine: the rank's model and KV pool (`build_rank_engine`).
        args: engine settings (prefill token budget, request limit).
    """

    def __init__(self, ctx: RankContext, engine: RankEngine, args: EngineArgs) -> None:
        self.engine = engine
        self.layout = ParallelLayout(ctx.spec.tp_size, ctx.spec.dp_size, ctx.spec.mla_core)
        self.batcher = PrefillBatcher(engine.model, engine.kv_pool, args.max_prefill_tokens, args.max_running)
        self._steps = LockstepBatcher(self.batcher)
        # The work flag is control traffic: a gloo group even when the model's collectives use NCCL.
        control = (
            torch.distributed.new_group(backend="gloo")
            if engine.parallel.dp_size > 1 and engine.model.device.type == "cuda"
            else None
        )
        self.stepper = LockstepStepper(self._steps, engine.model, engine.parallel, engine.moe, control)  # type: ignore[arg-type]
        self.jobs: dict[str, tuple[GenerateRequest, PrefillJob]] = {}  # arrival order
        self._pending: list[TokenOutput] = []
        self.dropped_requests = 0

    # --- StepRunner ---------------------------------------------------------------------------------
    def add(self, request: GenerateRequest) -> None:
        if request.rid in self.jobs:
            self._pending.append(duplicate_output(request.rid))
            return
        try:
            job = PrefillJob(request.rid, list(request.input_ids), to_sampling_params(request.sampling))
            self.batcher.add(job)
        except ValueError as exc:
            self._pending.append(rejected_output(request.rid, exc))
            return
        self.jobs[request.rid] = (request, job)

    def abort(self, rid: str) -> list[TokenOutput]:
        entry = self.jobs.pop(rid, None)
        if entry is None:
            return []
        self.batcher.release(entry[1])
        return [TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="abort")]

    def num_requests(self) -> int:
        return len(self.jobs)

    def step(self) -> list[TokenOutput]:
        outs, self._pending = self._pending, []
        self._steps.chunks = []
        self.stepper.step()  # on every rank, also those without work (MoE collectives)
        for chunk in self._steps.chunks:
            if not chunk.last:
                continue
            request, job = self.jobs.pop(chunk.job.rid)
            self.batcher.release(job)  # the bench connector: the KV is dropped, not sent
            self.dropped_requests += 1
            if job.error is not None or job.first_token is None:
                outs.append(error_output(request.rid, job.error or "the first token was not drawn"))
                continue
            outs.append(
                TokenOutput(
                    rid=request.rid,
                    token_ids=[job.first_token],
                    logprobs=[job.first_logprob] if request.return_logprob else [],
                    finished=True,
                    finish_reason="length",
                    prompt_tokens=len(job.prompt_ids),
                    cached_tokens=job.cached_tokens,
                )
            )
        return outs

    def choose_dp_rank(self, request: GenerateRequest, loads: list[int]) -> int:
        """The transfer runner's rule when bootstrap fields are present (so a router's choice holds),
        else the least-loaded group."""
        if request.sampling.seed is None and request.sampling.temperature > 0:
            request.sampling.seed = random.getrandbits(63)  # the same first token on every rank of a group
        boot = request.bootstrap
        if boot is None:
            return least_loaded(loads)
        try:
            return prefill_dp_group(self.layout, boot.room, boot.prefill_dp_rank)
        except KVTransferError:
            return least_loaded(loads)

    def group_load(self) -> dict[str, int]:
        """As the transfer runner's: jobs computing, jobs waiting for the batch, their prompts' tokens."""
        waiting = len(self.batcher.waiting)
        return {
            "running_requests": len(self.jobs) - waiting,
            "queued_requests": waiting,
            "tokens_in_flight": sum(len(job.prompt_ids) for _, job in self.jobs.values()),
        }

    def status_counts(self) -> dict[str, int]:
        pool = self.engine.kv_pool
        return {
            **self.group_load(),
            **pool.status_counts(),
            "prefill_tokens_computed": self.batcher.computed_tokens,
            # No transfer plane: zero by construction, reported so idle checks read alike.
            "live_rooms": 0,
            "inflight_handles": 0,
            "prefill_waiting": len(self.batcher.waiting),
            "prefill_rooms": len(self.jobs),
            "bench_dropped_requests": self.dropped_requests,
        }

    def close(self) -> None:
        for _, job in self.jobs.values():
            self.batcher.release(job)
        self.jobs.clear()
        self.stepper.close()
        if self.engine.moe is not None:
            self.engine.moe.close()
        self.engine.kv_pool.close()
