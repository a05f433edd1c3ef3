"""`engine.plan`: per-rank bytes of a tiny config checked by hand and against the real parameters and pool
of the loaded model at several TP/DP layouts; DeepSeek-V3 on 8 x 141 GB (FP8 fits at tp8 dp8 and tp8 dp1,
bf16 does not); the CLI; and the workers' start-up refusal of an instance that cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_engine import tiny_v3_dir

from engine.config import ModelConfig
from engine.llm import LLM
from engine.model import DeepseekForCausalLM
from engine.parallel import ParallelContext
from engine.plan import GB, PlanError, PlanSpec, load_model_config, make_plan, weight_bytes
from engine.runtime.colocated import EngineArgs
from engine.runtime.launch import InstanceSpec, LayoutError
from engine.runtime.offline import check_memory
from engine.sampling import SamplingParams
from engine.tiny_model import tiny_config
from engine.weights import load_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def v3() -> ModelConfig:
    config, quantization, _, name = load_model_config("deepseek-v3")
    assert (quantization, name, config.num_hidden_layers, config.n_routed_experts) == (None, "deepseek-v3", 61, 256)
    return config


def test_tiny_plan_at_tp2_equals_a_hand_computation() -> None:
    """Tiny V3 (vocab 320, hidden 64, 4 heads, q_lora 48, kv_lora 32 + rope 8, nope 16, v 16, 3 layers of which
    the first is dense with intermediate 128, 8 experts of 32 + 1 shared) at tp 2, dp 1, float32."""
    config = ModelConfig.from_dict(tiny_config("v3"))
    w = weight_bytes(config, PlanSpec(tp=2, dtype="float32"))
    f = 4  # bytes per float32
    assert w["embedding (vocab / attn_tp)"] == w["lm_head (vocab / attn_tp)"] == 160 * 64 * f  # 320 rows / 2
    # Per layer: q_a 48x64 whole, q_b (2 heads x 24)x48, kv_a 40x64 whole, kv_b (2 x 32)x32, o 64x(2 x 16).
    assert w["attention (latent side / attn_tp)"] == 3 * (48 * 64 + 48 * 48 + 40 * 64 + 64 * 32 + 64 * 32) * f
    assert w["dense MLP (/ attn_tp)"] == 3 * 64 * 64 * f  # gate, up, down of 128 / 2
    assert w["router (float32)"] == 2 * (8 * 64 + 8) * 4  # gate + correction bias, 2 MoE layers
    assert w["routed experts (experts / tp)"] == 2 * 4 * 3 * 32 * 64 * f  # 4 of 8 experts per rank
    assert w["shared experts (/ attn_tp)"] == 2 * 3 * 16 * 64 * f
    assert w["norms"] == (64 + 3 * (2 * 64 + 32 + 48)) * f
    assert sum(w.values()) == 503552
    fp8 = weight_bytes(config, PlanSpec(tp=2, quantization="fp8", dtype="float32"))
    # FP8: one byte per linear weight and one float32 scale per 128x128 block (every matrix here is one block:
    # 15 attention + 3 dense + 24 expert + 6 shared matrices); embeddings, router and norms stay float32.
    assert fp8["attention (latent side / attn_tp)"] == w["attention (latent side / attn_tp)"] // f
    assert fp8["routed experts (experts / tp)"] == w["routed experts (experts / tp)"] // f
    assert fp8["fp8 block scales"] == 48 * 4
    assert fp8["embedding (vocab / attn_tp)"] == w["embedding (vocab / attn_tp)"]
    plan = make_plan(config, PlanSpec(tp=2, dtype="float32", kv_cache_dtype="fp8_e4m3"))
    assert plan.kv_bytes_per_token == 40 * 3 * 1
    # Layouts tandem refuses to split the model over are refused by the plan too, naming the numbers.
    with pytest.raises(PlanError, match=r"num_attention_heads \(4\) is not divisible by attn_tp \(8\)"):
        make_plan(config, PlanSpec(tp=8))
    with pytest.raises(PlanError, match=r"n_routed_experts \(8\) is not divisible by tp \(16\)"):
        make_plan(config, PlanSpec(tp=16, dp=16))


@pytest.mark.parametrize(("tp", "dp"), [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_plan_weights_equal_the_loaded_shards_bytes_on_every_rank(tiny_dir: Path, tp: int, dp: int) -> None:
    config = ModelConfig.from_dir(tiny_dir)
    planned = make_plan(config, PlanSpec(tp=tp, dp=dp, dtype="float32")).weights_total
    for rank in range(tp):
        model = DeepseekForCausalLM(config, ParallelContext(tp_rank=rank, tp_size=tp, dp_size=dp))
        load_model(model, tiny_dir, "auto", 0)
        assert sum(p.numel() * p.element_size() for p in model.parameters()) == planned, (tp, dp, rank)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_plan_kv_bytes_equal_the_real_pool_and_weights_the_real_model(tiny_dir: Path, kv_cache_dtype: str) -> None:
    llm = LLM(tiny_dir, page_size=16, num_pages=24, kv_cache_dtype=kv_cache_dtype)
    try:
        plan = make_plan(llm.config, PlanSpec(tp=1, dtype="float32", kv_cache_dtype=kv_cache_dtype, page_size=16))
        assert llm.kv_pool.tensor.nbytes == 24 * 16 * plan.kv_bytes_per_token
        assert sum(p.numel() * p.element_size() for p in llm.model.parameters()) == plan.weights_total
    finally:
        llm.close()


def test_v3_fp8_fits_on_141_gb_at_tp8_dp8_and_tp8_dp1(v3: ModelConfig) -> None:
    spec = PlanSpec(tp=8, dp=8, quantization="fp8", kv_cache_dtype="fp8_e4m3", gpu_memory_gb=141)
    dp8 = make_plan(v3, spec)
    dp1 = make_plan(v3, replace(spec, dp=1))
    for plan in (dp8, dp1):
        assert plan.fits and plan.kv_bytes_per_token == 576 * 61
        # 58 MoE layers x 32 of 256 experts x 3 matrices of 2048 x 7168, one byte each.
        assert plan.weights["routed experts (experts / tp)"] == 58 * 32 * 3 * 2048 * 7168
        assert plan.fixed + plan.kv_pool_bytes <= 0.9 * 141 * GB
        assert plan.kv_tokens_per_rank % 64 == 0 and plan.kv_tokens_per_dp_group == plan.kv_tokens_per_rank
    # DP attention replicates attention and vocab shards across the 8 groups: more weight per rank, fewer
    # tokens per group, but 8 groups of them.
    assert dp8.weights_total > dp1.weights_total + 10 * GB
    assert dp8.kv_tokens_per_dp_group < dp1.kv_tokens_per_dp_group < dp8.kv_tokens_instance
    assert dp8.weights["embedding (vocab / attn_tp)"] == 129280 * 7168 * 2
    # A bf16 KV cache holds half as many tokens in the same bytes.
    bf16_kv = make_plan(v3, replace(spec, kv_cache_dtype="auto"))
    assert bf16_kv.kv_bytes_per_token == 2 * dp8.kv_bytes_per_token
    assert abs(bf16_kv.kv_tokens_per_rank * 2 - dp8.kv_tokens_per_rank) <= 128


def test_v3_mla_core_holds_tp_times_one_ranks_kv_with_tp_weights(v3: ModelConfig) -> None:
    """--attention-dp mla-core at tp8: TP's weights per rank, and each rank's pool holds distinct requests, so
    the instance holds 8 x a rank's tokens: ~8x whole TP and more than whole DP 8 on the same 141 GB."""
    spec = PlanSpec(tp=8, quantization="fp8", gpu_memory_gb=141)
    tp, dp8 = make_plan(v3, spec), make_plan(v3, replace(spec, dp=8))
    mla = make_plan(v3, replace(spec, attention_dp="mla-core"))
    assert mla.weights == tp.weights
    assert mla.kv_tokens_instance == 8 * mla.kv_tokens_per_rank
    assert 7.9 * tp.kv_tokens_instance < mla.kv_tokens_instance  # only the exchange buffers differ
    assert mla.kv_tokens_instance > 2 * dp8.kv_tokens_instance
    with pytest.raises(PlanError, match="mla-core takes dp 1"):
        PlanSpec(tp=8, dp=2, attention_dp="mla-core")


def test_v3_bf16_does_not_fit_on_141_gb_at_tp8(v3: ModelConfig) -> None:
    for dp in (1, 8):
        plan = make_plan(v3, PlanSpec(tp=8, dp=dp, gpu_memory_gb=141))
        assert not plan.fits and plan.kv_tokens_per_rank == 0
        assert plan.weights["routed experts (experts / tp)"] == 58 * 32 * 3 * 2048 * 7168 * 2  # 163 GB
        assert "does NOT fit" in plan.table()


def test_a_quantization_config_in_the_checkpoint_makes_the_plan_fp8(tmp_path: Path) -> None:
    raw = json.loads((REPO / "engine/model_configs/deepseek-v3/config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config, quantization, block, _ = load_model_config(str(tmp_path))
    assert (quantization, block, config.hidden_size) == ("fp8", (128, 128), 7168)
    out = subprocess.run([sys.executable, "-m", "engine.plan", "--model", str(tmp_path), "--tp", "8",
                          "--gpu-memory-gb", "141", "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["spec"]["quantization"] == "fp8" and doc["fits"]


def test_plan_cli_prints_a_table_and_json_and_exits_1_when_it_does_not_fit() -> None:
    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "engine.plan", "--model", "deepseek-v3", "--gpu-memory-gb",
                               "141", *flags], capture_output=True, text=True, cwd=REPO, timeout=60)

    table = run("--tp", "8", "--dp", "8", "--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3")
    assert table.returncode == 0 and "fits" in table.stdout and "KV tokens per rank = per DP group" in table.stdout
    doc = json.loads(run("--tp", "8", "--quantization", "fp8", "--json").stdout)
    assert doc["fits"] and doc["attn_tp"] == 8 and doc["kv_bytes_per_token"] == 576 * 61 * 2
    assert doc["per_rank_bytes"]["kv_pool"] == doc["kv_tokens_per_rank"] * doc["kv_bytes_per_token"]
    refused = run("--tp", "8")
    assert refused.returncode == 1 and "does NOT fit" in refused.stdout
    assert run("--tp", "8", "--dp", "3").returncode == 2
    assert "built-in" in run("--tp", "8", "--model", "no-such-model").stderr


@pytest.mark.parametrize("worker", ["decode_worker", "prefill_worker"])
def test_worker_refuses_v3_bf16_at_tp8_on_141_gb_at_start_up_with_the_numbers(worker: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", worker, "--model", "engine/model_configs/deepseek-v3", "--load-format", "dummy",
         "--tp", "8", "--dtype", "bfloat16", "--gpu-memory-gb", "141", "--port", "9"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the instance does not fit in 141 GB per GPU: needs 176.01 GB per rank (weights 169.77" in out.stderr
    assert "routed experts (experts / tp)" in out.stderr and "163.48" in out.stderr


def test_start_up_check_refuses_a_kv_pool_larger_than_what_fits_and_says_how_many_tokens_do(
    tiny_dir: Path,
) -> None:
    args = EngineArgs(model_dir=str(tiny_dir), dtype="float32", page_size=16, max_total_tokens=65536,
                      max_prefill_tokens=64, max_running=8)
    check_memory(InstanceSpec(tp_size=2), args, gpu_memory_gb=1.0)  # 65536 tokens x 480 B: fits in 1 GB
    with pytest.raises(LayoutError, match=r"at most \d+ KV tokens per DP group fit") as refused:
        check_memory(InstanceSpec(tp_size=2), args, gpu_memory_gb=0.02)  # 18 MB planned, the pool needs 31 MB
    assert "KV bytes per token per rank: 480" in str(refused.value)
    with pytest.raises(LayoutError, match="not even the weights and activations fit"):
        check_memory(InstanceSpec(tp_size=2), args, gpu_memory_gb=0.0005)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_plan_matches_the_gpu_allocations_of_a_v2_lite_shaped_model(tmp_path: Path, kv_cache_dtype: str) -> None:
    """On a GPU: V2-Lite's shapes cut to 4 layers, bf16, dummy weights. The planned weight bytes equal what
    building the model allocated (within the rope tables and 512-byte block rounding), the pool is the
    planned bytes per token, and the peak of one 8192-token prefill stays under the activation estimate."""
    import torch

    raw = json.loads((REPO / "engine/model_configs/deepseek-v2-lite/config.json").read_text())
    raw["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = ModelConfig.from_dict(raw)
    plan = make_plan(config, PlanSpec(tp=1, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, page_size=64,
                                      max_prefill_tokens=8192))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    llm = LLM(tmp_path, device="cuda", dtype="bfloat16", page_size=64, num_pages=160, load_format="dummy",
              kv_cache_dtype=kv_cache_dtype)
    try:
        pool = llm.kv_pool.tensor.nbytes
        assert pool == 160 * 64 * plan.kv_bytes_per_token
        weights = torch.cuda.memory_allocated() - before - pool
        assert abs(weights - plan.weights_total) < 0.01 * plan.weights_total, (weights, plan.weights_total)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prompt = [(7 * i) % config.vocab_size for i in range(8192)]
        llm.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))
        peak = torch.cuda.max_memory_allocated() - base
        print(f"activations: measured peak {peak / GB:.3f} GB, planned {plan.activations / GB:.3f} GB")
        assert peak <= plan.activations, (peak, plan.activations)
    finally:
        llm.close()
