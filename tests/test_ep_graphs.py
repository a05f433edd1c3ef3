"""CUDA-graph decode over expert parallelism (issue 22, the CPU side): the capture-safe EP path has fixed
shapes and no host read whatever the routing, is exact with a (peer, expert) block filled to the budget, and
an instance at tp 2 / tp 4 (dp 2) decoding through the graph runner gives the single-rank greedy tokens,
with DP groups that sit idle while others decode. Real gloo processes; on CPU the graph runner runs the
same padded graph-safe forward eagerly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ep_graph_cases import BUDGET, HIDDEN, masked_dispatcher, routings
from ep_graph_rank import REPORT_DIR_ENV, graph_colocated_entry

from engine.ep_moe import ExpertParallelDispatcher
from engine.llm import LLM
from engine.parallel import ParallelContext
from engine.runtime.colocated import EngineArgs
from engine.runtime.launch import InstanceSpec, free_port
from engine.runtime.offline import generate_on_ranks
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model
from kernels.ep import Dispatcher

PAGE_SIZE = 16
# cuda: the instance runs on GPUs (NCCL, graphs captured and replayed; scripts/device_multi_gpu.sh sets it).
DEVICE = os.environ.get("EP_GRAPH_DEVICE", "cpu")
MAX_BS = 4  # graph buckets 1, 2, 4
# Uneven prompts and lengths: the DP groups decode different batch sizes (different buckets) and finish at
# different steps, so one group runs idle forwards while the other still replays.
PROMPTS = [[10, 11, 12, 13, 14, 15, 16], [40, 41], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [3],
           [200, 201, 202, 203], [90, 91, 92, 93, 94, 95]]
PARAMS = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (8, 3, 6, 8, 2, 5)]


def test_masked_ep_path_over_2_gloo_ranks_is_exact_with_fixed_shapes_and_no_host_read() -> None:
    from ep_graph_cases import rank_main

    mp.spawn(rank_main, args=(2, free_port()), nprocs=2, join=True)


def test_masked_ep_path_refuses_more_tokens_than_its_budget_and_graphs_it_cannot_hold() -> None:
    dispatcher = masked_dispatcher(0, 1, None, backend="local")
    try:
        x, ids, weights = routings(0, 1)[0]
        dispatcher.check_capture(BUDGET)  # a graph of the budget's size is fine
        with pytest.raises(ValueError, match=f"over the low-latency budget of {BUDGET}"):
            dispatcher.check_capture(BUDGET + 1)
        over = x.repeat(2, 1)[: BUDGET + 1], ids.repeat(2, 1)[: BUDGET + 1], weights.repeat(2, 1)[: BUDGET + 1]
        with pytest.raises(ValueError, match=f"exceed num_max_dispatch_tokens_per_rank={BUDGET}"):
            dispatcher.dispatch_masked(*over)
    finally:
        dispatcher.ep.close()
    eager = ExpertParallelDispatcher(Dispatcher(2, HIDDEN, backend="local"), ParallelContext(), 0, None)
    with pytest.raises(ValueError, match="needs the low-latency EP mode, not high_throughput"):
        eager.check_capture(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    path = write_tiny_model(tmp_path_factory.mktemp("ep_graphs") / "v2-lite", "v2-lite", seed=0)
    llm = LLM(str(path), device=DEVICE, dtype="float32", page_size=PAGE_SIZE, num_pages=64)
    try:
        return path, [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    finally:
        llm.close()


@pytest.mark.parametrize("tp", [2, 4])
def test_graph_decode_over_ep_at_dp2_gives_the_single_rank_greedy_tokens(
        tp: int, tiny: tuple[Path, list[list[int]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cuda" and torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA GPUs")
    path, expected = tiny
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path))  # the spawned ranks inherit it
    # The low-latency budget is one rank's share of the largest forward: with max_prefill_tokens and
    # max_running at the largest bucket it is exactly the bucket's share, the tightest budget a graph takes.
    args = EngineArgs(model_dir=str(path), dtype="float32", page_size=PAGE_SIZE, num_pages=64, max_prefill_tokens=MAX_BS,
                      max_running=MAX_BS, ep_mode="low_latency", cuda_graph_max_bs=MAX_BS)
    outputs = generate_on_ranks(InstanceSpec(tp_size=tp, dp_size=2, device=DEVICE), args, PROMPTS, PARAMS, timeout_s=240,
                                entry=graph_colocated_entry)
    assert [o.token_ids for o in outputs] == expected
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(tp)]
    attn_tp = tp // 2
    assert all(r["budget"] == -(-MAX_BS // attn_tp) for r in reports), reports
    assert all(r["static_steps"] > 0 and r["eager_steps"] == 0 for r in reports), reports
    assert any(r["idle_forwards"] > 0 for r in reports), reports  # a padded DP group took part
