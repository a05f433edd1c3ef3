"""The colocated engine with its prefix cache: greedy tokens are those of a cache-off run whatever was hit
(full, partial and page-unaligned prefixes, chunked prefill across the cached boundary, after evictions),
and the pool ends idle: every page free or cached and unreferenced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.generate import parse_args
from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.tiny_engine import tiny_v3_dir

PS = 16
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)
SYSTEM = [(11 * i + 5) % 250 for i in range(70)]  # 4 full pages + 6 tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> Iterator[LLM]:
    engine = LLM(str(tiny_dir), page_size=PS, num_pages=64, prefix_cache=False)
    yield engine
    engine.close()


def _cached(tiny_dir: Path, num_pages: int, max_prefill_tokens: int = 8192) -> LLM:
    return LLM(str(tiny_dir), page_size=PS, num_pages=num_pages, max_prefill_tokens=max_prefill_tokens)


def _assert_idle(llm: LLM) -> None:
    cache = llm.kv_pool.prefix_cache
    assert cache is not None
    assert llm.kv_pool.available_pages == llm.kv_pool.num_pages  # free + evictable cached = total
    assert cache.evictable_pages == cache.cached_pages  # no block is still referenced


def _hits(llm: LLM) -> int:
    assert llm.kv_pool.prefix_cache is not None
    return llm.kv_pool.prefix_cache.hit_tokens


def test_greedy_tokens_with_full_partial_and_unaligned_hits_match_a_cache_off_run(tiny_dir: Path,
                                                                                 reference: LLM) -> None:
    # 20-token chunks: a prefill that starts after a 64-token hit crosses page and chunk boundaries apart.
    llm = _cached(tiny_dir, num_pages=64, max_prefill_tokens=20)
    try:
        cases = [  # (prompt, prompt tokens served from the cache)
            (SYSTEM, 0),
            (SYSTEM, 64),  # the same prompt: every full page but the one holding the last token
            (SYSTEM + list(range(100, 146)), 64),  # partial hit, then 46 tokens prefilled in 3 chunks
            (SYSTEM[:50], 48),  # a page-unaligned prefix of a cached prompt
            (SYSTEM[:33] + [7] * 20, 32),  # diverges inside a page: that page is recomputed
            ([1, 2, 3] + SYSTEM, 0),  # the same tokens at other positions are another prefix
        ]
        for prompt, hit in cases:
            before = _hits(llm)
            got = llm.generate([prompt], GREEDY)[0].token_ids
            assert got == reference.generate([prompt], GREEDY)[0].token_ids, prompt
            assert _hits(llm) - before == hit, prompt
        _assert_idle(llm)
    finally:
        llm.close()


def test_requests_batched_together_share_the_prefix_published_by_the_first(tiny_dir: Path,
                                                                          reference: LLM) -> None:
    llm = _cached(tiny_dir, num_pages=64)
    try:
        prompts = [SYSTEM + [200 + i] * (3 + 5 * i) for i in range(4)]
        expected = [reference.generate([p], GREEDY)[0].token_ids for p in prompts]
        # All four are admitted in the same step (nothing cached yet), so they compute the prefix side by side.
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
        assert _hits(llm) == 0
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
        # Each prompt's pages, its 5 computed output tokens included, hit all but the last token's page.
        computed = [len(p) + GREEDY.max_new_tokens - 1 for p in prompts]
        assert _hits(llm) == sum(min((len(p) - 1) // PS, c // PS) * PS for p, c in zip(prompts, computed, strict=True))
        assert _hits(llm) == 64 + 64 + 80 + 80  # the last two reach into their own 5th page
        _assert_idle(llm)
    finally:
        llm.close()


def test_tokens_after_evictions_match_and_an_eviction_storm_completes_every_request(tiny_dir: Path,
                                                                                    reference: LLM) -> None:
    # 12 pages (192 tokens) against a working set of 16 prompts of 3-4 pages each.
    llm = _cached(tiny_dir, num_pages=12, max_prefill_tokens=24)
    try:
        prompts = [[(i * 37 + j * 3) % 250 for j in range(40 + i)] for i in range(16)]
        expected = [reference.generate([p], GREEDY)[0].token_ids for p in prompts]
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected  # all at once: a storm
        cache = llm.kv_pool.prefix_cache
        assert cache is not None and cache.evicted_pages > 0
        evicted = cache.evicted_pages
        for prompt, tokens in list(zip(prompts, expected, strict=True))[::-1]:  # newest first: still cached
            assert llm.generate([prompt], GREEDY)[0].token_ids == tokens
        assert cache.hit_tokens > 0 and cache.evicted_pages > evicted  # some hit, some were evicted
        _assert_idle(llm)
    finally:
        llm.close()


def test_seeded_sampling_with_a_hit_draws_the_tokens_of_a_cache_off_run(tiny_dir: Path, reference: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_k=40, seed=5, max_new_tokens=8, ignore_eos=True)
    llm = _cached(tiny_dir, num_pages=64)
    try:
        prompt = SYSTEM + [3, 4, 5]
        llm.generate([SYSTEM], GREEDY)
        assert llm.generate([prompt], params)[0].token_ids == reference.generate([prompt], params)[0].token_ids
        assert _hits(llm) == 64
        _assert_idle(llm)
    finally:
        llm.close()


def test_generate_takes_sglang_s_flag_name_for_turning_the_cache_off() -> None:
    assert parse_args(["--model", "m", "--prompt", "x", "--disable-radix-cache"]).disable_prefix_cache
    assert parse_args(["--model", "m", "--prompt", "x", "--disable-prefix-cache"]).disable_prefix_cache
    assert not parse_args(["--model", "m", "--prompt", "x"]).disable_prefix_cache
