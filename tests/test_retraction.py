"""Admission that reserves only a few output tokens per request, and retraction when the pool runs out:
a burst that overflows the pool completes every request with the tokens of a run that never ran short."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.tiny_engine import tiny_v3_dir

PS = 16
PROMPTS = [[(13 * i + 7 * j) % 250 + 2 for j in range(20 + 3 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> Iterator[LLM]:
    engine = LLM(str(tiny_dir), page_size=PS, num_pages=64, prefix_cache=False)  # whole-life reservations
    yield engine
    engine.close()


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=40, ignore_eos=True),
                                    SamplingParams(temperature=1.0, top_k=30, seed=9, max_new_tokens=40,
                                                   ignore_eos=True)], ids=["greedy", "seeded"])
def test_a_burst_that_overflows_the_pool_completes_every_request_token_exact(
        tiny_dir: Path, reference: LLM, prefix_cache: bool, params: SamplingParams) -> None:
    # 6 requests of 4 pages' whole life each (24 pages) on 10 pages: admitted with 8 output tokens
    # reserved, they outgrow the pool and the newest are retracted and prefilled again later.
    llm = LLM(str(tiny_dir), page_size=PS, num_pages=10, prefix_cache=prefix_cache, reserve_tokens=8)
    try:
        expected = [o.token_ids for o in reference.generate(PROMPTS, params)]
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected
        assert llm.scheduler.retractions > 0
        assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
        cache = llm.kv_pool.prefix_cache
        assert cache is None or cache.evictable_pages == cache.cached_pages
    finally:
        llm.close()


def test_admission_reserves_the_prompt_and_the_reserve_but_refuses_what_could_never_fit(tiny_dir: Path) -> None:
    llm = LLM(str(tiny_dir), page_size=PS, num_pages=4, reserve_tokens=8)
    try:
        params = SamplingParams(max_new_tokens=40)
        assert llm.scheduler.pages_needed(20, params) == 2  # 20 + 8 tokens
        assert llm.scheduler.pages_needed(20, params, generated=36) == 4  # 56 + the 4 left
        assert llm.scheduler.pages_needed(20, SamplingParams(max_new_tokens=2)) == 2
        with pytest.raises(ValueError, match="needs 5 KV pages"):  # its whole life must fit the pool alone
            llm.scheduler.validate_prompt(list(range(2, 42)), params)
        with pytest.raises(ValueError, match="reserve_tokens"):
            LLM(str(tiny_dir), page_size=PS, num_pages=4, reserve_tokens=0)
    finally:
        llm.close()


def test_workers_refuse_a_reserve_below_one_token_at_start_up(capsys: pytest.CaptureFixture[str]) -> None:
    from decode_worker.__main__ import main as decode_main
    from prefill_worker.__main__ import main as prefill_main

    for main in (decode_main, prefill_main):
        assert main(["--reserve-tokens", "0", "--port", "1"]) == 2
        assert "--reserve-tokens must be >= 1" in capsys.readouterr().err
