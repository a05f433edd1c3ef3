"""kernels.ep.Dispatcher: dispatch + combine over 2 and 4 real gloo processes equal the single-process
reference, in both DeepEP modes, with uneven and empty per-rank batches; misuse is refused clearly."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from multirank_ep_cases import HIDDEN, rank_main, reference_exact, scaled_expert

import kernels
from engine.runtime.launch import free_port
from kernels.ep import Dispatcher
from kernels.ep_stats import ExpertLoadRecorder

ALL_CHECKS = [
    "check_high_throughput_exact",
    "check_high_throughput_matches_moe_forward",
    "check_low_latency_exact",
    "check_expert_load_recorder_counts_every_token_once",
]


def test_dispatch_and_combine_over_2_and_4_gloo_ranks_equal_the_single_process_reference() -> None:
    # One spawn of 4 ranks runs every check over all 4, then over two groups of 2 side by side
    # (spawning torch ranks is the slow part).
    mp.spawn(rank_main, args=(4, free_port(), ALL_CHECKS), nprocs=4, join=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_dispatch_and_combine_over_nccl_on_two_gpus_equal_the_single_process_reference() -> None:
    mp.spawn(rank_main, args=(2, free_port(), ALL_CHECKS, "nccl"), nprocs=2, join=True)


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (num_tokens, HIDDEN), generator=gen).float()
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = 2.0 ** -torch.randint(0, 3, (num_tokens, top_k), generator=gen).float()
    return x, ids, weights


def test_local_backend_high_throughput_is_the_identity_exchange() -> None:
    x, ids, weights = _routing(7, 4, 2, seed=0)
    ep = Dispatcher(4, HIDDEN, backend="local")
    got = ep.dispatch(x, ids, weights)
    assert torch.equal(got.recv_x, x) and torch.equal(got.recv_topk_ids, ids)
    assert got.num_recv_tokens_per_expert == torch.bincount(ids.flatten(), minlength=4).tolist()
    gen = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(4, 6, HIDDEN, generator=gen), torch.randn(4, HIDDEN, 3, generator=gen)
    y = kernels.moe_forward(got.recv_x, got.recv_topk_ids, got.recv_topk_weights, w13, w2)
    assert torch.equal(ep.combine(y, got.handle), kernels.moe_forward(x, ids, weights, w13, w2))
    ep.close()


def test_local_backend_low_latency_masked_layout_matches_moe_forward() -> None:
    x, ids, weights = _routing(5, 4, 2, seed=2)
    ids[0, 1] = -1
    ep = Dispatcher(4, HIDDEN, backend="local", mode="low_latency", num_max_dispatch_tokens_per_rank=6)
    got = ep.low_latency_dispatch(x, ids)
    assert got.recv_x.shape == (4, 6, HIDDEN)
    assert got.recv_count.tolist() == torch.bincount(ids[ids >= 0], minlength=4).tolist()
    y = torch.stack([scaled_expert(got.recv_x[e], e) for e in range(4)])
    out = ep.low_latency_combine(y, ids, weights, ep.low_latency_dispatch(x, ids).handle)
    torch.testing.assert_close(out, reference_exact(x, ids, weights), rtol=0, atol=0)
    # Zero tokens is a legal step (an idle DP group still joins).
    empty = ep.low_latency_dispatch(x[:0], ids[:0])
    assert empty.recv_count.sum() == 0
    assert ep.low_latency_combine(torch.zeros_like(empty.recv_x), ids[:0], weights[:0], empty.handle).shape == (0, HIDDEN)
    ep.close()


def test_low_latency_refuses_more_tokens_than_its_budget() -> None:
    x, ids, _ = _routing(5, 4, 2, seed=3)
    ep = Dispatcher(4, HIDDEN, backend="local", mode="low_latency", num_max_dispatch_tokens_per_rank=4)
    with pytest.raises(ValueError, match="5 tokens exceed num_max_dispatch_tokens_per_rank=4"):
        ep.low_latency_dispatch(x, ids)
    ep.close()


def test_a_dispatcher_refuses_the_other_modes_calls_and_calls_after_close() -> None:
    x, ids, weights = _routing(3, 4, 2, seed=4)
    ep = Dispatcher(4, HIDDEN, backend="local")
    with pytest.raises(RuntimeError, match="built for high_throughput mode; low_latency calls are refused"):
        ep.low_latency_dispatch(x, ids)
    ep.close()
    ep.close()
    with pytest.raises(RuntimeError, match="closed"):
        ep.dispatch(x, ids, weights)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"backend": "nccl2"}, ValueError, "unknown EP backend 'nccl2'"),
        ({"mode": "fast"}, ValueError, "unknown dispatch mode 'fast'"),
        ({"backend": "deepep"}, RuntimeError, "deep_ep is not installed"),
        ({"mode": "low_latency"}, ValueError, "num_max_dispatch_tokens_per_rank >= 1"),
        ({"backend": "a2a"}, RuntimeError, "needs torch.distributed initialised"),
    ],
)
def test_bad_dispatcher_settings_are_refused_at_construction(kwargs: dict, error: type, message: str) -> None:
    settings = {"backend": "local", **kwargs}
    with pytest.raises(error, match=message):
        Dispatcher(4, HIDDEN, **settings)


def test_bad_routing_shapes_are_refused() -> None:
    x, ids, weights = _routing(3, 4, 2, seed=5)
    ep = Dispatcher(4, HIDDEN, backend="local")
    with pytest.raises(ValueError, match=r"topk_ids must be \[3, K\]"):
        ep.dispatch(x, ids[:2], weights)
    with pytest.raises(ValueError, match=r"x must be \[num_tokens, 8\]"):
        ep.dispatch(x[:, :4], ids, weights)
    ep.close()


def test_expert_load_recorder_keeps_a_sliding_window_of_steps() -> None:
    recorder = ExpertLoadRecorder(num_layers=1, num_experts=3, window=2)
    for step_ids in ([[0, 1]], [[1, -1]], [[2, 2]]):
        recorder.record(0, torch.tensor(step_ids))
        recorder.end_step()
    assert recorder.window_counts().tolist() == [[0, 1, 2]]  # the first step left the window
    assert recorder.total.tolist() == [[1, 2, 2]]
    assert recorder.current.sum() == 0
    with pytest.raises(ValueError, match=r"layer 1 is outside \[0, 1\)"):
        recorder.record(1, torch.tensor([[0]]))
