"""MLA-core data parallelism (``--attention-dp mla-core``) on CPU/gloo/float32: each request's latent KV on one
rank (the least loaded by free pages), projections TP over the whole batch, and the greedy tokens of the
single-rank run — through chunked prefill (a prefix read from its owner) and the prefix cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kv_pool import PoolExhaustedError
from engine.kv_shards import ShardedKVPool
from engine.llm import LLM
from engine.runtime.colocated import EngineArgs
from engine.runtime.launch import InstanceSpec, LayoutError
from engine.runtime.offline import generate_on_ranks
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model

PAGE_SIZE = 16
SHARED = list(range(100, 140))  # a 40-token prefix two prompts share: the second hits the prefix cache
PROMPTS = [
    [10, 11, 12, 13, 14, 15, 16],
    [40, 41],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [3],
    SHARED + [1, 2],
    [200, 201, 202, 203],
    SHARED + [5],
]
PARAMS = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (8, 3, 6, 8, 4, 2, 5)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mla_core")
    return {variant: write_tiny_model(root / variant, variant, seed=0) for variant in ("v3", "v2-lite")}


def _single_rank(path: Path) -> list[list[int]]:
    llm = LLM(str(path), page_size=PAGE_SIZE, num_pages=64)
    try:
        return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    finally:
        llm.close()


@pytest.mark.parametrize(("tp", "variant"), [(2, "v3"), (4, "v2-lite")])
def test_mla_core_greedy_tokens_equal_the_single_rank_run(
    tp: int, variant: str, models: dict[str, Path]
) -> None:
    # 24-token prefill chunks: the long prompts prefill over several forwards, each reading the prefix its
    # owner wrote before. Three running at most: the last prompt starts after the first shared-prefix one
    # published its pages, and hits them on their owner.
    args = EngineArgs(
        model_dir=str(models[variant]), page_size=PAGE_SIZE, num_pages=4, max_prefill_tokens=24, max_running=3
    )
    outputs = generate_on_ranks(
        InstanceSpec(tp_size=tp, attention_dp="mla-core"), args, PROMPTS, PARAMS, timeout_s=240
    )
    assert [o.token_ids for o in outputs] == _single_rank(models[variant])
    assert outputs[-1].cached_tokens == 32


def test_mla_core_ranks_retract_requests_of_the_full_shard_and_keep_the_tokens(models: dict[str, Path]) -> None:
    """4 pages per rank, two requests per rank that each end up needing all 4 (reserving 4 tokens ahead): a shard
    runs out and retracts a request of its own (the newest on that shard, not the instance's newest), and the
    greedy tokens are still the uninterrupted run's."""
    prompts = [[(7 * i + 5 * j) % 200 + 2 for j in range(20 + 3 * i)] for i in range(4)]
    params = [SamplingParams(max_new_tokens=30, ignore_eos=True)] * len(prompts)
    llm = LLM(str(models["v3"]), page_size=PAGE_SIZE, num_pages=64, prefix_cache=False)
    try:
        expected = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.close()
    args = EngineArgs(model_dir=str(models["v3"]), page_size=PAGE_SIZE, num_pages=4, max_prefill_tokens=64,
                      reserve_tokens=4)
    outputs = generate_on_ranks(InstanceSpec(tp_size=2, attention_dp="mla-core"), args, prompts, params,
                                timeout_s=240)
    assert [o.token_ids for o in outputs] == expected


def test_generate_cli_takes_attention_dp_mla_core(models: dict[str, Path]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.generate",
            "--model",
            str(models["v3"]),
            "--prompt-token-ids",
            json.dumps(PROMPTS[:3]),
            "--max-new-tokens",
            "3",
            "--ignore-eos",
            "--json",
            "--page-size",
            str(PAGE_SIZE),
            "--num-pages",
            "64",
            "--tp",
            "2",
            "--attention-dp",
            "mla-core",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    expected = [t[:3] for t in _single_rank(models["v3"])[:3]]
    assert [o["token_ids"] for o in json.loads(proc.stdout)["outputs"]] == expected


def test_mla_core_with_attention_dp_groups_is_refused_naming_the_flags() -> None:
    with pytest.raises(LayoutError, match="mla-core .* takes --dp 1, not 2"):
        InstanceSpec(tp_size=4, dp_size=2, attention_dp="mla-core")
    with pytest.raises(LayoutError, match="unknown --attention-dp 'mlp'"):
        InstanceSpec(tp_size=2, attention_dp="mlp")


def _pool(rank: int = 0, prefix_cache: bool = False) -> ShardedKVPool:
    return ShardedKVPool(
        4,
        3,
        rank,
        num_layers=2,
        page_size=PAGE_SIZE,
        kv_dim=8,
        dtype=torch.float32,
        device="cpu",
        prefix_cache=prefix_cache,
    )


def test_requests_go_to_the_rank_with_the_most_free_pages_and_stay_there() -> None:
    pool = _pool(rank=1)
    first = pool.alloc(3)  # all equal: rank 0
    second = pool.alloc(1)  # ranks 1 and 2 have 4 free: rank 1
    third = pool.alloc(2)  # rank 2 has 4 free
    assert [pool.owner_of(p) for p in (first, second, third)] == [0, 1, 2]
    assert pool.owner_of(pool.alloc(1, after=first)) == 0  # a request's later pages: its owner's shard
    with pytest.raises(PoolExhaustedError, match="shard 0"):
        pool.alloc(1, after=first)  # shard 0 is full although others have room
    assert pool.owns(second) and not pool.owns(first)
    assert pool.same_shard(first, first) and not pool.same_shard(first, second)
    assert pool.local_pages(second) == [0]
    assert pool.tensor.shape[0] == 5 and pool.layout.num_pages == 4  # the shard and the scratch page
    assert pool.max_request_pages == 4 and pool.num_pages == 12
    for pages in (first, second, third):
        pool.free(pages)
    pool.free([p for p in range(4) if p not in first])  # the page taken after `first`
    assert pool.free_pages == 12 and pool.status_counts()["local_free_pages"] == 4
    assert pool.status_counts()["shard_pages"] == 4


def test_a_prefix_cache_hit_is_owned_by_the_shard_holding_the_cached_pages() -> None:
    pool = _pool(prefix_cache=True)
    prompt = list(range(PAGE_SIZE * 2 + 1))
    pool.alloc(2)  # rank 0 busier: the first request goes to rank 1
    pages, held = pool.alloc_for_prompt(prompt, 3)
    assert pool.owner_of(pages) == 1 and not held
    held = pool.publish(prompt, pages, held)
    pool.release(pages, held)
    pool.alloc(3)  # rank 2 now has the most free pages, yet the hit stays on rank 1
    again, held = pool.alloc_for_prompt(prompt, 3)
    assert len(held) == 2 and pool.owner_of(again) == 1 and again[:2] == pages[:2]
    pool.release(again, held)
