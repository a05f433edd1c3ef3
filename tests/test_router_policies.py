"""Every policy's choice, and the registry's candidate lists (pure unit tests, no sockets)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.config import Role, WorkerSpec
from router.policies import CacheAwarePolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy, make_policy
from router.workers import WorkerRegistry


def _registry(n: int, role: Role = Role.DECODE) -> WorkerRegistry:
    return WorkerRegistry([WorkerSpec(f"http://10.0.0.{i}:8000", role) for i in range(n)])


def test_round_robin_visits_workers_in_turn() -> None:
    ws = _registry(3).candidates(Role.DECODE)
    policy = RoundRobinPolicy()
    assert [policy.choose(ws, None).url for _ in range(6)] == [w.url for w in ws] * 2


def test_random_picks_only_candidates_and_reaches_all_of_them() -> None:
    ws = _registry(4).candidates(Role.DECODE)
    policy = RandomPolicy(random.Random(7))
    counts = Counter(policy.choose(ws, None).url for _ in range(400))
    assert set(counts) == {w.url for w in ws}
    assert min(counts.values()) > 50  # roughly uniform: 100 expected each


def test_power_of_two_never_picks_the_busier_of_two() -> None:
    ws = _registry(2).candidates(Role.DECODE)
    ws[0].in_flight, ws[1].in_flight = 5, 1
    policy = PowerOfTwoPolicy(random.Random(1))
    assert {policy.choose(ws, None).url for _ in range(50)} == {ws[1].url}


def test_power_of_two_with_many_workers_avoids_the_busiest() -> None:
    ws = _registry(5).candidates(Role.DECODE)
    for i, w in enumerate(ws):
        w.in_flight = 10 * i
    policy = PowerOfTwoPolicy(random.Random(3))
    picks = Counter(policy.choose(ws, None).url for _ in range(500))
    assert ws[-1].url not in picks  # the busiest loses every draw it is in
    assert picks[ws[0].url] == max(picks.values())


def test_cache_aware_sends_a_shared_prefix_back_to_the_same_worker() -> None:
    ws = _registry(4, Role.PREFILL).candidates(Role.PREFILL)
    policy = CacheAwarePolicy(block_chars=16, match_ratio=0.5)
    system = "You are a helpful assistant. " * 10
    first = policy.choose(ws, system + "question one")
    first.in_flight += 1  # it is busy now; affinity must still win within the balance threshold
    again = policy.choose(ws, system + "question two, a bit longer")
    assert again is first


def test_cache_aware_spreads_unrelated_prompts_to_the_least_loaded() -> None:
    ws = _registry(3, Role.PREFILL).candidates(Role.PREFILL)
    policy = CacheAwarePolicy(block_chars=16)
    chosen = []
    for i in range(3):
        w = policy.choose(ws, f"prompt number {i} " + "x" * 40 + str(i))
        w.in_flight += 1
        chosen.append(w)
    assert len(set(chosen)) == 3


def test_cache_aware_gives_up_affinity_when_the_owner_is_overloaded() -> None:
    ws = _registry(2, Role.PREFILL).candidates(Role.PREFILL)
    policy = CacheAwarePolicy(block_chars=16, balance_abs=4)
    prompt = "shared prefix " * 20
    owner = policy.choose(ws, prompt)
    owner.in_flight = 10
    other = policy.choose(ws, prompt)
    assert other is not owner


def test_cache_aware_ignores_a_match_below_the_ratio() -> None:
    ws = _registry(2, Role.PREFILL).candidates(Role.PREFILL)
    policy = CacheAwarePolicy(block_chars=8, match_ratio=0.9)
    owner = policy.choose(ws, "abcdefgh" * 2)
    owner.in_flight = 1
    # Shares 2 of 10 blocks: under 90 %, so the least loaded worker is chosen.
    assert policy.choose(ws, "abcdefgh" * 2 + "z" * 64) is not owner


def test_cache_aware_table_stays_bounded() -> None:
    ws = _registry(2, Role.PREFILL).candidates(Role.PREFILL)
    policy = CacheAwarePolicy(block_chars=4, max_blocks=100)
    for i in range(200):
        policy.choose(ws, f"{i:08d}" * 4)
    assert policy.known_blocks <= 100


def test_registry_offers_neither_ejected_nor_draining_workers() -> None:
    reg = _registry(3)
    a, b, c = reg.candidates(Role.DECODE)
    reg.record_failure(a, threshold=2, reason="test")
    assert a in reg.candidates(Role.DECODE)  # one failure is under the threshold
    reg.record_failure(a, threshold=2, reason="test")
    b.in_flight = 1
    reg.remove(b.url)
    assert reg.candidates(Role.DECODE) == [c]
    assert reg.get(b.url) is b  # still draining its in-flight request
    b.in_flight = 0
    reg.release_if_drained(b)
    assert reg.get(b.url) is None
    reg.record_success(a)
    assert reg.candidates(Role.DECODE) == [a, c]


def test_unknown_policy_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")



def test_cache_aware_keeps_affinity_after_a_hit_report_that_confirms_it() -> None:
    ws = _registry(2, Role.PREFILL).candidates(Role.PREFILL)
    a, _ = ws
    policy = CacheAwarePolicy(block_chars=8)
    assert policy.choose(ws, "s" * 64) is a and policy.expectation() is None  # no affinity: nothing expected
    a.in_flight = 1
    assert policy.choose(ws, "s" * 64) is a
    expected = policy.expectation()
    assert expected is not None and expected.worker is a and expected.matched == expected.blocks == 8
    policy.observe_hit(expected, cached_tokens=48, prompt_tokens=64)  # all but the last page: a hit
    assert policy.forgotten == 0 and policy.choose(ws, "s" * 64) is a


def test_cache_aware_forgets_what_a_worker_evicted_once_its_hit_report_shows_a_miss() -> None:
    """The worker's cache evicts least recently used pages first: when it misses a prefix the router sent it,
    it has also lost what the router sent it before that prefix, not what came after. (A worker without a
    prefix cache reports 0 hits: affinity to it fades the same way.)"""
    ws = _registry(2, Role.PREFILL).candidates(Role.PREFILL)
    a, b = ws
    policy = CacheAwarePolicy(block_chars=8)
    older, missed, later = "o" * 64, "m" * 64, "l" * 64
    assert [policy.choose(ws, p) for p in (older, missed, later)] == [a, a, a]  # idle: ties go to a
    a.in_flight = 1  # b is the least loaded from now on: only affinity sends a prompt to a
    assert policy.choose(ws, missed) is a
    expected = policy.expectation()
    assert expected is not None
    policy.observe_hit(expected, cached_tokens=0, prompt_tokens=64)
    assert policy.forgotten == 1
    assert policy.choose(ws, older) is b  # sent to a before the missed prefix: presumed evicted
    assert policy.choose(ws, later) is a  # sent after it: still trusted
    assert policy.choose(ws, missed) is a  # a computed it again for the report's request: it holds it now
