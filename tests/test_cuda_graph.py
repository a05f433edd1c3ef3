"""CUDA-graph decode (engine/cuda_graph.py): buckets, padding, the graph-safe forward, greedy tokens.

The CPU tests run the runner without capture: the same static buffers, padding rows, scratch page and
graph-safe forward (masked-layout MoE, rope from positions) as the captured path, run eagerly, so the
logic a graph replays is checked in CI. Tests marked `gpu` capture and replay real graphs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from engine.cuda_graph import CudaGraphRunner, bucket_for, capture_bucket_sizes
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_pool import KVPool
from engine.llm import LLM
from engine.model import DeepseekForCausalLM
from engine.moe import MoEBlock, moe_forward_static
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model
from engine.weights import load_model

gpu = pytest.mark.gpu
PROMPTS = [[5, 17, 90, 3], list(range(40, 110)), [7] * 19, [300, 2, 2, 9, 11, 64, 65], [8, 9]]
PAGE_SIZE, NUM_PAGES = 16, 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_v3"), "v3", seed=3)


def _params(lengths: list[int]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in lengths]


def _generate(model_dir: Path, device: str, cuda_graph_max_bs: int, lengths: list[int]) -> tuple[list[list[int]], LLM]:
    llm = LLM(model_dir, device=device, dtype="float32", page_size=PAGE_SIZE, num_pages=NUM_PAGES,
              cuda_graph_max_bs=cuda_graph_max_bs)
    try:
        outputs = llm.generate(PROMPTS, _params(lengths))
    finally:
        llm.close()
    return [o.token_ids for o in outputs], llm


def _model_and_pool(model_dir: Path, device: str = "cpu") -> tuple[DeepseekForCausalLM, KVPool]:
    from engine.config import ModelConfig

    config = ModelConfig.from_dir(model_dir)
    model = DeepseekForCausalLM(config, dtype=torch.float32, device=device)
    load_model(model, model_dir)
    pool = KVPool(NUM_PAGES, config.num_hidden_layers, PAGE_SIZE, config.kv_cache_dim, torch.float32, device)
    return model, pool


def _decode_batch(pool: KVPool, seq_lens: list[int], first_page: int = 0) -> ForwardBatch:
    """A DECODE batch whose sequences own consecutive pages from ``first_page`` on."""
    tables, page = [], first_page
    for length in seq_lens:
        n = pool.pages_for_tokens(length)
        tables.append(list(range(page, page + n)))
        page += n
    return ForwardBatch.build(ForwardMode.DECODE, [[(7 * i + 3) % 300] for i in range(len(seq_lens))],
                              [n - 1 for n in seq_lens], tables, pool)


# ---- buckets ---------------------------------------------------------------------------------------
def test_buckets_are_powers_of_two_then_the_largest_batch() -> None:
    assert capture_bucket_sizes(1) == [1]
    assert capture_bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert capture_bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match=">= 1"):
        capture_bucket_sizes(0)


def test_a_batch_goes_to_the_smallest_bucket_that_holds_it() -> None:
    buckets = capture_bucket_sizes(48)
    assert [bucket_for(buckets, n) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    assert bucket_for(buckets, 49) is None
    with pytest.raises(ValueError):
        bucket_for(buckets, 0)


# ---- graph-safe MoE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,top_k,experts", [(1, 2, 8), (5, 3, 8), (32, 6, 64)])
def test_static_moe_equals_the_contiguous_reference_bit_for_bit(tokens: int, top_k: int, experts: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 24, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[0, -1] = -1  # an expert on another rank contributes nothing
    weights = torch.rand(tokens, top_k, generator=gen)
    w13 = torch.randn(experts, 2 * 12, 24, generator=gen)
    w2 = torch.randn(experts, 24, 12, generator=gen)
    expected = kernels.moe_forward(hidden, ids, weights, w13, w2)
    assert torch.equal(moe_forward_static(hidden, ids, weights, w13, w2).tensor(), expected)


# ---- runner on CPU (no capture) ------------------------------------------------------------------------
def test_padded_static_decode_matches_eager_and_writes_only_real_slots_and_the_scratch_page(
        tiny_dir: Path) -> None:
    model, pool = _model_and_pool(tiny_dir)
    runner = CudaGraphRunner(model, pool, max_bs=8, capture=False)
    try:
        scratch = runner.scratch_page
        pages = pool.alloc(10)
        assert scratch not in pages and pages == list(range(pages[0], pages[0] + 10))
        pool.tensor[pages[0] : pages[-1] + 1].normal_(generator=torch.Generator().manual_seed(1))  # "prefilled"
        batch = _decode_batch(pool, [5, 33, 17], first_page=pages[0])  # 3 rows -> bucket 4 (1 padding row)
        before = pool.tensor.clone()
        static = runner(batch).next_token_logits
        after_static = pool.tensor.clone()
        pool.tensor.copy_(before)
        eager = model(batch).next_token_logits
        assert runner.static_steps == 1 and runner.eager_steps == 0
        assert static.shape == eager.shape == (3, model.config.vocab_size)
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
        changed = (after_static != before).flatten(1).any(dim=1).nonzero().flatten().tolist()
        real_write_pages = sorted(set(batch.write_pages.tolist()))
        assert changed == sorted({*real_write_pages, scratch})
        # Outside the scratch page the static path wrote exactly what the eager forward wrote.
        keep = [p for p in range(NUM_PAGES) if p != scratch]
        torch.testing.assert_close(after_static[keep], pool.tensor[keep], rtol=1e-5, atol=1e-5)
        pool.free(pages)
    finally:
        runner.close()
    assert pool.available_pages == NUM_PAGES


def test_the_moe_sum_inside_the_next_norm_gives_the_same_logits_bit_for_bit(tiny_dir: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.moe import COMBINE_NORM_ENV, PendingCombine

    model, pool = _model_and_pool(tiny_dir)
    runner = CudaGraphRunner(model, pool, max_bs=8, capture=False)
    deferred: list[int] = []
    original = PendingCombine.add_rms_norm

    def counted(self: PendingCombine, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        deferred.append(1)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(PendingCombine, "add_rms_norm", counted)
    try:
        pages = pool.alloc(10)
        pool.tensor[pages[0] : pages[-1] + 1].normal_(generator=torch.Generator().manual_seed(2))
        batch = _decode_batch(pool, [5, 33, 17], first_page=pages[0])
        before = pool.tensor.clone()
        monkeypatch.setenv(COMBINE_NORM_ENV, "0")
        separate = runner(batch).next_token_logits
        assert not deferred
        pool.tensor.copy_(before)
        monkeypatch.setenv(COMBINE_NORM_ENV, "1")
        fused = runner(batch).next_token_logits
        moe_layers = sum(isinstance(layer.mlp, MoEBlock) for layer in model.model.layers)
        assert len(deferred) == moe_layers > 0 and torch.equal(fused, separate)
        pool.free(pages)
    finally:
        runner.close()
    assert pool.available_pages == NUM_PAGES


def test_batches_the_buckets_cannot_take_run_eagerly(tiny_dir: Path) -> None:
    model, pool = _model_and_pool(tiny_dir)
    runner = CudaGraphRunner(model, pool, max_bs=2, capture=False, max_context_len=2 * PAGE_SIZE)
    try:
        pages = pool.alloc(12)
        runner(_decode_batch(pool, [4, 5, 6], pages[0]))  # 3 sequences > max_bs 2
        runner(_decode_batch(pool, [3 * PAGE_SIZE], pages[0]))  # 3 pages > the 2-page table
        assert (runner.static_steps, runner.eager_steps) == (0, 2)
        runner(_decode_batch(pool, [4, 2 * PAGE_SIZE], pages[0]))
        assert (runner.static_steps, runner.eager_steps) == (1, 2)
        pool.free(pages)
    finally:
        runner.close()
        runner.close()  # idempotent
    assert pool.available_pages == NUM_PAGES
    with pytest.raises(RuntimeError, match="closed"):
        runner(_decode_batch(pool, [4], 0))


def test_runner_refuses_bad_sizes_and_capture_on_cpu_holding_nothing(tiny_dir: Path) -> None:
    model, pool = _model_and_pool(tiny_dir)
    with pytest.raises(ValueError, match=">= 1"):
        CudaGraphRunner(model, pool, max_bs=0, capture=False)
    with pytest.raises(ValueError, match="cannot capture"):
        CudaGraphRunner(model, pool, max_bs=4, capture=True)
    assert pool.available_pages == NUM_PAGES
    with pytest.raises(ValueError, match="cuda_graph_max_bs"):
        LLM(tiny_dir, cuda_graph_max_bs=-1)


def test_graph_safe_decode_generates_the_same_greedy_tokens_as_eager_on_cpu(tiny_dir: Path) -> None:
    # Different lengths shrink the batch 5 -> 1: 5 runs eagerly (max_bs 4), 4..1 through the buckets.
    lengths = [3, 5, 6, 7, 9]
    eager_tokens, _ = _generate(tiny_dir, "cpu", 0, lengths)
    static_tokens, llm = _generate(tiny_dir, "cpu", 4, lengths)
    assert static_tokens == eager_tokens
    assert [len(t) for t in static_tokens] == lengths
    runner = llm.graph_runner
    assert runner is not None and runner.static_steps > 0 and runner.eager_steps > 0
    assert runner.scratch_page == -1 and llm.kv_pool.available_pages == NUM_PAGES


# ---- GPU: real capture and replay ------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("active_grid,pdl,fused", [("0", "0", "0"), ("1", "0", "0"), ("1", "1", "0"), ("1", "0", "1")],
                         ids=["all_experts", "active_grid", "active_grid_pdl", "combine_norm_head_matmul"])
def test_gpu_greedy_tokens_equal_cpu_with_and_without_cuda_graphs(tiny_dir: Path, active_grid: str, pdl: str,
                                                                  fused: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``active_grid`` 1: the graphs' MoE launches run the active experts alone (engine.moe.ACTIVE_GRID_ENV);
    ``pdl`` 1: the Triton kernels launch as programmatic dependents (kernels.triton_pdl), eager and captured;
    ``fused`` 1: the MoE sum inside the next norm's launch, the per-head products in Triton and the router in
    one launch."""
    from engine.moe import ACTIVE_GRID_ENV, COMBINE_NORM_ENV
    from kernels.triton_head_matmul import HEAD_MATMUL_ENV
    from kernels.triton_pdl import PDL_ENV
    from kernels.triton_router import ROUTER_FUSED_ENV

    monkeypatch.setenv(ACTIVE_GRID_ENV, active_grid)
    monkeypatch.setenv(PDL_ENV, pdl)
    monkeypatch.setenv(COMBINE_NORM_ENV, fused)
    monkeypatch.setenv(HEAD_MATMUL_ENV, "triton" if fused == "1" else "cublas")
    monkeypatch.setenv(ROUTER_FUSED_ENV, fused)
    lengths = [4, 6, 8, 9, 12]
    cpu_tokens, _ = _generate(tiny_dir, "cpu", 0, lengths)
    gpu_eager, _ = _generate(tiny_dir, "cuda", 0, lengths)
    gpu_graphs, llm = _generate(tiny_dir, "cuda", 4, lengths)
    print(f"\ncpu   {cpu_tokens}\ngpu   {gpu_eager}\ngraph {gpu_graphs}")
    assert gpu_eager == cpu_tokens
    assert gpu_graphs == cpu_tokens
    runner = llm.graph_runner
    assert runner is not None and runner.static_steps > 0
    assert llm.kv_pool.available_pages == NUM_PAGES


@gpu
def test_graphs_captured_with_programmatic_dependent_launch_give_the_same_logits_bit_for_bit(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PDL changes when a kernel's programs are scheduled, never what they compute: a race (a kernel reading
    before the one ahead of it finished) would show as a difference somewhere in many replays."""
    from kernels.triton_pdl import PDL_ENV

    model, pool = _model_and_pool(tiny_dir, "cuda")
    runners = {}
    for pdl in ("0", "1"):  # read at capture: each runner's graphs keep the launches they were captured with
        monkeypatch.setenv(PDL_ENV, pdl)
        runners[pdl] = CudaGraphRunner(model, pool, max_bs=8)
    try:
        pages = pool.alloc(20)
        pool.tensor[pages[0] : pages[-1] + 1].normal_(generator=torch.Generator(device="cuda").manual_seed(3))
        before = pool.tensor.clone()
        for seq_lens in ([5, 33, 17], [70], [9, 9, 9, 9, 9, 40], [1, 2]) * 5:
            batch = _decode_batch(pool, seq_lens, pages[0])
            logits = {}
            for pdl, runner in runners.items():
                pool.tensor.copy_(before)
                logits[pdl] = runner(batch).next_token_logits.clone()
            assert torch.equal(logits["0"], logits["1"]), seq_lens
        pool.free(pages)
    finally:
        for runner in runners.values():
            runner.close()
    assert pool.available_pages == NUM_PAGES


@gpu
@pytest.mark.parametrize("pdl", ["0", "1"], ids=["plain", "pdl"])
def test_replayed_graph_matches_eager_logits_and_replays_new_batches(tiny_dir: Path, pdl: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``pdl`` 1: captured and eager launches as programmatic dependents; the same logits as without."""
    from kernels.triton_pdl import PDL_ENV

    monkeypatch.setenv(PDL_ENV, pdl)
    model, pool = _model_and_pool(tiny_dir, "cuda")
    runner = CudaGraphRunner(model, pool, max_bs=8)
    try:
        pages = pool.alloc(20)
        pool.tensor[pages[0] : pages[-1] + 1].normal_(generator=torch.Generator(device="cuda").manual_seed(2))
        before = pool.tensor.clone()
        for seq_lens in ([5, 33, 17], [70], [9, 9, 9, 9, 9, 40], [1, 2]):
            batch = _decode_batch(pool, seq_lens, pages[0])
            pool.tensor.copy_(before)
            static = runner(batch).next_token_logits.clone()
            pool.tensor.copy_(before)
            eager = model(batch).next_token_logits
            torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-4)
        assert runner.static_steps == 4 and runner.eager_steps == 0
        pool.free(pages)
    finally:
        runner.close()
    assert pool.available_pages == NUM_PAGES


MODEL_INTERPRETED = """
import json, os, sys, torch
from pathlib import Path
sys.path.insert(0, "tests")
import test_cuda_graph as t
from engine.cuda_graph import CudaGraphRunner
model, pool = t._model_and_pool(Path(sys.argv[1]))
runner = CudaGraphRunner(model, pool, max_bs=8, capture=False)
pages = pool.alloc(10)
pool.tensor[pages[0]: pages[-1] + 1].normal_(generator=torch.Generator().manual_seed(2))
batch = t._decode_batch(pool, [5, 33, 17], first_page=pages[0])
before = pool.tensor.clone()
logits = {}
for name, env in {"torch": {"TANDEM_KERNELS": "torch"},
                  "triton": {"TANDEM_KERNELS": "triton", "TANDEM_HEAD_MATMUL": "cublas", "TANDEM_COMBINE_NORM": "0",
                             "TANDEM_PREP_Q_LATENT": "0"},
                  "fused": {"TANDEM_KERNELS": "triton", "TANDEM_HEAD_MATMUL": "triton", "TANDEM_COMBINE_NORM": "1",
                            "TANDEM_ROUTER_FUSED": "1", "TANDEM_PREP_Q_LATENT": "1"}}.items():
    os.environ.update(env)
    pool.tensor.copy_(before)
    logits[name] = runner(batch).next_token_logits
print(json.dumps({name: float((v - logits["torch"]).abs().max() / logits["torch"].abs().max())
                  for name, v in logits.items()}))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_the_graph_safe_step_on_the_triton_kernels_equals_the_torch_references_interpreted(tiny_dir: Path) -> None:
    """The whole graph-safe decode step through Triton's interpreter, with and without the per-head products in
    Triton (the first beside the decode prep in one launch), the MoE sum inside the next norm and the router's
    top-k inside its logits' launch."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", MODEL_INTERPRETED, str(tiny_dir)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors["torch"] == 0.0 and errors["triton"] < 1e-5 and errors["fused"] < 1e-5, errors
