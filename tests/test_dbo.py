"""Dual batch overlap (engine.dbo): where a step is cut, what each micro-batch holds, and greedy tokens equal
to the forward without it, on one rank and over tp 2 dp 2 ranks (the split agreed across DP groups, idle
groups joining the interleaved collectives), and tp 4 dp 2 (attention TP inside each group)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.dbo import DboConfig, micro_batch, split_point
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import KVPool
from engine.llm import LLM
from engine.runtime.colocated import EngineArgs
from engine.runtime.launch import InstanceSpec
from engine.runtime.offline import generate_on_ranks
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model

PAGE = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("dbo") / "tiny-v3")


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(2, 70))] for _ in range(n)]


def _batch(extend: list[int], prefix: list[int], mode: ForwardMode = ForwardMode.EXTEND) -> ForwardBatch:
    pool = KVPool(64, 1, PAGE, 8, torch.float32, "cpu", prefix_cache=False)
    tables, next_page = [], 0
    for e, p in zip(extend, prefix, strict=True):
        pages = -(-(e + p) // PAGE)
        tables.append(list(range(next_page, next_page + pages)))
        next_page += pages
    ids = [[3] * e for e in extend]
    return ForwardBatch.build(mode, ids, prefix, tables, pool)


def test_a_step_is_cut_at_the_sequence_boundary_nearest_half_its_tokens_and_only_above_the_threshold() -> None:
    on = DboConfig(True, decode_token_threshold=4, prefill_token_threshold=100)
    assert split_point(_batch([60, 10, 30, 5], [0, 0, 0, 0]), on) == 1  # 60 | 45
    assert split_point(_batch([10, 20, 30, 40], [0, 5, 0, 0]), on) == 3  # 60 | 40 beats 30 | 70
    assert split_point(_batch([98, 1], [0, 0]), on) is None  # 100 tokens needed
    assert split_point(_batch([200], [0]), on) is None  # one sequence is never cut
    decode = _batch([1, 1, 1, 1], [5, 17, 3, 40], ForwardMode.DECODE)
    assert split_point(decode, on) == 2
    assert split_point(decode, DboConfig(True, decode_token_threshold=5)) is None
    assert split_point(decode, DboConfig(False, 2, 2)) is None  # off by default


def test_micro_batches_hold_their_sequences_tokens_pages_and_rebased_offsets() -> None:
    whole = _batch([5, 20, 7], [3, 0, 16])
    first, second = micro_batch(whole, 0, 1), micro_batch(whole, 1, 3)
    for name in ("input_ids", "positions", "write_pages", "write_slots", "read_pages", "read_slots"):
        assert torch.equal(torch.cat([getattr(first, name), getattr(second, name)]), getattr(whole, name)), name
    assert second.cu_seqlens_q.tolist() == [0, 20, 27] and second.cu_seqlens_k.tolist() == [0, 20, 43]
    assert second.page_table.tolist() == whole.page_table[1:].tolist() and first.batch_size == 1


def test_dbo_on_one_rank_gives_the_same_greedy_tokens_and_splits_prefill_and_decode_steps(tiny_dir: Path) -> None:
    llm = LLM(tiny_dir, page_size=PAGE)
    try:
        prompts = _prompts(llm.config.vocab_size, 6)
        params = SamplingParams(max_new_tokens=10)
        expected = [o.token_ids for o in llm.generate(prompts, params)]
        llm.model.dbo = DboConfig(True, decode_token_threshold=2, prefill_token_threshold=2)
        modes: list[ForwardMode] = []
        overlapped = llm.model._forward_overlapped
        llm.model._forward_overlapped = lambda b, s: (modes.append(b.mode), overlapped(b, s))[1]  # type: ignore[method-assign]
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        assert ForwardMode.EXTEND in modes and ForwardMode.DECODE in modes
        assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
    finally:
        llm.close()


LAYOUTS = [(2, 2), (4, 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "dp"), LAYOUTS, ids=[f"tp{t}dp{d}" for t, d in LAYOUTS])
def test_dbo_over_dp_groups_gives_the_greedy_tokens_of_one_rank(tiny_dir: Path, tp: int, dp: int) -> None:
    llm = LLM(tiny_dir, page_size=PAGE)
    prompts = _prompts(llm.config.vocab_size, 5, seed=1)
    params = SamplingParams(max_new_tokens=6)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    llm.close()
    args = EngineArgs(model_dir=str(tiny_dir), page_size=PAGE, max_total_tokens=4096, max_prefill_tokens=64,
                      ep_backend="a2a", dbo=DboConfig(True, decode_token_threshold=2, prefill_token_threshold=2))
    got = generate_on_ranks(InstanceSpec(tp_size=tp, dp_size=dp), args, prompts, params)
    assert [r.token_ids for r in got] == expected


@pytest.mark.gpu
def test_dbo_on_a_gpu_runs_dispatch_and_combine_on_a_second_stream_with_the_same_greedy_tokens(tiny_dir: Path) -> None:
    llm = LLM(tiny_dir, device="cuda", dtype="float32", page_size=PAGE)
    try:
        prompts = _prompts(llm.config.vocab_size, 6, seed=2)
        params = SamplingParams(max_new_tokens=10)
        expected = [o.token_ids for o in llm.generate(prompts, params)]
        llm.model.dbo = DboConfig(True, decode_token_threshold=2, prefill_token_threshold=2)
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
        streams = llm.model._streams
        assert streams is not None and streams.comm is not None  # the overlapped path ran, on two streams
    finally:
        llm.close()
