"""Decode-side reuse in the engine: a request whose prompt KV arrives from elsewhere (`add_prefilled`) keeps its
pages in the pool's prefix cache when it ends if it was admitted with its held blocks, so the conversation's
next turn takes those pages as they are and needs only the rest written; greedy tokens equal a cache-off run
and every refcount returns to idle. Without `held` nothing is kept (a decode worker without the flag)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.forward_batch import ForwardBatch, ForwardMode
from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.tiny_engine import tiny_v3_dir

PS = 16
PARAMS = SamplingParams(max_new_tokens=7, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def prefill(tiny_dir: Path) -> Iterator[LLM]:
    """The prefill side: computes every prompt whole (no cache), as the KV's source."""
    engine = LLM(str(tiny_dir), page_size=PS, num_pages=16, prefix_cache=False)
    yield engine
    engine.close()


def _transfer(prefill: LLM, decode: LLM, prompt: list[int], dst_pages: list[int], held: int) -> int:
    """Prefill `prompt` on `prefill`, write its pages from page `held` on into `dst_pages` of `decode` (what a
    KV transfer with `held_pages` does) and return the first token."""
    pool = prefill.kv_pool
    src = pool.alloc(pool.pages_for_tokens(len(prompt)))
    try:
        batch = ForwardBatch.build(ForwardMode.EXTEND, [prompt], [0], [src], pool)
        first = int(prefill.model(batch).next_token_logits[0].argmax())
        decode.kv_pool.tensor[dst_pages] = pool.tensor[src[held:]]
    finally:
        pool.free(src)
    return first


def _decode(decode: LLM, prompt: list[int], first: int, pages: list[int], held: list | None) -> list[int]:
    req = decode.scheduler.add_prefilled(prompt, first, pages, PARAMS, held=held)
    while not req.finished:
        decode.scheduler.step()
    return req.output_ids


def test_a_conversation_s_next_turn_takes_the_pages_decode_kept_and_decodes_as_a_cache_off_run(
    tiny_dir: Path, prefill: LLM
) -> None:
    decode = LLM(str(tiny_dir), page_size=PS, num_pages=24)
    try:
        pool = decode.kv_pool
        cache = pool.prefix_cache
        assert cache is not None
        conversation = [(7 * i + 3) % 250 + 2 for i in range(45)]
        for turn in range(3):
            prompt = conversation + [(11 * turn + j) % 250 + 2 for j in range(13)]
            expected = prefill.generate([prompt], PARAMS)[0].token_ids
            needed = decode.scheduler.pages_needed(len(prompt), PARAMS)
            pages, held = pool.alloc_for_prompt(prompt, needed)
            # Turn 0 finds nothing; later turns hold the last turn's prompt + answer but its last token.
            computed = len(conversation) - 1 if turn else 0
            assert len(held) == min(computed // PS, (len(prompt) - 1) // PS) and (turn == 0) == (not held)
            first = _transfer(prefill, decode, prompt, pages[len(held) : pool.pages_for_tokens(len(prompt))],
                              len(held))
            assert _decode(decode, prompt, first, pages, held) == expected, turn
            conversation = prompt + expected
            assert pool.available_pages == pool.num_pages and cache.evictable_pages == cache.cached_pages
        assert cache.cached_pages >= (len(conversation) - 1) // PS  # the last turn's pages stay for the next
    finally:
        decode.close()


def test_without_held_blocks_the_received_kv_is_freed_not_kept(tiny_dir: Path, prefill: LLM) -> None:
    decode = LLM(str(tiny_dir), page_size=PS, num_pages=24)
    try:
        prompt = [(5 * i + 1) % 250 + 2 for i in range(40)]
        pages = decode.kv_pool.alloc(decode.scheduler.pages_needed(len(prompt), PARAMS))
        first = _transfer(prefill, decode, prompt, pages[: decode.kv_pool.pages_for_tokens(len(prompt))], 0)
        assert _decode(decode, prompt, first, pages, None) == prefill.generate([prompt], PARAMS)[0].token_ids
        assert decode.kv_pool.prefix_cache is not None and decode.kv_pool.prefix_cache.cached_pages == 0
        assert decode.kv_pool.free_pages == decode.kv_pool.num_pages
    finally:
        decode.close()


def test_a_decode_worker_refuses_reuse_without_a_prefix_cache_or_with_the_bench_connector(capsys: pytest.CaptureFixture[str]) -> None:
    from decode_worker.__main__ import main as decode_main

    assert decode_main(["--decode-prefix-cache", "--disable-prefix-cache", "--port", "1"]) == 2
    assert "--decode-prefix-cache" in capsys.readouterr().err
    assert decode_main(["--decode-prefix-cache", "--kv-connector", "bench", "--port", "1"]) == 2
    assert "--kv-connector bench" in capsys.readouterr().err
