"""Worker choice policies, chosen separately for prefill and decode.

Each policy picks one worker out of a non-empty candidate list (workers that take traffic now).
`prompt_key` is the prompt text (or token ids as bytes) and is used only by `cache_aware`.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

from router.workers import Worker


class Policy(ABC):
    name: str

    @abstractmethod
    def choose(self, candidates: list[Worker], prompt_key: str | bytes | None) -> Worker: ...

    def expectation(self) -> Expectation | None:
        """What the last `choose` assumed about the chosen worker's prefix cache (None: nothing), to be
        checked against the worker's hit report with `observe_hit`."""
        return None

    def observe_hit(self, expected: Expectation, cached_tokens: int, prompt_tokens: int) -> None:
        """The worker chosen under `expected` reports `cached_tokens` of `prompt_tokens` served from its cache."""
        return None  # only cache-aware choices learn from it


@dataclass(frozen=True, slots=True)
class Expectation:
    """An affinity choice: `worker` was believed to hold `matched` of the prompt's `blocks` blocks, the
    deepest of them assigned to it at sequence number `seq`."""

    worker: Worker
    matched: int
    blocks: int
    seq: int


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: list[Worker], prompt_key: str | bytes | None) -> Worker:
        worker = candidates[self._next % len(candidates)]
        self._next += 1
        return worker


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: list[Worker], prompt_key: str | bytes | None) -> Worker:
        return candidates[self._rng.randrange(len(candidates))]


class PowerOfTwoPolicy(Policy):
    """Two distinct workers drawn at random; the one with fewer requests in flight wins."""

    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: list[Worker], prompt_key: str | bytes | None) -> Worker:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        a, b = candidates[i], candidates[j + 1 if j >= i else j]
        return b if b.in_flight < a.in_flight else a


class CacheAwarePolicy(Policy):
    """Prefix affinity: a prompt goes where its longest known prefix went, unless that worker is busy.

    The prompt is cut into blocks of `block_chars`; block i's key is a hash chained over blocks 0..i,
    so one dict lookup per block finds how much of the prompt some worker has already seen (the
    approximate prefix tree of SGLang's cache-aware router, at O(prompt length / block) per request).
    The worker that owns the deepest matched block is chosen when the match covers at least
    `match_ratio` of the prompt and it has fewer than `balance_abs` more requests in flight than the
    least loaded candidate; otherwise the least loaded candidate is chosen. Either way the chosen
    worker becomes the owner of every block of the prompt. The table keeps at most `max_blocks` keys
    and forgets the oldest when full.

    Learning from hit reports (a worker's reply says how many prompt tokens its prefix cache served,
    `cached_tokens`): when an affinity choice expected the worker to hold a prefix and the worker served
    less than half of it, the worker has evicted it, and with it, as its cache evicts least recently used
    pages first, every prefix this router sent it before that one. Each owner entry carries the sequence
    number of its assignment, so forgetting them is one number per worker (`_horizon`): entries older than
    it count as unknown. A worker without a prefix cache reports 0 hits, so affinity to it is dropped the
    same way and its prompts go to the least loaded worker.
    """

    name = "cache_aware"

    def __init__(
        self, block_chars: int = 64, match_ratio: float = 0.5, balance_abs: int = 32, max_blocks: int = 1 << 20
    ) -> None:
        if block_chars < 1 or not 0.0 <= match_ratio <= 1.0 or max_blocks < 1:
            raise ValueError("block_chars >= 1, 0 <= match_ratio <= 1 and max_blocks >= 1 are required")
        self._block = block_chars
        self._ratio = match_ratio
        self._balance_abs = balance_abs
        self._max_blocks = max_blocks
        self._owner: dict[int, tuple[Worker, int]] = {}  # block key -> (owner, assignment sequence number)
        self._seq = itertools.count(1)
        self._horizon: dict[Worker, int] = {}  # a worker's entries assigned before this are forgotten
        self._last: Expectation | None = None
        self.forgotten = 0  # hit reports that showed an evicted prefix (for tests and metrics)

    def _block_keys(self, prompt_key: str | bytes) -> list[int]:
        step = self._block
        keys, h = [], 0
        for start in range(0, len(prompt_key), step):
            h = hash((h, prompt_key[start : start + step]))
            keys.append(h)
        return keys

    def choose(self, candidates: list[Worker], prompt_key: str | bytes | None) -> Worker:
        least = min(candidates, key=_in_flight)
        self._last = None
        if not prompt_key:
            return least
        keys = self._block_keys(prompt_key)
        owner, horizon = self._owner, self._horizon
        matched, best, best_seq = 0, None, 0
        for key in keys:
            entry = owner.get(key)
            if entry is None or entry[1] < horizon.get(entry[0], 0):
                break
            matched += 1
            best, best_seq = entry
        chosen = least
        if (
            best is not None
            and best.takes_traffic
            and best in candidates
            and matched >= self._ratio * len(keys)
            and best.in_flight - least.in_flight < self._balance_abs
        ):
            chosen = best
            self._last = Expectation(best, matched, len(keys), best_seq)
        seq = next(self._seq)
        for key in keys:
            owner.pop(key, None)  # re-insert: dict order doubles as recency for eviction
            owner[key] = (chosen, seq)
        if len(owner) > self._max_blocks:
            for key in list(owner)[: len(owner) // 10 + 1]:
                del owner[key]
        return chosen

    def expectation(self) -> Expectation | None:
        return self._last

    def observe_hit(self, expected: Expectation, cached_tokens: int, prompt_tokens: int) -> None:
        if prompt_tokens <= 0 or expected.blocks <= 0:
            return
        if cached_tokens / prompt_tokens < 0.5 * expected.matched / expected.blocks:
            # Evicted there: forget what was sent to it up to that prefix's last assignment (the worker
            # holds this prompt again now: its newer assignment stays).
            self._horizon[expected.worker] = max(self._horizon.get(expected.worker, 0), expected.seq + 1)
            self.forgotten += 1

    @property
    def known_blocks(self) -> int:
        return len(self._owner)


def _in_flight(worker: Worker) -> int:
    return worker.in_flight


def make_policy(name: str, *, block_chars: int = 64, match_ratio: float = 0.5, balance_abs: int = 32) -> Policy:
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(block_chars, match_ratio, balance_abs)
    raise ValueError(f"unknown policy {name!r}")
