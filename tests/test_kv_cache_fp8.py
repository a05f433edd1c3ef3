"""`--kv-cache-dtype fp8_e4m3`: the FP8 pool's bytes, the quantize/dequantize contract every attention path
keeps, colocated generation on an FP8 pool (chunked or not, back to idle), the flag on the CLI, and the
refusal of a dtype mismatch between page layouts. The 1P1D system test is tests/test_pd_fp8_kv.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_engine import tiny_v3_dir

from engine.kv_pool import KVPool, dequantize_kv, quantize_kv, resolve_kv_cache_dtype
from engine.llm import LLM
from engine.sampling import SamplingParams
from kernels.mla import mla_decode_attention
from kvtransfer.layout import PageLayout

FP8 = torch.float8_e4m3fn
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
PROMPTS = [[*range(3, 60)], [5, 6, 7, 8], [*range(100, 180)]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


def test_kv_cache_dtype_names_resolve_to_storage_dtypes_and_unknown_names_are_refused() -> None:
    assert resolve_kv_cache_dtype("auto", torch.float32) is torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) is torch.bfloat16
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16) is FP8
    with pytest.raises(ValueError, match="unknown kv cache dtype 'fp8'"):
        resolve_kv_cache_dtype("fp8", torch.bfloat16)


def test_fp8_pool_holds_half_the_bytes_of_a_bf16_pool_and_its_page_layout_says_so() -> None:
    shape = dict(num_pages=8, num_layers=61, page_size=64, kv_dim=576, device="cpu")
    bf16, fp8 = KVPool(dtype=torch.bfloat16, **shape), KVPool(dtype=FP8, **shape)
    try:
        assert fp8.tensor.nbytes * 2 == bf16.tensor.nbytes
        assert fp8.layout.bytes_per_page * 2 == bf16.layout.bytes_per_page
        # What a transfer moves per page: DeepSeek-V3's 4.4 MiB page becomes 2.2 MiB.
        layout_bf16, layout_fp8 = PageLayout.from_tensor(bf16.tensor), PageLayout.from_tensor(fp8.tensor)
        assert layout_bf16.page_bytes == 61 * 64 * 576 * 2 == 2 * layout_fp8.page_bytes
        assert (layout_fp8.dtype, layout_fp8.itemsize) == ("float8_e4m3fn", 1)
    finally:
        bf16.close()
        fp8.close()


def test_a_dtype_mismatch_between_page_layouts_is_named_with_the_flag_to_fix() -> None:
    mine = PageLayout(num_pages=4, num_layers=2, page_size=16, token_dim=576, itemsize=1, dtype="float8_e4m3fn",
                      base_ptr=4096)
    peer = PageLayout(num_pages=4, num_layers=2, page_size=16, token_dim=576, itemsize=2, dtype="bfloat16",
                      base_ptr=8192)
    why = mine.compatible_with(peer)
    assert why is not None and "dtype differs: 'float8_e4m3fn' here, 'bfloat16'" in why and "--kv-cache-dtype" in why
    assert mine.compatible_with(PageLayout(**{**mine.__dict__, "base_ptr": 0, "num_pages": 9})) is None


def test_quantize_saturates_instead_of_nan_and_round_trips_within_e4m3_precision() -> None:
    x = torch.tensor([0.0, 1.0, -3.3, 0.02, 1000.0, -1e6])
    q = quantize_kv(x, FP8, 1.0)
    assert q.dtype is FP8 and not q.float().isnan().any()
    back = dequantize_kv(q, torch.float32, 1.0)
    assert back[4] == 448.0 and back[5] == -448.0  # e4m3's largest finite value, not NaN
    assert torch.allclose(back[:4], x[:4], rtol=2 ** -3, atol=2 ** -9)
    # A scale divides on the way in and multiplies on the way out: 1000 fits with scale 4.
    assert dequantize_kv(quantize_kv(x, FP8, 4.0), torch.float32, 4.0)[4] == pytest.approx(1000.0, rel=2 ** -3)
    # Non-FP8 storage is a plain cast, scale 1.
    assert torch.equal(quantize_kv(x, torch.float32, 1.0), x)


@pytest.mark.parametrize("kv_scale", [1.0, 0.25])
def test_reference_decode_on_an_fp8_cache_equals_decode_on_its_dequantized_values(kv_scale: float) -> None:
    gen = torch.Generator().manual_seed(3)
    batch, heads, rank, rope, page = 3, 4, 32, 8, 4
    pool = torch.randn(10, 2, page, rank + rope, generator=gen)
    pool8 = quantize_kv(pool, FP8, kv_scale)
    view8 = pool8[:, 1]  # a strided layer view, as the engine passes it
    q_latent, q_rope = torch.randn(batch, heads, rank, generator=gen), torch.randn(batch, heads, rope, generator=gen)
    table = torch.tensor([[3, 1, 7], [0, 2, -1], [9, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([11, 5, 2], dtype=torch.int32)
    out = mla_decode_attention(q_latent, q_rope, view8, table, lens, 0.1, kv_scale)
    dequantized = pool8.float()[:, 1] * kv_scale
    assert torch.equal(out, mla_decode_attention(q_latent, q_rope, dequantized, table, lens, 0.1))
    # The scale is applied: reading the same bytes with another scale gives another answer.
    assert not torch.allclose(out, mla_decode_attention(q_latent, q_rope, view8, table, lens, 0.1, kv_scale * 2))
    # FP8 is close to, but not, the unquantized cache.
    exact = mla_decode_attention(q_latent, q_rope, pool[:, 1], table, lens, 0.1)
    assert 0 < (out - exact).norm() / exact.norm() < 0.1


def test_colocated_generation_on_an_fp8_pool_is_chunk_invariant_and_frees_every_page(tiny_dir: Path) -> None:
    outputs = []
    for chunk in (8192, 40):  # one prefill forward, or chunks of 40 that read an FP8 prefix back
        llm = LLM(tiny_dir, page_size=16, num_pages=64, kv_cache_dtype="fp8_e4m3", max_prefill_tokens=chunk)
        try:
            assert llm.kv_pool.tensor.dtype is FP8
            outputs.append([o.token_ids for o in llm.generate(PROMPTS, GREEDY)])
            assert llm.kv_pool.tensor.view(torch.uint8).any()  # the KV was written into the FP8 pool
            assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
        finally:
            llm.close()
    assert outputs[0] == outputs[1]
    assert all(len(ids) == GREEDY.max_new_tokens for ids in outputs[0])


def test_generate_cli_takes_kv_cache_dtype_and_equals_the_offline_api(tiny_dir: Path) -> None:
    prompts = PROMPTS[:2]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(tiny_dir), "--prompt-token-ids", json.dumps(prompts),
         "--max-new-tokens", "6", "--ignore-eos", "--json", "--page-size", "16", "--kv-cache-dtype", "fp8_e4m3"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    got = [o["token_ids"] for o in json.loads(proc.stdout)["outputs"]]
    llm = LLM(tiny_dir, page_size=16, num_pages=64, kv_cache_dtype="fp8_e4m3")
    try:
        want = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))]
    finally:
        llm.close()
    assert got == want
    bad = subprocess.run([sys.executable, "-m", "engine.generate", "--model", str(tiny_dir), "--prompt", "x",
                          "--kv-cache-dtype", "int4"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--kv-cache-dtype" in bad.stderr


def test_bench_connector_fills_fp8_pages_with_standard_normal_values_and_leaves_the_others() -> None:
    from decode_worker.bench_connector import fill_pages

    pool = KVPool(num_pages=6, num_layers=2, page_size=4, kv_dim=64, dtype=FP8, device="cpu")
    try:
        fill_pages(pool.tensor, [1, 2, 4], torch.Generator().manual_seed(0))
        values = pool.tensor.float()
        assert not values[[0, 3, 5]].any()
        filled = values[[1, 2, 4]]
        assert filled.isfinite().all() and 0.8 < filled.std().item() < 1.2 and abs(filled.mean().item()) < 0.1
    finally:
        pool.close()


def test_multirank_generate_carries_the_kv_cache_dtype_to_every_rank(tiny_dir: Path) -> None:
    """`engine.generate --tp 2 --dp 2`: each DP group's ranks build FP8 pools; the tokens equal one rank's."""
    prompts = PROMPTS[:2]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(tiny_dir), "--prompt-token-ids", json.dumps(prompts),
         "--max-new-tokens", "6", "--ignore-eos", "--json", "--page-size", "16", "--kv-cache-dtype", "fp8_e4m3",
         "--tp", "2", "--dp", "2"],
        capture_output=True, text=True, timeout=240, check=True,
    )
    got = [o["token_ids"] for o in json.loads(proc.stdout)["outputs"]]
    want = {}
    for kv in ("fp8_e4m3", "auto"):
        llm = LLM(tiny_dir, page_size=16, num_pages=64, kv_cache_dtype=kv)
        try:
            want[kv] = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))]
        finally:
            llm.close()
    assert got == want["fp8_e4m3"]
    assert want["auto"] != want["fp8_e4m3"]  # so ranks that ignored the flag (float32 pools) would fail here
