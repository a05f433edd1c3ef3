"""The prefill batcher's promise to its caller: pages it reports are computed, chunk after chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.kv_pool import KVPool
from engine.model import DeepseekForCausalLM
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model
from engine.weights import load_model
from prefill_worker.batcher import PrefillBatcher, PrefillJob

PAGE_SIZE = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_v3"), "v3", seed=3)


def _batcher(model_dir: Path, device: str, max_prefill_tokens: int, num_pages: int = 32,
             prefix_cache: bool = False) -> PrefillBatcher:
    config = ModelConfig.from_dir(model_dir)
    model = DeepseekForCausalLM(config, dtype=torch.float32, device=device)
    load_model(model, model_dir)
    pool = KVPool(num_pages, config.num_hidden_layers, PAGE_SIZE, config.kv_cache_dim, torch.float32, device,
                  prefix_cache=prefix_cache)
    return PrefillBatcher(model, pool, max_prefill_tokens=max_prefill_tokens, max_running=4)


def _job(length: int, salt: int = 0) -> PrefillJob:
    return PrefillJob(f"r{salt}", [(7 * i + 3 + 13 * salt * (i > 8)) % 200 for i in range(length)],
                      SamplingParams(temperature=0.0))


def _prefill(batcher: PrefillBatcher, job: PrefillJob) -> list[int]:
    """Run `job` to its first token; the pages reported, in order."""
    batcher.add(job)
    reported: list[int] = []
    while not job.prefilled:
        for chunk in batcher.step():
            if chunk.job is job:
                assert chunk.position == len(reported)
                reported += chunk.pages
    return reported


def test_a_hit_reports_the_whole_prompt_and_a_storm_never_evicts_pages_a_transfer_still_reads(
        tiny_dir: Path) -> None:
    """A job with a prefix-cache hit computes only its suffix, yet reports every page of its prompt (the
    cached ones first, with its first chunk) holding the KV and first token a cache-off batcher computes;
    while it is not released (its transfer may still read), jobs that need the whole rest of the pool evict
    every other cached page but never its pages."""
    plain = _batcher(tiny_dir, "cpu", max_prefill_tokens=40)
    cached = _batcher(tiny_dir, "cpu", max_prefill_tokens=40, num_pages=8, prefix_cache=True)
    pool = cached.kv_pool
    assert pool.prefix_cache is not None
    warm = _job(3 * PAGE_SIZE + 5)
    _prefill(cached, warm)
    cached.release(warm)  # its 3 full pages stay cached
    target = _job(5 * PAGE_SIZE + 2)  # the same first 53 tokens, then its own
    reported = _prefill(cached, target)
    assert target.cached_tokens == 3 * PAGE_SIZE and reported == target.pages and len(reported) == 6
    expected = _job(5 * PAGE_SIZE + 2)
    _prefill(plain, expected)
    assert target.first_token == expected.first_token
    torch.testing.assert_close(pool.tensor[target.pages], plain.kv_pool.tensor[expected.pages])
    snapshot = pool.tensor[target.pages].clone()
    for salt in range(1, 4):  # each needs 2 pages; only 2 are free: cached pages must be evicted
        storm = _job(PAGE_SIZE + 3, salt)
        _prefill(cached, storm)
        assert not set(storm.pages) & set(target.pages)
        cached.release(storm)
    assert pool.prefix_cache.evicted_pages > 0
    assert torch.equal(pool.tensor[target.pages], snapshot)
    cached.release(target)
    plain.release(expected)
    assert pool.available_pages == pool.num_pages and plain.kv_pool.free_pages == plain.kv_pool.num_pages


def test_chunks_report_each_page_once_and_the_last_one_samples(tiny_dir: Path) -> None:
    batcher = _batcher(tiny_dir, "cpu", max_prefill_tokens=2 * PAGE_SIZE)
    job = _job(5 * PAGE_SIZE + 3)
    batcher.add(job)
    reported: list[int] = []
    steps = 0
    while not job.prefilled:
        for chunk in batcher.step():
            assert chunk.position == len(reported)
            reported += chunk.pages
            assert chunk.last == job.prefilled
        steps += 1
    assert steps == 3 and reported == job.pages and len(reported) == 6
    assert job.first_token is not None
    batcher.release(job)
    assert batcher.kv_pool.free_pages == batcher.kv_pool.num_pages


@pytest.mark.gpu
def test_gpu_pages_of_an_intermediate_chunk_are_written_when_reported(tiny_dir: Path) -> None:
    """Transfer engines copy on their own CUDA streams: a reported page must not still be in flight."""
    batcher = _batcher(tiny_dir, "cuda", max_prefill_tokens=PAGE_SIZE)
    job = _job(4 * PAGE_SIZE)
    batcher.add(job)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the forward: its kernels are still queued
    chunks = batcher.step()
    assert chunks and not chunks[0].last  # an intermediate chunk: no sampling, so no implicit sync
    assert torch.cuda.current_stream().query(), "the forward is still running while its pages are reported"
    batcher.release(job)
