"""Worker choice policies, chosen separately for prefill and decode.

Each policy picks one worker out of a non-empty candidate list (workers that take traffic now).
`prompt_key` is the prompt text (or token ids as bytes) and is used only by `cache_aware`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

from router.workers import Worker


class Policy(ABC):
    name: str

    @abstractmethod
    def choose(self, candidates: list[Worker], prompt_key: str | bytes | None) -> Worker: ...


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
        self._owner: dict[int, Worker] = {}

    def _block_keys(self, prompt_key: str | bytes) -> list[int]:
        step = self._block
        keys, h = [], 0
        for start in range(0, len(prompt_key), step):
            h = hash((h, prompt_key[start : start + step]))
            keys.append(h)
        return keys

    def choose(self, candidates: list[Worker], prompt_key: str | bytes | None) -> Worker:
        least = min(candidates, key=_in_flight)
        if not prompt_key:
            return least
        keys = self._block_keys(prompt_key)
        owner = self._owner
        matched, best = 0, None
        for key in keys:
            w = owner.get(key)
            if w is None:
                break
            matched += 1
            best = w
        chosen = least
        if (
            best is not None
            and best.takes_traffic
            and best in candidates
            and matched >= self._ratio * len(keys)
            and best.in_flight - least.in_flight < self._balance_abs
        ):
            chosen = best
        for key in keys:
            owner.pop(key, None)  # re-insert: dict order doubles as recency for eviction
            owner[key] = chosen
        if len(owner) > self._max_blocks:
            for key in list(owner)[: len(owner) // 10 + 1]:
                del owner[key]
        return chosen

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
