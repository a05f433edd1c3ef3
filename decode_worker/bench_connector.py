"""The decode role with the benchmarking KV connector (`--kv-connector bench`): decode profiled alone.

Every request (with bootstrap fields or without) is served as if its prompt's KV had just arrived from a
prefill instance: pages for its whole life are reserved (FIFO, like a real transfer), the prompt's pages
are filled with seeded standard-normal values in the model dtype (the scale of real latent KV: the
compressed part comes out of an RMSNorm, the rope part out of a linear layer and a rotation, both O(1)),
the first output token is drawn at random, and the request joins the continuous batch. No transfer
engine, no bootstrap service, no prefill instance: decode throughput at any input length costs only the
decode instance. The numbers are not end-to-end; the worker says so (`engine.runtime.disagg`).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import torch

from decode_worker.prefilled import PrefilledKVRunner
from engine.kv_pool import PoolExhaustedError
from engine.kv_shards import ShardedKVPool
from engine.runtime.colocated import EngineArgs, RankEngine
from engine.runtime.launch import RankContext
from engine.sampling import SamplingParams
from engine.server.messages import GenerateRequest, TokenOutput


@torch.inference_mode()
def fill_pages(pool: torch.Tensor, pages: list[int], generator: torch.Generator) -> None:
    """Standard-normal values in every layer of `pages` of `pool`, in place: one `normal_` per contiguous run
    of pages (the allocator prefers runs), so no temporary as large as the prompt's KV is made. An FP8 pool
    (`--kv-cache-dtype fp8_e4m3`) has no `normal_` kernel: values are drawn in float32 one page at a time (a
    temporary of one page) and stored quantized (scale 1.0, the pool's)."""
    start = 0
    for i in range(1, len(pages) + 1):
        if i == len(pages) or pages[i] != pages[i - 1] + 1:
            run = pool[pages[start] : pages[i - 1] + 1]
            if run.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                for page in run:
                    page.copy_(torch.randn(page.shape, generator=generator, device=page.device))
            else:
                run.normal_(generator=generator)
            start = i


@dataclass(eq=False)
class QueuedRequest:
    """A request waiting for pages; nothing is allocated for it yet."""

    request: GenerateRequest
    params: SamplingParams


class BenchDecodeRunner(PrefilledKVRunner):
    """`StepRunner` of a decode worker whose KV comes from the bench connector.

    Args:
        ctx: this rank.
        engine: the rank's model and KV pool (`build_rank_engine`).
        args: engine settings (batch limit).
        cuda_graph_max_bs: as `PrefilledKVRunner`'s.
        seed: seeds the fill values and first tokens. Every rank of an attention-DP group uses the same
            seed and sees the same requests in the same order, so the group's ranks hold the same latent
            KV and decode the same tokens, as they would after a real transfer.
    """

    def __init__(
        self,
        ctx: RankContext,
        engine: RankEngine,
        args: EngineArgs,
        cuda_graph_max_bs: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(ctx, engine, args, cuda_graph_max_bs)
        pool = engine.kv_pool.tensor
        self.fill_generator = torch.Generator(device=pool.device).manual_seed(seed)
        self.token_rng = random.Random(seed)
        eos = set(engine.config.eos_token_ids)
        # A first token that is EOS would end requests that do not ignore EOS at once: skip those ids.
        self.first_token_choices = [t for t in range(engine.config.vocab_size) if t not in eos]
        self.queued: deque[QueuedRequest] = deque()
        self.filled_requests = 0

    # --- StepRunner ---------------------------------------------------------------------------------
    def add(self, request: GenerateRequest) -> None:
        # Bootstrap fields, if any, are ignored: the bench connector is the KV's only source.
        params = self._accept(request)
        if params is not None:
            self.queued.append(QueuedRequest(request, params))

    def abort(self, rid: str) -> list[TokenOutput]:
        if rid in self.requests:
            return super().abort(rid)
        for queued in self.queued:
            if queued.request.rid == rid:
                self.queued.remove(queued)
                return [TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="abort")]
        return []

    def num_requests(self) -> int:
        return len(self.requests) + len(self.queued)

    def step(self) -> list[TokenOutput]:
        if self.queued:
            self._admit_filled()
        self.clock.lap("transfers")  # the connector's fill stands in for the transfer
        return super().step()

    def group_load(self) -> dict[str, int]:
        """The batch's load plus the requests waiting for pages (their KV is filled once they have them)."""
        load = super().group_load()
        load["queued_requests"] += len(self.queued)
        load["tokens_in_flight"] += sum(len(q.request.input_ids) for q in self.queued)
        return load

    def status_counts(self) -> dict[str, int]:
        counts = super().status_counts()
        counts.update(
            {
                # No transfer plane: these are zero by construction, reported so idle checks read alike.
                "live_rooms": 0,
                "inflight_handles": 0,
                "decode_queued": len(self.queued),
                "decode_running": len(self.requests),
                "bench_filled_requests": self.filled_requests,
            }
        )
        return counts

    def close(self) -> None:
        self.queued.clear()
        super().close()

    # --- the bench connector ------------------------------------------------------------------------
    def _is_waiting(self, rid: str) -> bool:
        return any(q.request.rid == rid for q in self.queued)

    def _admit_filled(self) -> None:
        """Oldest first, while the batch has room and the pool has pages for a request's whole life
        (the same admission rule as `DecodeRunner`'s transfers): fill its prompt pages and adopt it."""
        pool = self.engine.kv_pool
        while self.queued:
            queued = self.queued[0]
            request, params = queued.request, queued.params
            prompt_len = len(request.input_ids)
            if not self._has_room(prompt_len, params):
                return
            try:
                prompt_pages = pool.alloc(pool.pages_for_tokens(prompt_len))
            except PoolExhaustedError:  # a sharded pool: room in total, not on any one rank
                return
            self.queued.popleft()
            self._fill(prompt_pages)
            first = self.token_rng.choice(self.first_token_choices)
            self.filled_requests += 1
            if not self._join_batch(request, first, prompt_pages, params):
                pool.free(prompt_pages)  # add_prefilled took nothing

    def _fill(self, pages: list[int]) -> None:
        pool = self.engine.kv_pool
        if isinstance(pool, ShardedKVPool):  # MLA-core DP: only the owner holds the pages
            if not pool.owns(pages):
                return
            pages = pool.local_pages(pages)
        fill_pages(pool.tensor, pages, self.fill_generator)
