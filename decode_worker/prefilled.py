"""What the two decode runners share: requests whose prompt KV arrives in this rank's pages from elsewhere
(a prefill instance's transfer, `DecodeRunner`; or the bench connector's fill, `BenchDecodeRunner`).

Both queue a request FIFO until the batch has room and the pool has pages for its whole life, then, once
its prompt KV is in place, hand the pages and the first token to the scheduler (`add_prefilled`).
"""

from __future__ import annotations

import logging

from engine.cuda_graph import CudaGraphRunner
from engine.kv_pool import PoolExhaustedError
from engine.prefix_cache import Block
from engine.runtime.colocated import (
    ColocatedRunner,
    EngineArgs,
    RankEngine,
    duplicate_output,
    error_output,
    rejected_output,
    to_sampling_params,
)
from engine.runtime.launch import RankContext
from engine.sampling import SamplingParams
from engine.server.messages import GenerateRequest, TokenOutput

log = logging.getLogger(__name__)


def attach_cuda_graphs(
    ctx: RankContext, engine: RankEngine, runner: ColocatedRunner, max_bs: int
) -> CudaGraphRunner | None:
    """Decode batches up to `max_bs` through captured CUDA graphs (`engine.cuda_graph`), or None: eager.
    At tp > 1 the graphs hold the EP exchange when the MoE runs in low-latency mode (the decode worker's);
    every rank decides alike (same model, same arguments), so either all capture or none does.
    The caller owns (closes) the result."""
    if not max_bs:
        return None
    try:
        graph_runner = CudaGraphRunner(engine.model, engine.kv_pool, max_bs)
    except ValueError as exc:  # a model the graphs cannot take: serve eagerly, and say why
        log.warning("--cuda-graph-max-bs %d: decoding eagerly at tp %d: %s", max_bs, ctx.spec.tp_size, exc)
        return None
    runner.scheduler.decode_forward = graph_runner
    return graph_runner


class PrefilledKVRunner(ColocatedRunner):
    """The colocated runner plus admission of requests whose prompt KV is written into our pages.

    Args:
        ctx: this rank.
        engine: the rank's model and KV pool (`build_rank_engine`).
        args: engine settings (batch limit).
        cuda_graph_max_bs: decode batches up to this size replay CUDA graphs (`engine.cuda_graph`); 0: eager.
            At tp > 1 with the low-latency EP mode only (the graphs hold its fixed-shape exchange); on CPU
            the same padded graph-safe path runs eagerly.
    """

    def __init__(
        self, ctx: RankContext, engine: RankEngine, args: EngineArgs, cuda_graph_max_bs: int = 0
    ) -> None:
        super().__init__(engine, args)
        self.graph_runner = attach_cuda_graphs(ctx, engine, self, cuda_graph_max_bs)

    def status_counts(self) -> dict[str, int]:
        counts = super().status_counts()
        if self.graph_runner is not None:  # its scratch page is held for the runner's whole life
            counts["total_pages"] -= 1
        return counts

    def close(self) -> None:
        if self.graph_runner is not None:
            self.graph_runner.close()  # returns its scratch page before the pool goes
        super().close()

    # --- for the subclasses ---------------------------------------------------------------------------
    def _is_waiting(self, rid: str) -> bool:
        """Whether `rid` waits in the subclass's own stage (queued, transferring) before the batch."""
        raise NotImplementedError

    def _accept(self, request: GenerateRequest) -> SamplingParams | None:
        """The request's sampling params if it may wait for its KV; else None, its error output queued."""
        if request.rid in self.requests or self._is_waiting(request.rid):
            self._pending.append(duplicate_output(request.rid))
            return None
        try:
            params = to_sampling_params(request.sampling)
            self.scheduler.validate_prompt(request.input_ids, params)
        except ValueError as exc:
            self._pending.append(rejected_output(request.rid, exc))
            return None
        return params

    def _has_batch_room(self, in_flight: int = 0) -> bool:
        """Whether the batch (with `in_flight` requests already holding pages) takes one more request."""
        busy = len(self.scheduler.running) + len(self.scheduler.waiting) + in_flight
        return busy < self.scheduler.max_running

    def _has_room(self, prompt_len: int, params: SamplingParams, in_flight: int = 0) -> bool:
        """Whether the batch takes one more request (`_has_batch_room`) and the pool has pages for its whole
        life."""
        return self._has_batch_room(in_flight) and self.scheduler.pages_needed(prompt_len, params) <= (
            self.engine.kv_pool.available_pages
        )

    def _join_batch(
        self, request: GenerateRequest, first: int, pages: list[int], params: SamplingParams,
        first_logprob: float = 0.0, first_top: tuple[tuple[int, float], ...] = (), held: list[Block] | None = None,
    ) -> bool:
        """Hand `pages` (the prompt's KV first) and the first token (and its log-probability, sampled where
        the prompt was prefilled) to the scheduler and stream the token. False: the scheduler refused (its
        error output queued) and took nothing: the caller frees `pages`. `held`: decode-side reuse, as
        `Scheduler.add_prefilled`'s (the first output then says how many prompt tokens were held here)."""
        try:
            req = self.scheduler.add_prefilled(request.input_ids, first, pages, params, request.rid, held)
        except ValueError as exc:
            self._pending.append(rejected_output(request.rid, exc))
            return False
        except PoolExhaustedError as exc:  # the server's shortage, not the request's fault
            self._pending.append(error_output(request.rid, str(exc), 503, "out_of_pages"))
            return False
        req.return_logprob, req.top_logprobs = request.return_logprob, request.top_logprobs
        if request.return_logprob:
            req.output_logprobs.append(first_logprob)
        if request.top_logprobs:
            req.output_top_logprobs.append(list(first_top))
        self._pending.append(
            TokenOutput(
                rid=request.rid,
                token_ids=[first],
                finished=req.finished,
                finish_reason=req.finish_reason if req.finished else None,
                prompt_tokens=len(request.input_ids),
                kv_reused_tokens=req.reused_tokens,
                logprobs=[first_logprob] if request.return_logprob else [],
                top_logprobs=[list(first_top)] if request.top_logprobs else [],
            )
        )
        if not req.finished:
            self.requests[request.rid] = req
        return True
