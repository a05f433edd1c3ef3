"""Continuous batching over the paged KV pool: request states, admission, chunked prefill, decode.

Each ``step()`` runs one forward: an EXTEND batch while some admitted request still has prompt
tokens to prefill (chunked to ``max_prefill_tokens``), otherwise a DECODE batch of every running
request. Prefill goes first (as SGLang's default): new requests join the running batch as soon as
their prompt is in, at the price of a decode pause while a prefill runs. Pages for a request's whole life (prompt + max_new_tokens) are taken at admission, so a
running request never waits for memory and nothing needs preempting.

With the pool's prefix cache (``engine.prefix_cache``), admission first takes the cached pages of the
prompt's longest cached full-page prefix and the prefill computes only the tokens after it (chunked as
usual); a request's full pages are published when its prompt is in and when it ends.

A decode worker feeds requests whose prompt KV was computed elsewhere through ``add_prefilled``: they
enter with their pages filled and their first output token, and go straight to decode. With decode-side
reuse their leading pages may be cached blocks this pool held already, and their pages join the prefix
cache at their end like a local request's.

With ``overlap`` (``engine.decode_overlap``), a decode turn whose requests carry no penalties, grammars or
log-probabilities launches the next forward before it reads the last one's tokens, so the GPU never waits for
the host between two steps.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.decode_overlap import LaunchedDecode
from engine.forward_batch import ForwardBatch, ForwardMode, ForwardOutput
from engine.grammar import GrammarRuntime, advance, constrain, finished, matcher_for
from engine.kv_pool import KVPool, PoolExhaustedError
from engine.model import DeepseekForCausalLM
from engine.prefill_chunks import build_extend_batch, plan_prefill_chunks, prompt_logprobs
from engine.prefix_cache import Block
from engine.sampling import (
    SamplingParams,
    apply_penalties,
    logprob_report,
    nonfinite_errors,
    nonfinite_rows,
    sample,
)
from engine.step_clock import StepClock


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no pages
    PREFILLING = "prefilling"  # holds pages, prompt KV partly computed
    DECODING = "decoding"  # prompt KV complete, generating
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: two requests with equal prompts are still distinct
class Request:
    """One sequence's state. ``num_computed`` counts tokens whose latent KV is in ``pages``."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    cache_blocks: list[Block] = field(default_factory=list)  # prefix-cache blocks held (pages[:len])
    cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache (None: prefilled elsewhere)
    # Prefilled elsewhere and kept in this instance's prefix cache at its end (decode-side reuse): prompt tokens
    # whose KV this instance held already, so they were not transferred. None: its KV is not kept.
    reused_tokens: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" (then `error` says why)
    error: str | None = None
    generator: torch.Generator | None = None
    # With `return_logprob`, the log-probability of each output token under the model's distribution
    # (log_softmax of the raw logits, float32: before temperature, top-k or top-p), one per output id.
    return_logprob: bool = False
    output_logprobs: list[float] = field(default_factory=list)
    top_logprobs: int = 0  # with return_logprob: this many most likely tokens per position, too
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    matcher: Any = None  # structured output: where the grammar stands after the output so far (engine.grammar)
    # Prompt log-probabilities: -1 off; k >= 0: each prompt token's logprob and its k most likely alternatives,
    # computed as the prompt's chunks run (None for token 0).
    prompt_logprobs: int = -1
    prompt_logprob_values: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def fill_ids(self) -> list[int]:
        """Tokens a prefill computes KV for: the prompt, and after a retraction the output but its last
        token too (that one's KV comes from the next decode step, as before the retraction)."""
        return self.prompt_ids + self.output_ids[:-1] if self.output_ids else self.prompt_ids

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class StepResult:
    """What one step produced: (request, token) for every token sampled, and requests that finished
    (``failed`` ones among them: finished with reason "error" and no token this step)."""

    new_tokens: list[tuple[Request, int]]
    finished: list[Request]
    failed: list[Request] = field(default_factory=list)

    def extend(self, other: StepResult) -> StepResult:
        self.new_tokens += other.new_tokens
        self.finished += other.finished
        self.failed += other.failed
        return self


class Scheduler:
    def __init__(self, model: DeepseekForCausalLM, kv_pool: KVPool, max_prefill_tokens: int = 8192,
                 max_running: int = 256, eos_token_ids: tuple[int, ...] = (),
                 decode_forward: Callable[[ForwardBatch], ForwardOutput] | None = None,
                 reserve_tokens: int | None = None, grammar: GrammarRuntime | None = None,
                 overlap: bool = False) -> None:
        """``decode_forward`` runs DECODE batches instead of the model (an ``engine.cuda_graph``
        runner, which falls back to the model for batches its graphs cannot take). ``grammar`` compiles
        the structured-output grammars of requests that carry one (without it they are refused).

        ``reserve_tokens``: None reserves a request's whole life at admission (prompt + max_new_tokens), so
        nothing ever waits or is preempted. A number N reserves the prompt + N output tokens instead; a
        decoding request then takes a page when it needs one, and when the pool has none (after evicting
        unreferenced cached pages) the newest running requests are retracted: their pages go back (full
        ones into the prefix cache), they wait at the head of the queue and are prefilled again, prompt and
        output so far, before they go on decoding (SGLang's retraction; greedy tokens stay the same).

        ``overlap``: overlapped decode turns (``engine.decode_overlap``) where no request needs its output so far
        on the host to draw its next token, and the whole life is reserved (no retraction while a forward is in
        flight); the same tokens, one turn later on the host. Worth it where the forward runs asynchronously
        (CUDA); on CPU it only delays."""
        if max_prefill_tokens < 1 or max_running < 1:
            raise ValueError("max_prefill_tokens and max_running must be >= 1")
        if reserve_tokens is not None and reserve_tokens < 1:
            raise ValueError(f"reserve_tokens must be >= 1, got {reserve_tokens}")
        self.reserve_tokens = reserve_tokens
        self.retractions = 0  # requests retracted so far, for /metrics
        self.model, self.kv_pool = model, kv_pool
        self.decode_forward: Callable[[ForwardBatch], ForwardOutput] = decode_forward or model
        self.max_prefill_tokens, self.max_running = max_prefill_tokens, max_running
        self.eos_token_ids = eos_token_ids
        self.grammar = grammar
        self.max_model_len = model.config.max_position_embeddings
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # PREFILLING and DECODING, in admission order
        self._ids = itertools.count()
        self.prefill_computed_tokens = 0  # prompt tokens run through forwards (cache hits are not), for /metrics
        self.clock = StepClock()  # a rank loop's runner replaces it (a device-aware one) and opens its turns
        self.overlap = overlap and reserve_tokens is None
        self._launched: LaunchedDecode | None = None  # overlap: the forward launched and not yet read
        self._unreleased: list[Request] = []  # finished while a launched forward still writes their pages

    # ---- entry points -------------------------------------------------------------------------
    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model takes at most {self.max_model_len - 1}")
        needed = self.whole_life_pages(len(prompt_ids), params)  # alone, any request can finish
        if needed > self.kv_pool.max_request_pages:
            raise ValueError(f"request needs {needed} KV pages but the pool has {self.kv_pool.max_request_pages}")

    def pages_needed(self, prompt_len: int, params: SamplingParams, generated: int = 0) -> int:
        """Pages reserved at admission for a request of `prompt_len` tokens that has `generated` output
        tokens already: room for them and every token it may still generate, or with `reserve_tokens` for
        that many more (at least the next one)."""
        remaining = max(1, params.max_new_tokens - generated)
        if self.reserve_tokens is not None:
            remaining = min(remaining, self.reserve_tokens)
        return self.kv_pool.pages_for_tokens(min(prompt_len + generated + remaining, self.max_model_len))

    def whole_life_pages(self, prompt_len: int, params: SamplingParams) -> int:
        return self.kv_pool.pages_for_tokens(min(prompt_len + params.max_new_tokens, self.max_model_len))

    def new_matcher(self, params: SamplingParams) -> Any:
        """A fresh grammar matcher for a request's structured output, or None; ValueError if it cannot be."""
        return matcher_for(self.grammar, params.grammar)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        self.validate_prompt(prompt_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params)
        req.matcher = self.new_matcher(params)
        self.waiting.append(req)
        return req

    def add_prefilled(self, prompt_ids: list[int], first_token: int, pages: list[int], params: SamplingParams,
                      request_id: str | None = None, held: list[Block] | None = None) -> Request:
        """Adopt a request whose prompt KV is already in ``pages`` (now owned by the scheduler) and whose
        first output token is known; allocates the rest of its pages now. On any error (bad input,
        PoolExhaustedError) nothing is taken and the caller still owns ``pages``.

        ``held``: decode-side reuse. The prefix-cache blocks the caller holds for ``pages[:len(held)]`` (its
        KV was here already; the rest was written by the prefill instance): the request takes over the hold,
        and at its end its full pages, output included, join this pool's prefix cache, so the conversation's
        next turn finds them. None: the KV is freed at the end, not kept."""
        self.validate_prompt(prompt_ids, params)
        if not 0 <= first_token < self.model.config.vocab_size:
            raise ValueError(f"first token {first_token} is outside the vocabulary")
        if len(pages) * self.kv_pool.page_size < len(prompt_ids):
            raise ValueError(f"{len(pages)} pages cannot hold a prompt of {len(prompt_ids)} tokens")
        # The first token was drawn under the same grammar where the prompt ran: replay it, so the matcher
        # stands where an uninterrupted run's would before it masks token 1.
        matcher = self.new_matcher(params)
        if matcher is not None and not advance(matcher, first_token):
            raise ValueError(f"first token {first_token} is not allowed by the request's grammar")
        extra = max(0, self.pages_needed(len(prompt_ids), params) - len(pages))
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params)
        req.pages = list(pages) + self.kv_pool.alloc(extra, after=pages)
        if held is not None:
            req.cache_blocks = list(held)
            req.reused_tokens = len(held) * self.kv_pool.page_size
        req.num_computed = len(prompt_ids)
        req.status = RequestStatus.DECODING
        req.generator = params.make_generator(self.kv_pool.tensor.device)
        req.matcher = matcher
        self.running.append(req)
        self._append_token(req, first_token, advanced=True)
        if req.finished:
            self.running.remove(req)
        return req

    def abort(self, request: Request) -> None:
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
        self._finish(request, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._launched)

    # ---- one iteration ------------------------------------------------------------------------
    def step(self) -> StepResult:
        self._admit()
        prefilling = [r for r in self.running if r.status is RequestStatus.PREFILLING]
        decoding = [r for r in self.running if r.status is RequestStatus.DECODING]
        if not prefilling and self.overlap and all(map(_overlappable, decoding)):
            result = self._run_decode_overlapped(decoding)
        else:
            result = self.read_launched()  # a plain step needs every token so far on the host
            if prefilling:
                result.extend(self._run_extend(prefilling))
            else:
                decoding = self._grow_pages([r for r in self.running if r.status is RequestStatus.DECODING])
                if decoding:
                    result.extend(self._run_decode(decoding))
        self.running = [r for r in self.running if not r.finished]
        return result

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            try:
                # A prefix-cache hit gives the leading pages; the prefill starts after them.
                # Prompt log-probabilities need every prompt position's logits: no cached prefix for them.
                req.pages, req.cache_blocks = self.kv_pool.alloc_for_prompt(
                    req.fill_ids, self.pages_needed(len(req.prompt_ids), req.params, len(req.output_ids)),
                    use_cache=req.prompt_logprobs < 0)
            except PoolExhaustedError:
                return  # FIFO: wait until running requests free their pages (cached ones were evicted)
            req.num_computed = len(req.cache_blocks) * self.kv_pool.page_size
            if not req.output_ids:  # a retracted request keeps what its first admission hit
                req.cached_tokens = req.num_computed
            self.waiting.popleft()
            req.status = RequestStatus.PREFILLING
            req.generator = req.params.make_generator(self.kv_pool.tensor.device)
            self.running.append(req)

    def _run_extend(self, prefilling: list[Request]) -> StepResult:
        chunks = plan_prefill_chunks(prefilling, self.max_prefill_tokens)
        # Prompt positions only: a retracted request prefilled again (prompt and output) was scored already.
        scoring = any(req.prompt_logprobs >= 0 and req.num_computed < len(req.prompt_ids) for req, _ in chunks)
        batch = build_extend_batch(chunks, self.kv_pool, vocab_size=self.model.config.vocab_size,
                                   return_all_logits=scoring)
        self.prefill_computed_tokens += sum(n for _, n in chunks)
        out = self.model(batch)
        logits = out.next_token_logits
        if scoring:
            assert out.all_logits is not None
            first = 0
            for req, n in chunks:
                if req.prompt_logprobs >= 0 and req.num_computed < len(req.prompt_ids):
                    values, tops = prompt_logprobs(req.prompt_ids, req.num_computed, out.all_logits[first : first + n],
                                                   req.prompt_logprobs)
                    req.prompt_logprob_values += values
                    req.prompt_top_logprobs += tops
                first += n
        done_rows, done_reqs = [], []
        for row, (req, n) in enumerate(chunks):
            req.num_computed += n
            if req.num_computed == len(req.fill_ids):
                req.status = RequestStatus.DECODING
                # Shared from now on: a later request with the same prompt prefix reuses these pages.
                req.cache_blocks = self.kv_pool.publish(req.fill_ids, req.pages, req.cache_blocks)
                if not req.output_ids:  # a retracted request has its next token already
                    done_rows.append(row)
                    done_reqs.append(req)
        return self._sample_and_append(logits[done_rows], done_reqs)

    def _grow_pages(self, decoding: list[Request]) -> list[Request]:
        """Give every decoding request the page its next token's KV goes to, oldest first; when the pool has
        none left, retract the newest running requests. Returns the requests that decode this step."""
        size = self.kv_pool.page_size
        for req in decoding:
            while req.status is RequestStatus.DECODING and len(req.pages) * size < req.seq_len:
                try:
                    req.pages += self.kv_pool.alloc(1, after=req.pages)
                except PoolExhaustedError:
                    # The newest whose pages free room where `req` grows (a sharded pool's shard): maybe `req`.
                    self._retract(next(r for r in reversed(self.running) if self.kv_pool.same_shard(r.pages, req.pages)))
        return [r for r in decoding if r.status is RequestStatus.DECODING]

    def _retract(self, req: Request) -> None:
        """Give `req`'s pages back and queue it first to be prefilled again (only DECODING requests are
        retracted: a step with prefills to run runs no decode)."""
        computed = (req.prompt_ids + req.output_ids)[: req.num_computed]
        held = self.kv_pool.publish(computed, req.pages, req.cache_blocks)  # the recompute may hit them
        self.kv_pool.release(req.pages, held)
        req.pages, req.cache_blocks, req.num_computed = [], [], 0
        req.status = RequestStatus.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)  # admitted before every waiting request: first again
        self.retractions += 1

    def _run_decode(self, decoding: list[Request]) -> StepResult:
        clock = self.clock
        clock.lap("schedule")
        batch = ForwardBatch.build(
            ForwardMode.DECODE,
            [[req.output_ids[-1]] for req in decoding],
            [req.seq_len - 1 for req in decoding],
            [req.pages for req in decoding],
            self.kv_pool,
            vocab_size=self.model.config.vocab_size,
        )
        clock.forward_begins()
        logits = self.decode_forward(batch).next_token_logits
        clock.forward_ends()
        for req in decoding:
            req.num_computed += 1
        result = self._sample_and_append(logits, decoding)
        clock.lap("sample")
        return result

    def _run_decode_overlapped(self, decoding: list[Request]) -> StepResult:
        """Launch this turn's forward, then read the previous one's tokens while it runs. A request whose token
        is still on the device takes it from there; one that ends by length with that token sits this out."""
        clock, before = self.clock, self._launched
        clock.lap("schedule")
        rows: list[Request] = []
        ids: list[list[int]] = []
        prefix: list[int] = []
        positions: list[int] = []  # the output index each row draws
        src_rows: list[int] = []
        dst_rows: list[int] = []
        for req in decoding:
            src = before.row_of.get(req) if before is not None else None
            if src is None:  # its last token is on the host: a request that joined since
                ids.append([req.output_ids[-1]])
                prefix.append(req.seq_len - 1)
                positions.append(len(req.output_ids))
            elif self._ends_by_length(req, pending=1):
                continue
            else:
                src_rows.append(src)
                dst_rows.append(len(rows))
                ids.append([0])  # the token comes from the device (`LaunchedDecode.feed`)
                prefix.append(req.seq_len)
                positions.append(len(req.output_ids) + 1)
            rows.append(req)
        if rows:
            batch = ForwardBatch.build(ForwardMode.DECODE, ids, prefix, [req.pages for req in rows], self.kv_pool,
                                       vocab_size=self.model.config.vocab_size)
            if before is not None:
                before.feed(batch.input_ids, src_rows, dst_rows)
            clock.forward_begins()
            logits = self.decode_forward(batch).next_token_logits
            self._launched = LaunchedDecode.read_back(rows, logits, positions)
            clock.forward_ends()
        else:
            self._launched = None
        result = self._read(before) if before is not None else StepResult([], [])
        clock.lap("sample")
        return result

    def _ends_by_length(self, req: Request, pending: int = 0) -> bool:
        """Whether `req` ends by length once it has `pending` more tokens (`_append_token`'s rule)."""
        return (len(req.output_ids) + pending >= req.params.max_new_tokens
                or req.seq_len + pending >= self.max_model_len)

    def read_launched(self) -> StepResult:
        """The launched forward's tokens, read and appended (waits for it): nothing stays in flight."""
        launched, self._launched = self._launched, None
        return self._read(launched) if launched is not None else StepResult([], [])

    def _read(self, launched: LaunchedDecode) -> StepResult:
        """Append a launched forward's tokens to its requests (a row whose request ended meanwhile is dropped),
        then give back the pages no launched forward writes any more."""
        tokens, bad = launched.results()
        result = StepResult([], [])
        errors = {**launched.draw_errors, **nonfinite_errors(bad)}
        for row, req in enumerate(launched.reqs):
            if req.finished:  # aborted, or it ended on a stop token one turn before: this row is void
                continue
            req.num_computed += 1
            if row in errors:
                req.error = errors[row]
                self._finish(req, "error")
                result.failed.append(req)
            else:
                self._append_token(req, tokens[row])
                result.new_tokens.append((req, tokens[row]))
            if req.finished:
                result.finished.append(req)
        held = self._launched.row_of if self._launched is not None else {}
        waiting, self._unreleased = self._unreleased, []
        for req in waiting:
            if req in held:
                self._unreleased.append(req)
            else:
                self._release(req)
        return result

    def _sample_and_append(self, logits: torch.Tensor, reqs: list[Request]) -> StepResult:
        result = StepResult([], [])
        if not reqs:
            return result
        # Position-seeded: a request's token i is the same whether or not an earlier token was sampled
        # in another process (add_prefilled).
        positions = [len(r.output_ids) for r in reqs]
        params = [r.params for r in reqs]
        penalised = apply_penalties(logits, params, [r.prompt_ids for r in reqs], [r.output_ids for r in reqs],
                                    self.eos_token_ids)
        penalised = constrain(penalised, [r.matcher for r in reqs], copied=penalised is not logits)
        tokens, errors = sample(penalised, params, [r.generator for r in reqs], positions)
        errors.update(nonfinite_rows(logits))
        if errors:  # those requests fail alone; the rest of the batch goes on
            for i, message in errors.items():
                reqs[i].error = message
                self._finish(reqs[i], "error")
                result.finished.append(reqs[i])
                result.failed.append(reqs[i])
            keep = [i for i in range(len(reqs)) if i not in errors]
            logits, reqs, tokens = logits[keep], [reqs[i] for i in keep], [tokens[i] for i in keep]
        wanted = [i for i, r in enumerate(reqs) if r.return_logprob]
        if wanted:
            chosen, tops = logprob_report(logits[wanted], [tokens[i] for i in wanted],
                                          [reqs[i].top_logprobs for i in wanted])  # fmt: skip
            for i, logprob, top in zip(wanted, chosen, tops, strict=True):
                reqs[i].output_logprobs.append(logprob)
                if reqs[i].top_logprobs:
                    reqs[i].output_top_logprobs.append(top)
        for req, token in zip(reqs, tokens, strict=True):
            self._append_token(req, token)
            result.new_tokens.append((req, token))
            if req.finished:
                result.finished.append(req)
        return result

    def _append_token(self, req: Request, token: int, advanced: bool = False) -> None:
        """Append a drawn token and finish the request if it ends it. `advanced`: the grammar matcher has
        taken the token already."""
        req.output_ids.append(token)
        p = req.params
        if req.matcher is not None and not advanced and not advance(req.matcher, token):
            req.error = f"token {token} is not allowed by the request's grammar"  # the mask said it was
            self._finish(req, "error")
        elif token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            self._finish(req, "stop")
        elif req.matcher is not None and finished(req.matcher):
            self._finish(req, "stop")  # the grammar is complete: nothing more may follow
        elif self._ends_by_length(req):
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if self._launched is not None and req in self._launched.row_of:
            self._unreleased.append(req)  # a launched forward still writes its next KV: released once read
        else:
            self._release(req)

    def _release(self, req: Request) -> None:
        if req.pages:
            held = req.cache_blocks
            if req.cached_tokens is not None or req.reused_tokens is not None:  # prefilled here, or kept
                # Every page whose tokens all have KV joins the cache (the output's too: a chat's next turn
                # starts with this one's answer); the partial last page is private and freed.
                computed = (req.prompt_ids + req.output_ids)[: req.num_computed]
                held = self.kv_pool.publish(computed, req.pages, held)
            self.kv_pool.release(req.pages, held)
            req.pages, req.cache_blocks = [], []


def _overlappable(req: Request) -> bool:
    """Whether `req`'s next token depends on its logits and generator alone (no output history, grammar state or
    log-probability on the host): an overlapped turn draws it on the device."""
    p = req.params
    return not p.penalised and req.matcher is None and not req.return_logprob and not req.top_logprobs
