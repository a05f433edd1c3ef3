"""Chunked prefill without decode: the prefill role's scheduler on one rank.

Requests are admitted FIFO while pages for their prompt are free, and prefilled together under a token
budget per forward (`max_prefill_tokens`, chunking long prompts). A request leaves the batcher after its
last chunk with its first output token sampled; its pages stay allocated until the caller `release`s
them (once the KV has reached the decode side).

Each step reports, per request that made progress, the pages the chunk completed: a page is sent once,
when every token in it is computed (the partial last page goes with the last chunk), so no destination
page is ever written twice. With the pool's prefix cache a job starts with the cached pages of its prompt's
prefix, computes only the rest, and its first chunk reports the cached pages with its own: decode still
gets the whole prompt's KV.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from engine.grammar import GrammarRuntime, constrain, matcher_for
from engine.kv_pool import KVPool, PoolExhaustedError
from engine.model import DeepseekForCausalLM
from engine.prefill_chunks import build_extend_batch, plan_prefill_chunks
from engine.prefix_cache import Block
from engine.sampling import SamplingParams, apply_penalties, logprob_report, nonfinite_rows, sample


@dataclass(eq=False)  # identity semantics: two requests with equal prompts are still distinct
class PrefillJob:
    """One prompt's prefill. `num_computed` tokens have KV in `pages`; `pages_done` pages were reported."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    pages: list[int] = field(default_factory=list)
    cache_blocks: list[Block] = field(default_factory=list)  # prefix-cache blocks held (pages[:len])
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache: not computed here
    num_computed: int = 0
    pages_done: int = 0
    first_token: int | None = None
    error: str | None = None  # set instead of `first_token` when drawing it failed: this job fails alone
    first_logprob: float = 0.0
    top_logprobs: int = 0  # alternatives to report for the first token (sent on with it)
    first_top: tuple[tuple[int, float], ...] = ()
    owner: int | None = None  # MLA-core DP: the rank whose pool shard holds the pages (room % tp)

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids

    @property
    def prefilled(self) -> bool:
        return self.num_computed == len(self.prompt_ids)


@dataclass
class ChunkDone:
    """Pages `pages` (this rank's indices) are computed; they are the prompt's pages from `position` on.
    `last`: the prompt is complete and `job.first_token` (or, when its draw failed, `job.error`) is set."""

    job: PrefillJob
    pages: list[int]
    position: int
    last: bool


class PrefillBatcher:
    """Admission, chunking and first-token sampling; owns the allocation of each job's pages.

    Args:
        model: this rank's model shard.
        kv_pool: this rank's KV pool (pages are allocated here, freed by `release`).
        max_prefill_tokens: tokens per forward, summed over the batch.
        max_running: jobs holding pages at once (prefilling or waiting for their transfer).
        grammar: compiles structured-output grammars; the first token is drawn under its mask, through the
            same `engine.grammar` path as every later token on the decode side (None: such jobs are refused).
    """

    def __init__(
        self, model: DeepseekForCausalLM, kv_pool: KVPool, max_prefill_tokens: int, max_running: int,
        grammar: GrammarRuntime | None = None,
    ) -> None:
        if max_prefill_tokens < 1 or max_running < 1:
            raise ValueError("max_prefill_tokens and max_running must be >= 1")
        self.model, self.kv_pool = model, kv_pool
        self.max_prefill_tokens, self.max_running = max_prefill_tokens, max_running
        self.max_model_len = model.config.max_position_embeddings
        self.grammar = grammar
        self.waiting: deque[PrefillJob] = deque()
        self.prefilling: list[PrefillJob] = []
        self.holding: set[PrefillJob] = set()  # jobs with pages: prefilling or done and not released
        self.computed_tokens = 0  # prompt tokens run through forwards (cache hits are not), for /metrics

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the model takes at most {self.max_model_len - 1}"
            )
        if self.kv_pool.pages_for_tokens(len(prompt_ids)) > self.kv_pool.max_request_pages:
            raise ValueError(
                f"prompt needs {self.kv_pool.pages_for_tokens(len(prompt_ids))} KV pages but the "
                f"pool has {self.kv_pool.max_request_pages}"
            )
        self._matcher(params)  # compiles (and caches) the grammar now: a bad one is refused before any work

    def _matcher(self, params: SamplingParams) -> object:
        return matcher_for(self.grammar, params.grammar)

    def add(self, job: PrefillJob) -> None:
        self.validate(job.prompt_ids, job.params)
        self.waiting.append(job)

    def remove(self, job: PrefillJob) -> None:
        """Stop computing `job` (aborted or failed); its pages stay held until `release`."""
        if job in self.waiting:
            self.waiting.remove(job)
        elif job in self.prefilling:
            self.prefilling.remove(job)

    def release(self, job: PrefillJob) -> None:
        """Free `job`'s pages (its KV is no longer needed anywhere)."""
        self.remove(job)
        if job in self.holding:
            self.holding.discard(job)
            self.kv_pool.release(job.pages, job.cache_blocks)
            job.pages, job.cache_blocks = [], []

    @property
    def num_jobs(self) -> int:
        return len(self.waiting) + len(self.holding)

    def has_work(self) -> bool:
        self._admit()
        return bool(self.prefilling)

    def _admit(self) -> None:
        while self.waiting and len(self.holding) < self.max_running:
            job = self.waiting[0]
            try:
                # A prefix-cache hit gives the leading pages (held until `release`, so no eviction can
                # take them while the transfer reads them); the prefill computes only the rest.
                job.pages, job.cache_blocks = self.kv_pool.alloc_for_prompt(
                    job.prompt_ids, self.kv_pool.pages_for_tokens(len(job.prompt_ids)), shard=job.owner)
            except PoolExhaustedError:
                return  # FIFO: wait until transfers end and free their pages (cached ones were evicted)
            job.num_computed = job.cached_tokens = len(job.cache_blocks) * self.kv_pool.page_size
            self.waiting.popleft()
            self.holding.add(job)
            self.prefilling.append(job)

    @torch.inference_mode()
    def step(self) -> list[ChunkDone]:
        """One EXTEND forward over the admitted jobs (oldest first, up to the token budget)."""
        self._admit()
        if not self.prefilling:
            return []
        chunks = plan_prefill_chunks(self.prefilling, self.max_prefill_tokens)
        batch = build_extend_batch(chunks, self.kv_pool)  # token ids were checked by `add`
        self.computed_tokens += sum(n for _, n in chunks)
        logits = self.model(batch).next_token_logits
        done: list[ChunkDone] = []
        finished_rows: list[int] = []
        for row, (job, n) in enumerate(chunks):
            job.num_computed += n
            # Complete pages only, except the last chunk's partial page: each page is reported once.
            upto = len(job.pages) if job.prefilled else job.num_computed // self.kv_pool.page_size
            if upto > job.pages_done:
                done.append(ChunkDone(job, job.pages[job.pages_done : upto], job.pages_done, job.prefilled))
                job.pages_done = upto
            if job.prefilled:
                finished_rows.append(row)
                # The prompt's full pages are shared from now on (the partial last page stays private).
                job.cache_blocks = self.kv_pool.publish(job.prompt_ids, job.pages, job.cache_blocks)
        if finished_rows:
            self._sample_first_tokens(logits[finished_rows], [chunks[r][0] for r in finished_rows])
            self.prefilling = [job for job in self.prefilling if not job.prefilled]
        if done and logits.device.type == "cuda":
            # The caller hands these pages to the transfer engine at once, and its copies run on the
            # engine's own CUDA streams (UCX cuda_ipc, Mooncake nvlink), unordered with this forward's
            # kernels: a chunk's pages must be written before they are read. Sampling synchronised already
            # when a job finished; a step of intermediate chunks only would not have.
            torch.cuda.current_stream(logits.device).synchronize()
        return done

    def _sample_first_tokens(self, logits: torch.Tensor, jobs: list[PrefillJob]) -> None:
        device = self.kv_pool.tensor.device
        params = [job.params for job in jobs]
        penalised = apply_penalties(logits, params, [job.prompt_ids for job in jobs], [[] for _ in jobs],
                                    self.model.config.eos_token_ids)
        # Token 0 under the grammar's first mask; the decode side replays it into its own matcher.
        penalised = constrain(penalised, [self._matcher(p) for p in params], copied=penalised is not logits)
        tokens, errors = sample(penalised, params, [job.params.make_generator(device) for job in jobs])
        errors.update(nonfinite_rows(logits))  # its first token and logprob would be NaN: the room fails alone
        for i, message in errors.items():
            jobs[i].error = message
        tokens = [0 if i in errors else t for i, t in enumerate(tokens)]  # a valid id for the report below
        chosen, tops = logprob_report(logits, tokens, [job.top_logprobs for job in jobs])
        for job, token, logprob, top in zip(jobs, tokens, chosen, tops, strict=True):
            if job.error is not None:
                continue
            job.first_token = token
            job.first_logprob = logprob
            job.first_top = tuple(top)
