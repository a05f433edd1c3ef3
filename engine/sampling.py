"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.grammar import GrammarSpec

log = logging.getLogger(__name__)

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing float32 logits by a smaller one
# overflows to inf, and the argmax is what such a temperature means anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature`` 0 (below ``MIN_SAMPLING_TEMPERATURE``) is greedy.

    ``top_k`` 0 or -1 = off; ``top_p`` 1.0 = off; ``seed`` None = nondeterministic.
    Generation stops on an EOS (unless ``ignore_eos``), on any of ``stop_token_ids`` (the stop
    token is kept in the output), or after ``max_new_tokens``.
    Penalties (``apply_penalties``), applied to the logits before any of the above: OpenAI's
    ``presence_penalty`` and ``frequency_penalty`` (over the output so far, in [-2, 2]) and
    ``repetition_penalty`` (over prompt and output, transformers' rule; 1.0 = off), then OpenAI's
    ``logit_bias`` ((token id, bias) pairs, bias in [-100, 100], added to those tokens' logits).
    ``min_new_tokens``: until the output has this many tokens, EOS and ``stop_token_ids`` cannot be drawn.
    ``min_p`` (vLLM's and SGLang's; 0 = off): after temperature, tokens whose probability is below ``min_p``
    times the best token's are dropped.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_new_tokens: int = 0
    min_p: float = 0.0
    grammar: GrammarSpec | None = None  # structured output: every token is masked by it (engine.grammar)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias entries must be (token id >= 0, bias in [-100, 100]), got {token}: {bias}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_new_tokens)

    def step_seed(self, position: int) -> int:
        """The generator seed for the output token at ``position`` of a seeded request: a function of
        (seed, position) only, so a request resumed elsewhere (its first token sampled on the prefill
        instance, the rest on the decode instance) draws what an uninterrupted run draws."""
        if self.seed is None:
            raise ValueError("an unseeded request has no step seed")
        return _mix64(_mix64(self.seed & _MASK64) ^ position)

    def make_generator(self, device: torch.device | str, position: int = 0) -> torch.Generator | None:
        """None when greedy; else a generator ready to draw the output token at ``position``. Unseeded:
        seeded at random once, and its running state drives every later draw."""
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.step_seed(position))
        return gen


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: nearby inputs (seed s at positions i and i + 1) give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]], eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """``logits`` ``[B, V]`` with each row's penalties applied (a new float32 tensor when any row has some,
    else ``logits`` itself). Repetition (transformers' RepetitionPenaltyLogitsProcessor): every token of
    prompt and output has its logit divided by the penalty when positive, multiplied when negative. Then
    OpenAI's: ``logit -= frequency_penalty * count + presence_penalty`` for every token the output holds."""
    rows = [i for i, p in enumerate(params) if p.penalised]
    if not rows:
        return logits
    out = logits.float().clone()
    for i in rows:
        p, row = params[i], out[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*prompts[i], *outputs[i]}), dtype=torch.long, device=out.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and outputs[i]:
            ids, counts = torch.tensor(outputs[i], dtype=torch.long, device=out.device).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(out.dtype) + p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias if t < row.shape[0]], dtype=torch.long, device=out.device)
            biases = [b for t, b in p.logit_bias if t < row.shape[0]]
            row[ids] += torch.tensor(biases, dtype=out.dtype, device=out.device)
        if len(outputs[i]) < p.min_new_tokens:
            banned = [t for t in (*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)) if t < row.shape[0]]
            if banned:
                row[torch.tensor(banned, dtype=torch.long, device=out.device)] = float("-inf")
    return out


class Sampled(NamedTuple):
    """``tokens[i]`` for every row; rows whose draw raised are in ``errors`` (row -> message) and their
    token is -1: the caller fails those requests alone, never the batch or the rank."""

    tokens: list[int]
    errors: dict[int, str]


NONFINITE_LOGITS = "the model's logits for this request are not finite (NaN or inf): a numerical fault of the forward"


def nonfinite_rows(logits: torch.Tensor) -> dict[int, str]:
    """Rows of the model's raw logits ``[B, V]`` holding NaN or inf, each with its error: the forward went wrong
    for those requests (their token and log-probability would mean nothing, and a NaN log-probability has no
    encoding on the KV wire or in JSON), so the caller fails them alone and serves the rest. Raw logits only:
    penalties may push a finite row to inf on purpose, and ``sample`` draws from such rows."""
    return nonfinite_errors((~torch.isfinite(logits).all(dim=-1)).tolist())  # one small copy, as sample's argmax


def nonfinite_errors(bad: list[bool]) -> dict[int, str]:
    """``nonfinite_rows`` from flags already on the host (the overlapped decode reads them with its tokens)."""
    rows = {i: NONFINITE_LOGITS for i, broken in enumerate(bad) if broken}
    if rows:  # an operator's first sign of a broken kernel or checkpoint: the clients only see a 500
        log.warning("%d of %d requests in a batch: logits not finite (NaN or inf); they fail alone", len(rows), len(bad))
    return rows


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           positions: list[int] | None = None) -> Sampled:
    """One token per row of ``logits`` ``[B, V]``. Greedy rows are vectorised; sampled rows use their
    own generator, so a request's tokens depend only on its seed, not on what it was batched with.

    ``positions`` (the output index each row draws) re-seeds a seeded row's generator from (seed,
    position) before its draw, so its token depends on nothing else; without it the generators are
    used as they are (``make_generator(device)`` makes one for position 0).

    Any value a request may carry (temperature 1e-5 or 1e300, penalties that drive logits to inf) gives a
    token: non-finite logits are made finite first. A draw that still raises fails its row alone."""
    tokens, errors = sample_on_device(logits, params, generators, positions)
    out = tokens.tolist()  # the one copy to the host
    for i in errors:
        out[i] = -1
    return Sampled(out, errors)


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                     positions: list[int] | None = None) -> tuple[torch.Tensor, dict[int, str]]:
    """``sample``'s tokens as a ``[B]`` int64 tensor beside the logits, nothing read back: an overlapped decode turn
    (``engine.decode_overlap``) feeds them to the next forward on the device. Rows whose draw raised are in the
    dict (row -> message); their token is meaningless."""
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(params)} requests")
    if positions is not None and len(positions) != len(params):
        raise ValueError(f"{len(positions)} positions for {len(params)} requests")
    tokens = logits.argmax(dim=-1)
    errors: dict[int, str] = {}
    for i, p in enumerate(params):
        if p.greedy:
            continue
        try:
            tokens[i] = _draw(logits[i], p, generators[i], None if positions is None else positions[i])
        except Exception as exc:  # whatever one row does, the others are served
            log.exception("sampling failed for one request")
            errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
    return tokens, errors


def _draw(logits_row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
          position: int | None) -> torch.Tensor:
    """One row's token, a 0-d tensor on the row's device; no value is read back to decide anything, so a GPU
    draw queues behind the forward without waiting for it."""
    if position is not None and p.seed is not None and generator is not None:
        generator.manual_seed(p.step_seed(position))
    # Penalties or logit_bias can push logits to +-inf (a repetition penalty of 1e-300) and a broken row can
    # hold NaN: NaN never wins, +inf becomes the largest float (a finite row stays as it is).
    row = torch.nan_to_num(logits_row.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    # Shift the best logit to 0 before dividing: any temperature then gives exponents <= 0 (no overflow). When
    # every logit is -inf there is nothing to sample from: the draw runs on a flat row (its probabilities stay
    # valid, which a GPU's multinomial does not check) and the argmax is returned instead.
    best = row.max()
    usable = torch.isfinite(best)
    fallback = row.argmax()
    # A float32 temperature of 1e300 would be inf (and -inf / inf is NaN); past 1e30 every finite logit
    # gap is ~0 already, so the distribution is the same.
    row = torch.where(usable, row - best, torch.zeros_like(row)) / min(p.temperature, 1e30)
    if p.top_k > 0 and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0.0:  # the best token has probability max(probs) and always stays
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        drop[0] = False  # a top_p below float32's range (1e-300 is 0.0 there) would drop even the best
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    # Draw on CPU-or-device per the generator; multinomial renormalises.
    return torch.where(usable, torch.multinomial(probs, 1, generator=generator)[0], fallback)


def logprob_report(
    logits: torch.Tensor, tokens: list[int], top_ks: list[int]
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Per row of ``logits`` ``[B, V]``: the chosen token's log-probability under the model's distribution
    (float32 log_softmax of the raw logits: before penalties, temperature, top-k, top-p; prefill and
    decode compute it alike) and the ``top_ks[row]`` most likely tokens with theirs, best first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(tokens, dtype=torch.long, device=logits.device)[:, None]
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    k = max(top_ks, default=0)
    if k == 0:
        return chosen, [[] for _ in tokens]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return chosen, [list(zip(ids[r][:n], values[r][:n], strict=True)) for r, n in enumerate(top_ks)]
