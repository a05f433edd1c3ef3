"""GPU fast-path kernels against the torch references (kernels/mla.py, kernels/moe.py), in float64.

Tests marked `gpu` run only where CUDA is available (tests/conftest.py skips them elsewhere); they also
need Triton. The backend-selector tests at the top are plain CPU tests and run in CI.
Every kernel output is compared by ||out - ref|| / ||ref|| on fresh random inputs, with the caching
allocator poisoned with NaN first so an element the kernel forgets to write cannot pass.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable

import pytest
import torch

from kernels import backend
from kernels.mla import mla_decode_attention, mla_prefill_attention
from kernels.moe import moe_forward, moe_forward_masked

needs_triton = pytest.mark.skipif(not backend.triton_importable(), reason="needs Triton")

# Relative-error bounds: fp32 runs full-precision dots (no tf32); bf16 rounds inputs, intermediates
# and outputs to 8 mantissa bits (about 4e-3 each).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LORA, ROPE = 512, 64
SCALE = 1.0 / math.sqrt(192)


def gpu_test(fn: Callable[..., None]) -> Callable[..., None]:
    """Marks a test `gpu` and skips it without CUDA or Triton."""
    fn = pytest.mark.skipif(not backend.triton_importable(), reason="needs Triton")(fn)
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn)
    return pytest.mark.gpu(fn)


def _fake_tensor(is_cuda: bool) -> types.SimpleNamespace:
    # Only `is_cuda` and `device` are read by the selector: a stand-in for a CUDA tensor on a CPU machine.
    return types.SimpleNamespace(is_cuda=is_cuda, device="cuda:0" if is_cuda else "cpu")


def test_backend_defaults_to_torch_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    assert backend.select_backend(torch.zeros(1)) == "torch"


def test_backend_defaults_to_triton_for_cuda_tensors_when_triton_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    assert backend.select_backend(_fake_tensor(is_cuda=True)) == "triton"
    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    assert backend.select_backend(_fake_tensor(is_cuda=True)) == "torch"


def test_backend_env_forces_torch_on_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    assert backend.select_backend(_fake_tensor(is_cuda=True)) == "torch"


def test_backend_forcing_triton_where_it_cannot_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="not importable"):
        backend.select_backend(_fake_tensor(is_cuda=True))
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        backend.select_backend(torch.zeros(1))
    assert backend.select_backend(_fake_tensor(is_cuda=True)) == "triton"


def test_backend_rejects_an_unknown_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="torch, triton or auto"):
        backend.select_backend(torch.zeros(1))


def test_a_switch_set_for_a_block_goes_back_to_what_it_was_unset_included(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "TANDEM_TEST_SWITCH"
    monkeypatch.delenv(name, raising=False)
    with backend.switched(name, "1"):
        assert backend.env_flag(name)
    assert name not in os.environ
    monkeypatch.setenv(name, "0")
    with pytest.raises(RuntimeError), backend.switched(name, "1"):  # back even when the block raises
        assert os.environ[name] == "1"
        raise RuntimeError
    assert os.environ[name] == "0"


def _poison_allocator() -> None:
    """Fills freed cached blocks with NaN so a kernel's unwritten output elements show up as NaN."""
    free, _ = torch.cuda.mem_get_info()
    blob = torch.empty(min(free // 4, 1 << 30) // 4, dtype=torch.float32, device="cuda")
    blob.fill_(float("nan"))
    del blob


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in kernel output (an element was never written?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _paged_cache(
    batch: int, max_context: int, page_size: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 3-layer pool [pages, layers, page, dim] viewed at layer 1, shuffled page tables, ragged lengths."""
    max_pages = math.ceil(max_context / page_size)
    num_pages = batch * max_pages + 5
    pool = torch.randn(num_pages, 3, page_size, LORA + ROPE, generator=gen, device="cuda").to(dtype)
    page_table = torch.randperm(num_pages, generator=gen, device="cuda")[: batch * max_pages]
    page_table = page_table.reshape(batch, max_pages).to(torch.int32)
    seq_lens = torch.randint(1, max_context + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    seq_lens[0] = max_context  # the longest sequence fills its table; the others end mid-page
    return pool, pool[:, 1], page_table, seq_lens


def _decode_case(batch: int, heads: int, max_context: int, page_size: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    _, kv, page_table, seq_lens = _paged_cache(batch, max_context, page_size, dtype, gen)
    q_latent = torch.randn(batch, heads, LORA, generator=gen, device="cuda").to(dtype)
    q_rope = torch.randn(batch, heads, ROPE, generator=gen, device="cuda").to(dtype)
    return q_latent, q_rope, kv, page_table, seq_lens


def _decode_ref(q_latent, q_rope, kv, page_table, seq_lens, scale) -> torch.Tensor:
    return mla_decode_attention(q_latent.double(), q_rope.double(), kv.double(), page_table, seq_lens, scale)



@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("batch,max_context", [(1, 1), (5, 300), (8, 2100)])
def test_triton_decode_matches_reference_on_strided_pool_views(
    batch: int, max_context: int, page_size: int, heads: int, dtype: torch.dtype
) -> None:
    from kernels.triton_mla_decode import mla_decode_attention_triton

    args = _decode_case(batch, heads, max_context, page_size, dtype, seed=batch * 1000 + max_context)
    assert not args[2].is_contiguous()  # the layer view of the pool
    _poison_allocator()
    out = mla_decode_attention_triton(*args, SCALE)
    assert out.shape == (batch, heads, LORA) and out.dtype == dtype
    assert _rel_err(out, _decode_ref(*args, SCALE)) < TOLERANCE[dtype]


def _flashmla_missing() -> bool:
    from kernels.flashmla_decode import _extension

    return not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or _extension() is None


@gpu_test
@pytest.mark.parametrize("heads", [16, 64, 128])
@pytest.mark.parametrize("batch,max_context", [(1, 1), (5, 300), (16, 2100), (64, 4096), (130, 777)])
def test_flashmla_decode_matches_the_float64_reference(batch: int, max_context: int, heads: int) -> None:
    """The optional FlashMLA backend (an extension installed or named by TANDEM_FLASHMLA_SO) on strided pool
    views, ragged lengths and shuffled page tables, against the float64 reference."""
    if _flashmla_missing():
        pytest.skip("needs FlashMLA (flash_mla, or TANDEM_FLASHMLA_SO) on an sm90 GPU")
    from kernels.flashmla_decode import mla_decode_attention_flashmla

    args = _decode_case(batch, heads, max_context, 64, torch.bfloat16, seed=batch * 7 + max_context + heads)
    _poison_allocator()
    out = mla_decode_attention_flashmla(*args, SCALE)
    assert out.shape == (batch, heads, LORA) and out.dtype == torch.bfloat16
    assert _rel_err(out, _decode_ref(*args, SCALE)) < TOLERANCE[torch.bfloat16]


@gpu_test
def test_auto_picks_flashmla_for_many_heads_and_sequences_only(monkeypatch: pytest.MonkeyPatch) -> None:
    if _flashmla_missing():
        pytest.skip("needs FlashMLA (flash_mla, or TANDEM_FLASHMLA_SO) on an sm90 GPU")
    from kernels.flashmla_decode import flashmla_runs

    monkeypatch.setenv("TANDEM_MLA_DECODE", "auto")
    for batch, heads, expected in ((64, 128, True), (16, 64, True), (8, 128, False), (64, 16, False)):
        q_latent, _, kv, _, _ = _decode_case(batch, heads, 64, 64, torch.bfloat16, seed=1)
        assert flashmla_runs(q_latent, kv, 1.0) is expected, (batch, heads)
    monkeypatch.setenv("TANDEM_MLA_DECODE", "triton")
    assert not flashmla_runs(*_decode_case(64, 128, 64, 64, torch.bfloat16, seed=1)[0:1], kv, 1.0)


@gpu_test
@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("batch,max_context", [(1, 1), (8, 2100)])
def test_triton_decode_dequantizes_an_fp8_cache_on_load_like_the_reference(
    batch: int, max_context: int, heads: int, kv_scale: float
) -> None:
    """`--kv-cache-dtype fp8_e4m3`: the kernel reads float8_e4m3fn pages (a strided layer view) with bf16 q
    and matches the float64 reference on the dequantized cache (`stored * kv_scale`)."""
    from kernels.triton_mla_decode import kv_bytes_read, mla_decode_attention_triton

    q_latent, q_rope, kv, page_table, seq_lens = _decode_case(batch, heads, max_context, 64, torch.bfloat16,
                                                              seed=7 * batch + heads)
    pool8 = torch.zeros(kv.shape[0], 3, *kv.shape[1:], dtype=torch.float8_e4m3fn, device="cuda")
    pool8[:, 1] = (kv.float() / kv_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    kv8 = pool8[:, 1]
    assert not kv8.is_contiguous()
    _poison_allocator()
    out = mla_decode_attention_triton(q_latent, q_rope, kv8, page_table, seq_lens, SCALE, kv_scale=kv_scale)
    assert out.shape == (batch, heads, LORA) and out.dtype == torch.bfloat16
    ref = _decode_ref(q_latent, q_rope, kv8.double() * kv_scale, page_table, seq_lens, SCALE)
    assert _rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    # The torch reference given the FP8 cache itself agrees too (it dequantizes after the gather).
    torch_ref = mla_decode_attention(q_latent, q_rope, kv8, page_table, seq_lens, SCALE, kv_scale)
    assert _rel_err(torch_ref, ref) < TOLERANCE[torch.bfloat16]
    assert kv_bytes_read(100, LORA + ROPE, kv8.dtype) * 2 == kv_bytes_read(100, LORA + ROPE, torch.bfloat16)


@gpu_test
def test_engine_on_cuda_with_an_fp8_kv_pool_generates_and_frees_every_page(tmp_path) -> None:
    """The whole model path on the GPU (Triton decode, SDPA prefill) over an FP8 pool, eager and through
    CUDA graphs: the same greedy tokens both ways, and the pool back at idle."""
    from engine.llm import LLM
    from engine.sampling import SamplingParams
    from engine.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny", "v3", seed=0)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[*range(3, 60)], [5, 6, 7, 8]]
    outputs = []
    for graphs in (0, 4):
        # float32 activations: in bf16, eager and graph decode sum the experts in different orders, and a
        # near-tie can flip a greedy token after a few steps (seen at token 4 and at token 12 on one H200).
        llm = LLM(model, device="cuda", dtype="float32", page_size=64, num_pages=16, kv_cache_dtype="fp8_e4m3",
                  cuda_graph_max_bs=graphs)
        try:
            assert llm.kv_pool.tensor.dtype == torch.float8_e4m3fn
            outputs.append([o.token_ids for o in llm.generate(prompts, params)])
        finally:
            llm.close()
    assert outputs[0] == outputs[1] and all(len(ids) == 12 for ids in outputs[0])


@gpu_test
@pytest.mark.parametrize("num_splits", [1, 3, 16, 64])
def test_triton_decode_gives_the_same_answer_for_any_split_count(num_splits: int) -> None:
    from kernels.triton_mla_decode import DecodeLaunchConfig, mla_decode_attention_triton

    # Short sequences next to long ones: with many splits most of a short sequence's splits are empty.
    args = _decode_case(6, 16, 1500, 64, torch.float32, seed=num_splits)
    args[4][1:3] = torch.tensor([2, 65], dtype=torch.int32)
    config = DecodeLaunchConfig(block_h=16, block_n=16, num_splits=num_splits, num_warps=4, num_stages=2)
    _poison_allocator()
    out = mla_decode_attention_triton(*args, SCALE, config=config)
    assert _rel_err(out, _decode_ref(*args, SCALE)) < TOLERANCE[torch.float32]


@gpu_test
def test_triton_decode_gives_zeros_for_an_empty_sequence() -> None:
    from kernels.triton_mla_decode import mla_decode_attention_triton

    q_latent, q_rope, kv, page_table, seq_lens = _decode_case(3, 16, 200, 64, torch.bfloat16, seed=7)
    seq_lens[1] = 0
    _poison_allocator()
    out = mla_decode_attention_triton(q_latent, q_rope, kv, page_table, seq_lens, SCALE)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    ref = _decode_ref(q_latent[keep], q_rope[keep], kv, page_table[keep], seq_lens[keep], SCALE)
    assert _rel_err(out[keep], ref) < TOLERANCE[torch.bfloat16]


@gpu_test
def test_triton_decode_replays_in_a_cuda_graph_with_new_lengths_and_pages() -> None:
    from kernels.triton_mla_decode import mla_decode_attention_triton

    q_latent, q_rope, kv, page_table, seq_lens = _decode_case(8, 16, 1000, 64, torch.bfloat16, seed=11)
    mla_decode_attention_triton(q_latent, q_rope, kv, page_table, seq_lens, SCALE)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_attention_triton(q_latent, q_rope, kv, page_table, seq_lens, SCALE)
    gen = torch.Generator(device="cuda").manual_seed(12)
    for _ in range(2):
        # New contents in the same static buffers, as a decode step would write them.
        seq_lens.copy_(torch.randint(1, 1001, (8,), generator=gen, device="cuda", dtype=torch.int32))
        page_table.copy_(page_table[torch.randperm(8, generator=gen, device="cuda")])
        q_latent.normal_(generator=gen)
        graph.replay()
        ref = _decode_ref(q_latent, q_rope, kv, page_table, seq_lens, SCALE)
        assert _rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@needs_triton
def test_triton_decode_rejects_mismatched_shapes_before_launching() -> None:
    from kernels.triton_mla_decode import mla_decode_attention_triton

    q_latent, q_rope = torch.zeros(2, 4, 32), torch.zeros(2, 4, 16)
    kv = torch.zeros(3, 16, 48)
    table, lens = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_decode_attention_triton(q_latent, q_rope, torch.zeros(3, 16, 40), table, lens, 1.0)
    with pytest.raises(ValueError, match="page_table"):
        mla_decode_attention_triton(q_latent, q_rope, kv, table.long(), lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode_attention_triton(q_latent, q_rope, kv, table, torch.ones(3, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        mla_decode_attention_triton(q_latent, q_rope, torch.zeros(3, 48, 16).transpose(1, 2), table, lens, 1.0)



def _routing(tokens: int, top_k: int, experts: int, dtype: torch.dtype, gen: torch.Generator, remote: float):
    """Distinct experts per token, a `remote` share of slots routed to other ranks (-1)."""
    scores = torch.rand(tokens, experts, generator=gen, device="cuda")
    topk_ids = scores.topk(top_k, dim=1).indices.to(torch.int32)
    topk_ids[torch.rand(tokens, top_k, generator=gen, device="cuda") < remote] = -1
    topk_weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device="cuda"), -1).to(dtype)
    return topk_ids, topk_weights


def _expert_weights(experts: int, hidden: int, inter: int, dtype: torch.dtype, gen: torch.Generator):
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device="cuda") / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device="cuda") / inter**0.5).to(dtype)
    return w13, w2


MOE_SHAPES = [  # tokens, top_k, experts, hidden, intermediate
    (1, 6, 64, 256, 128),
    (37, 2, 4, 96, 80),
    (300, 8, 16, 512, 384),
    (256, 6, 64, 2048, 1408),  # DeepSeek-V2-Lite's expert shape
]


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_moe_matches_reference_with_remote_slots(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from kernels.triton_moe import moe_forward_triton

    tokens, top_k, experts, hidden, inter = shape
    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(dtype)
    topk_ids, topk_weights = _routing(tokens, top_k, experts, dtype, gen, remote=0.3)
    w13, w2 = _expert_weights(experts, hidden, inter, dtype, gen)
    _poison_allocator()
    out = moe_forward_triton(x, topk_ids, topk_weights, w13, w2)
    ref = moe_forward(x.double(), topk_ids, topk_weights.double(), w13.double(), w2.double())
    assert out.shape == x.shape and out.dtype == dtype
    assert _rel_err(out, ref) < TOLERANCE[dtype]


@gpu_test
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grouped_mm_moe_matches_reference_with_remote_slots(shape: tuple[int, ...]) -> None:
    from kernels.triton_moe import grouped_mm_available, moe_forward_grouped_mm

    if not grouped_mm_available(torch.bfloat16, torch.device("cuda")):
        pytest.skip("torch._grouped_mm needs bf16 on sm90+")
    tokens, top_k, experts, hidden, inter = shape
    gen = torch.Generator(device="cuda").manual_seed(sum(shape) + 1)
    x = torch.randn(tokens, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    topk_ids, topk_weights = _routing(tokens, top_k, experts, torch.bfloat16, gen, remote=0.3)
    w13, w2 = _expert_weights(experts, hidden, inter, torch.bfloat16, gen)
    _poison_allocator()
    out = moe_forward_grouped_mm(x, topk_ids, topk_weights, w13, w2)
    ref = moe_forward(x.double(), topk_ids, topk_weights.double(), w13.double(), w2.double())
    assert _rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@gpu_test
def test_gpu_moe_refuses_an_expert_id_past_the_local_experts() -> None:
    from kernels.triton_moe import moe_forward_gpu

    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 64, generator=gen, device="cuda")
    w13, w2 = _expert_weights(4, 64, 32, torch.float32, gen)
    topk_ids = torch.tensor([[0, 1], [2, 4], [3, -1], [1, 2]], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="expert 4 but only 4"):
        moe_forward_gpu(x, topk_ids, torch.ones(4, 2, device="cuda"), w13, w2)


def _masked_case(experts: int, capacity: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(experts, capacity, hidden, generator=gen, device="cuda").to(dtype)
    counts = torch.randint(0, capacity + 1, (experts,), generator=gen, device="cuda", dtype=torch.int32)
    counts[0], counts[-1] = 0, capacity  # an idle expert and a full one
    w13, w2 = _expert_weights(experts, hidden, inter, dtype, gen)
    return x, counts, w13, w2


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(4, 24, 96, 80), (64, 40, 2048, 1408), (8, 130, 512, 256)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_masked_moe_matches_reference_and_zeroes_rows_past_each_count(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    from kernels.triton_moe import moe_forward_masked_triton

    x, counts, w13, w2 = _masked_case(*shape, dtype, seed=sum(shape))
    _poison_allocator()
    out = moe_forward_masked_triton(x, counts, w13, w2)
    ref = moe_forward_masked(x.double(), counts, w13.double(), w2.double())
    assert _rel_err(out, ref) < TOLERANCE[dtype]
    rows = torch.arange(x.shape[1], device="cuda")[None, :]
    assert torch.equal(out[rows >= counts[:, None]], torch.zeros_like(out[rows >= counts[:, None]]))


@gpu_test
def test_masked_moe_replays_in_a_cuda_graph_with_new_counts() -> None:
    from kernels.triton_moe import moe_forward_masked_triton

    x, counts, w13, w2 = _masked_case(16, 32, 256, 128, torch.bfloat16, seed=5)
    moe_forward_masked_triton(x, counts, w13, w2)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_forward_masked_triton(x, counts, w13, w2)
    gen = torch.Generator(device="cuda").manual_seed(6)
    for _ in range(2):
        counts.copy_(torch.randint(0, 33, (16,), generator=gen, device="cuda", dtype=torch.int32))
        x.normal_(generator=gen)
        graph.replay()
        ref = moe_forward_masked(x.double(), counts, w13.double(), w2.double())
        assert _rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@gpu_test
def test_masked_moe_refuses_a_count_over_capacity() -> None:
    from kernels.triton_moe import moe_forward_masked_triton

    x, counts, w13, w2 = _masked_case(4, 8, 64, 32, torch.float32, seed=9)
    counts[2] = 9
    with pytest.raises(ValueError, match="capacity is 8"):
        moe_forward_masked_triton(x, counts, w13, w2)


@gpu_test
@pytest.mark.parametrize("pad_v", [False, True], ids=["v128", "v_padded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads", [16, 128])
def test_sdpa_prefill_matches_reference_with_cached_prefixes(heads: int, dtype: torch.dtype, pad_v: bool) -> None:
    from kernels.gpu_prefill import mla_prefill_attention_sdpa

    # (queries, keys) per sequence: a plain prompt, chunks after a cached prefix, an empty chunk.
    lengths = [(70, 70), (33, 161), (0, 12), (1, 300), (128, 128)]
    cu_q = torch.tensor([0] + [sum(q for q, _ in lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(k for _, k in lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(heads)
    q = torch.randn(int(cu_q[-1]), heads, 192, generator=gen, device="cuda").to(dtype)
    k = torch.randn(int(cu_k[-1]), heads, 192, generator=gen, device="cuda").to(dtype)
    v = torch.randn(int(cu_k[-1]), heads, 128, generator=gen, device="cuda").to(dtype)
    _poison_allocator()
    out = mla_prefill_attention_sdpa(q, k, v, cu_q.cuda(), cu_k.cuda(), SCALE, pad_v=pad_v)
    ref = mla_prefill_attention(q.double(), k.double(), v.double(), cu_q, cu_k, SCALE)
    assert out.shape == (q.shape[0], heads, 128)
    assert _rel_err(out, ref) < TOLERANCE[dtype]


def test_sdpa_prefill_rejects_inconsistent_lengths() -> None:
    from kernels.gpu_prefill import mla_prefill_attention_sdpa

    q, k, v = torch.zeros(5, 2, 24), torch.zeros(4, 2, 24), torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match="fewer keys"):
        mla_prefill_attention_sdpa(q, k, v, torch.tensor([0, 5], dtype=torch.int32),
                                   torch.tensor([0, 4], dtype=torch.int32), 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="never decrease"):
        mla_prefill_attention_sdpa(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32),
                                   torch.tensor([0, 4, 4], dtype=torch.int32), 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="int32"):
        mla_prefill_attention_sdpa(q, k, v, torch.tensor([0, 5]), torch.tensor([0, 4]), 1.0)
