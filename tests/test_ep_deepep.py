"""The deepep EP backend: ``--ep-backend auto`` picks it only where DeepEP can serve the layout and says
why not otherwise; asking for it where it cannot run is a clear error; on two GPUs its dispatch/combine
(normal and low-latency mode) equal the a2a backend's over NCCL."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels.ep_deepep as ep_deepep
from engine.runtime.groups import resolve_ep_backend
from engine.runtime.launch import InstanceSpec, LayoutError, free_port
from kernels.ep import Dispatcher
from kernels.ep_deepep import DeepEPUnavailableError, deepep_unavailable_reason

BF16 = torch.bfloat16


@pytest.fixture
def no_deep_ep(monkeypatch: pytest.MonkeyPatch) -> None:
    """deep_ep absent, whatever this machine has installed."""
    monkeypatch.setitem(sys.modules, "deep_ep", None)


@pytest.fixture
def deep_ep_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The far side faked: deep_ep imports and a GPU is visible (no NIC)."""
    monkeypatch.setattr(ep_deepep, "import_deep_ep", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ep_deepep, "has_rdma_nic", lambda: False)


def test_auto_resolves_to_a2a_without_deep_ep_and_logs_why(no_deep_ep: None, caplog: pytest.LogCaptureFixture) -> None:
    spec = InstanceSpec(tp_size=2, device="cuda")
    with caplog.at_level(logging.INFO, logger="engine.runtime.groups"):
        assert resolve_ep_backend("auto", spec, mode="high_throughput", dtype=BF16) == "a2a"
    assert "auto chose a2a" in caplog.text and "deep_ep is not installed" in caplog.text


def test_auto_is_local_on_one_rank_and_a2a_on_cpu_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_ep_backend("auto", InstanceSpec()) == "local"
    with caplog.at_level(logging.INFO, logger="engine.runtime.groups"):
        assert resolve_ep_backend("auto", InstanceSpec(tp_size=2), mode="low_latency", dtype=BF16) == "a2a"
    assert "DeepEP runs on CUDA GPUs only (the device is cpu)" in caplog.text


def test_auto_picks_deepep_where_it_can_serve_the_layout_and_logs_it(
        deep_ep_usable: None, caplog: pytest.LogCaptureFixture) -> None:
    spec = InstanceSpec(tp_size=2, device="cuda")
    with caplog.at_level(logging.INFO, logger="engine.runtime.groups"):
        assert resolve_ep_backend("auto", spec, mode="high_throughput", dtype=BF16, hidden_size=7168) == "deepep"
        assert resolve_ep_backend("auto", spec, mode="high_throughput", dtype=torch.float32) == "a2a"
        assert resolve_ep_backend("auto", spec) == "a2a"
    assert "auto chose deepep" in caplog.text
    assert "DeepEP moves bfloat16 tokens only (the model runs in torch.float32)" in caplog.text
    assert "the EP mode and dtype were not given" in caplog.text


def test_deepep_requested_without_deep_ep_is_a_clear_error(no_deep_ep: None) -> None:
    with pytest.raises(LayoutError, match="--ep-backend deepep cannot run here: deep_ep is not installed; build it"):
        resolve_ep_backend("deepep", InstanceSpec(tp_size=2, device="cuda"))
    with pytest.raises(LayoutError, match="--ep-backend deepep needs tp >= 2"):
        resolve_ep_backend("deepep", InstanceSpec())
    with pytest.raises(DeepEPUnavailableError, match="deep_ep is not installed; build it with scripts/build_deepep.sh"):
        Dispatcher(4, 8, backend="deepep")


@pytest.mark.parametrize(("ranks", "kwargs", "message"), [
    (1, {}, "serve 2, 4 or 8 ranks on one node or multiples of 8 across nodes (got 1); use 'local'"),
    (6, {}, "(got 6)"),
    (12, {}, "across nodes needs NVSHMEM over RDMA and this machine has no RDMA NIC"),
    (8, {"num_nodes": 2}, "takes 8 GPUs per node (rank r on node r // 8); got 8 ranks on 2 nodes"),
    (2, {"dtype": torch.float16}, "bfloat16 tokens only (the model runs in torch.float16)"),
    (2, {"hidden_size": 1000, "mode": "low_latency"}, "compiled for hidden sizes (2048,"),
    (2, {"hidden_size": 1001, "mode": "high_throughput"}, "hidden_size * 2 bytes to be a multiple of 16"),
])
def test_layouts_deepep_cannot_serve_are_named(deep_ep_usable: None, ranks: int, kwargs: dict, message: str) -> None:
    reason = deepep_unavailable_reason(ranks, **kwargs)
    assert reason is not None and message in reason


def test_layouts_deepep_serves_over_nvlink_alone(deep_ep_usable: None) -> None:
    for ranks in (2, 4, 8):
        for mode in ("high_throughput", "low_latency", None):
            assert deepep_unavailable_reason(ranks, mode=mode, dtype=BF16, hidden_size=7168) is None
    # A low-latency hidden size DeepEP has no kernel for is fine in normal mode.
    assert deepep_unavailable_reason(2, mode="high_throughput", dtype=BF16, hidden_size=1024) is None


# ---- two GPUs: deepep against the a2a reference over NCCL --------------------------------------------

HIDDEN, TOP_K, EXPERTS_PER_RANK, BUDGET = 7168, 8, 8, 128


def _routing(world: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Global x (small integers: exact in bf16), top-k ids with some -1, dyadic weights, and per-rank counts
    (uneven; the last rank has no tokens)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [37 + 29 * r for r in range(world - 1)] + [0]
    total, experts = sum(counts), world * EXPERTS_PER_RANK
    x = torch.randint(-8, 9, (total, HIDDEN), generator=gen).to(BF16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:TOP_K] for _ in range(total)])
    ids[::5, -1] = -1
    weights = 2.0 ** -torch.randint(0, 3, (total, TOP_K), generator=gen).float()
    return x, ids, weights, counts


def _compare_high_throughput(rank: int, world: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
    ref = Dispatcher(world * EXPERTS_PER_RANK, HIDDEN, backend="a2a", dtype=BF16, device="cuda")
    deep = Dispatcher(world * EXPERTS_PER_RANK, HIDDEN, backend="deepep", dtype=BF16, device="cuda")
    try:
        want, got = ref.dispatch(x, ids, w), deep.dispatch(x, ids, w)
        assert torch.equal(got.recv_x, want.recv_x), f"rank {rank}: recv_x differs"
        assert torch.equal(got.recv_topk_ids, want.recv_topk_ids), f"rank {rank}: recv_topk_ids differ"
        local = want.recv_topk_ids >= 0
        assert torch.equal(got.recv_topk_weights[local], want.recv_topk_weights[local])
        assert got.num_recv_tokens_per_expert == want.num_recv_tokens_per_expert
        y = got.recv_x * float(rank + 2)  # one partial per (token, rank): the sums stay exact in bf16
        assert torch.equal(deep.combine(y, got.handle), ref.combine(y, want.handle)), f"rank {rank}: combine"
    finally:
        deep.close()
        ref.close()


def _compare_low_latency(rank: int, world: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
    experts = world * EXPERTS_PER_RANK
    ref = Dispatcher(experts, HIDDEN, backend="a2a", mode="low_latency", num_max_dispatch_tokens_per_rank=BUDGET,
                     dtype=BF16, device="cuda")
    deep = Dispatcher(experts, HIDDEN, backend="deepep", mode="low_latency",
                      num_max_dispatch_tokens_per_rank=BUDGET, dtype=BF16, device="cuda")
    try:
        outs = []
        for ep in (ref, deep):
            got = ep.low_latency_dispatch(x, ids)
            scale = (torch.arange(EXPERTS_PER_RANK, device="cuda") + rank * EXPERTS_PER_RANK + 1).to(BF16)
            y = got.recv_x * scale.view(-1, 1, 1)  # expert e's output: x * (e + 1)
            outs.append((got.recv_count.clone(), ep.low_latency_combine(y, ids, w, got.handle).float()))
        (want_count, want), (got_count, out) = outs
        assert torch.equal(got_count, want_count), f"rank {rank}: recv_count {got_count} != {want_count}"
        torch.testing.assert_close(out, want, rtol=2e-2, atol=1e-2)
    finally:
        deep.close()
        ref.close()


def _rank_main(rank: int, world: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    try:
        x_all, ids_all, w_all, counts = _routing(world, seed=7)
        start = sum(counts[:rank])
        mine = slice(start, start + counts[rank])
        x, ids, w = (t[mine].cuda() for t in (x_all, ids_all, w_all))
        _compare_high_throughput(rank, world, x, ids, w)
        _compare_low_latency(rank, world, x[:BUDGET], ids[:BUDGET], w[:BUDGET])
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_deepep_dispatch_and_combine_equal_a2a_over_nccl_on_two_gpus() -> None:
    pytest.importorskip("deep_ep", reason="deep_ep is not built (scripts/build_deepep.sh)")
    mp.spawn(_rank_main, args=(2, free_port()), nprocs=2, join=True)
