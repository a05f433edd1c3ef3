"""DeepSeek-V3 FP8 checkpoints: loading, dequantization, sharding, the MTP layer, the flag (CPU).

The checkpoint is written here in V3's own format (``engine.tiny_model`` variant ``v3-fp8``: float8_e4m3fn
``*.weight`` + float32 ``*.weight_scale_inv`` per 128x128 block, bf16 elsewhere, quantization_config, an
MTP layer). transformers' DeepseekV3 gets the dequantized weights (computed here in float64) and must
agree with the engine, which dequantizes at load on CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trained_fp8 import teacher_forced_logits

import kernels
from engine.config import ConfigError, Fp8Config, ModelConfig
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.layers import ColumnParallelLinear, RowParallelLinear
from engine.llm import LLM
from engine.model import DeepseekForCausalLM
from engine.parallel import ParallelContext
from engine.quant import SCALE_SUFFIX, Fp8Weight, plan_quantization
from engine.sampling import SamplingParams
from engine.tiny_model import tiny_config, write_tiny_model
from engine.weights import load_model
from kernels.fp8 import FP8_DTYPE, quantize_fp8_weight

PROMPT_LENS = (5, 37, 130)
NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("v3-fp8"), "v3-fp8", seed=3)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, 320, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _dequant_f64(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Block by block in float64, independent of kernels.fp8 (the product is exact in float64)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].double() * scale[i, j].double()
    return out


def _reference_state(model_dir: Path, num_layers: int) -> dict[str, torch.Tensor]:
    """Checkpoint name -> float64 dequantized (or plain) tensor, MTP layer left out."""
    raw = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name, tensor in raw.items():
        if name.endswith(SCALE_SUFFIX) or name.startswith(f"model.layers.{num_layers}."):
            continue
        scale = raw.get(name + SCALE_SUFFIX)
        out[name] = tensor.double() if scale is None else _dequant_f64(tensor, scale)
    return out


def test_the_checkpoint_is_in_deepseek_v3s_format(fp8_dir: Path) -> None:
    raw = load_file(str(fp8_dir / "model.safetensors"))
    q = raw["model.layers.1.mlp.experts.5.down_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == (256, 192)
    scale = raw["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"]
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (2, 2)  # 192 columns: ceil(192/128)
    assert tuple(raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape) == (2, 2)  # 144 rows
    assert raw["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router is not quantized
    cfg = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    assert cfg == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                   "weight_block_size": [128, 128]}
    assert any(n.startswith("model.layers.3.") for n in raw)  # the MTP layer


def test_dequantization_at_load_is_exact_against_float64(fp8_dir: Path) -> None:
    config = ModelConfig.from_dir(fp8_dir)
    model = DeepseekForCausalLM(config, dtype=torch.float32)
    load_model(model, fp8_dir)
    ref = _reference_state(fp8_dir, config.num_hidden_layers)
    attn = model.model.layers[1].self_attn
    for name, param in (("q_b_proj", attn.q_b_proj.weight), ("kv_a_proj_with_mqa", attn.kv_a_proj_with_mqa.weight),
                        ("o_proj", attn.o_proj.weight)):
        assert torch.equal(param, ref[f"model.layers.1.self_attn.{name}.weight"].float()), name
    moe = model.model.layers[2].mlp
    inter = config.moe_intermediate_size
    for e in range(config.n_routed_experts):
        p = f"model.layers.2.mlp.experts.{e}."
        assert torch.equal(moe.w13[e, :inter], ref[p + "gate_proj.weight"].float())
        assert torch.equal(moe.w13[e, inter:], ref[p + "up_proj.weight"].float())
        assert torch.equal(moe.w2[e], ref[p + "down_proj.weight"].float())
    # The dequantized weights are not a trivial pattern: most of the 256 fp8 codes' magnitudes occur.
    assert attn.q_b_proj.weight.unique().numel() > 100


def test_dequantize_is_exact_on_partial_blocks_and_casts_once_to_the_model_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(300, 200, generator=gen) * 50).clamp(-448, 448).to(FP8_DTYPE)
    scale = torch.rand(3, 2, generator=gen) * 1e-3
    w = Fp8Weight(q, scale, (128, 128))
    assert torch.equal(w.dequantize(), _dequant_f64(q, scale).float())
    bf16 = kernels.fp8.dequantize_fp8_weight(q, scale, dtype=torch.bfloat16)
    assert torch.equal(bf16, _dequant_f64(q, scale).float().bfloat16())
    with pytest.raises(ValueError, match="needs"):
        Fp8Weight(q, scale[:, :1], (128, 128)).validate("w")


@pytest.fixture(scope="module")
def fp8_llm(fp8_dir: Path) -> Iterator[LLM]:
    llm = LLM(str(fp8_dir), dtype="float32", page_size=16, num_pages=64)
    yield llm
    llm.close()


def _hf_model(fp8_dir: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    raw = tiny_config("v3-fp8")
    raw.pop("quantization_config")
    raw["torch_dtype"] = "float32"
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**raw)).eval()
    config = ModelConfig.from_dict(tiny_config("v3-fp8"))
    ref = _reference_state(fp8_dir, config.num_hidden_layers)
    state = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        if config.is_moe_layer(i):
            experts = range(config.n_routed_experts)
            state[p + "gate_up_proj"] = torch.stack([torch.cat([ref.pop(f"{p}{e}.gate_proj.weight"),
                                                                ref.pop(f"{p}{e}.up_proj.weight")]) for e in experts])
            state[p + "down_proj"] = torch.stack([ref.pop(f"{p}{e}.down_proj.weight") for e in experts])
    state.update(ref)
    missing, unexpected = hf.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in m or "correction_bias" in m for m in missing), (missing, unexpected)
    for name, buf in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(state[name].float())
    return hf


def test_greedy_tokens_and_logits_equal_transformers_given_the_dequantized_weights(
        fp8_dir: Path, fp8_llm: LLM, prompts: list[list[int]]) -> None:
    hf = _hf_model(fp8_dir)
    hf.generation_config.eos_token_id = None
    ours = fp8_llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist(), f"prompt of {len(prompt)} tokens"
    assert len({t for o in ours for t in o.token_ids}) > 10, "degenerate model: too few distinct tokens"
    pool = fp8_llm.kv_pool
    pages = pool.alloc(pool.pages_for_tokens(len(prompts[1])))
    try:
        batch = ForwardBatch.build(ForwardMode.EXTEND, [prompts[1]], [0], [pages], pool, return_all_logits=True)
        got = fp8_llm.model(batch).all_logits
        with torch.no_grad():
            want = hf(torch.tensor([prompts[1]])).logits[0]
        assert got is not None and ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    finally:
        pool.free(pages)
    assert pool.available_pages == pool.num_pages


def test_mtp_layer_is_skipped_with_a_log_line(fp8_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = ModelConfig.from_dir(fp8_dir)
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        load_model(DeepseekForCausalLM(config, dtype=torch.float32), fp8_dir)
    skipped = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(skipped) == 1 and "skipped 8 tensors of layer(s) 3" in skipped[0], skipped


def test_tp_shards_keep_fp8_on_block_boundaries_and_dequantize_off_them(
        fp8_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = ModelConfig.from_dir(fp8_dir)
    raw = load_file(str(fp8_dir / "model.safetensors"))
    ref = _reference_state(fp8_dir, config.num_hidden_layers)
    for rank in (0, 1):
        ctx = ParallelContext(tp_rank=rank, tp_size=2)  # load only: no collective runs
        model = DeepseekForCausalLM(config, ctx, dtype=torch.float32, fp8=config.quantization)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="engine.weights"):
            load_model(model, fp8_dir)
        dense = model.model.layers[0].mlp
        # 512 rows over 2 ranks = 256 per rank, two whole 128-row blocks: FP8 and scales, cut like bf16.
        assert dense.gate_proj.weight.dtype == FP8_DTYPE
        name = "model.layers.0.mlp.gate_proj.weight"
        assert torch.equal(dense.gate_proj.weight.view(torch.uint8),
                           raw[name][rank * 256 : (rank + 1) * 256].view(torch.uint8))
        assert torch.equal(dense.gate_proj.weight_scale_inv, raw[name + SCALE_SUFFIX][rank * 2 : (rank + 1) * 2])
        down = "model.layers.0.mlp.down_proj.weight"  # row-parallel: columns 256 per rank
        assert torch.equal(dense.down_proj.weight_scale_inv, raw[down + SCALE_SUFFIX][:, rank * 2 : (rank + 1) * 2])
        # q_b_proj: 192 rows -> 96 per rank, off the 128 grid: model dtype, the exact dequantized rows.
        attn = model.model.layers[1].self_attn
        assert attn.q_b_proj.weight.dtype == torch.float32 and attn.q_b_proj.weight_scale_inv is None
        q_b = ref["model.layers.1.self_attn.q_b_proj.weight"].float()
        assert torch.equal(attn.q_b_proj.weight, q_b[rank * 96 : (rank + 1) * 96])
        assert attn.o_proj.weight.dtype == torch.float32  # 128 inputs -> 64 per rank
        assert attn.q_a_proj.weight.dtype == FP8_DTYPE  # replicated: never cut
        moe = model.model.layers[1].mlp
        assert moe.w13.dtype == FP8_DTYPE and moe.w13.shape[0] == 4  # experts 4r..4r+3, whole
        e = 4 * rank + 1
        assert torch.equal(moe.w13_scale_inv[1, 2:], raw[f"model.layers.1.mlp.experts.{e}.up_proj.weight_scale_inv"])
        lines = [r.getMessage() for r in caplog.records]
        assert any("self_attn.q_b_proj.weight dequantized at load to float32 on 3 layer(s): its tp shard of 96 "
                   "output rows does not cut on 128-multiples" in m for m in lines), lines
        assert any("self_attn.kv_b_proj.weight dequantized" in m and "per head" in m for m in lines), lines
        assert any("mlp.shared_experts.down_proj.weight dequantized" in m for m in lines), lines


def test_fp8_column_and_row_shards_recombine_to_the_unsharded_product() -> None:
    gen = torch.Generator().manual_seed(5)
    fp8 = Fp8Config()
    weight = Fp8Weight.quantize(torch.randn(512, 384, generator=gen) / 20, fp8)
    x = torch.randn(9, 384, generator=gen)
    full = kernels.fp8_linear(x, weight.q, weight.scale)
    cols = []
    for rank in (0, 1):
        layer = ColumnParallelLinear(384, 512, False, rank, 2, torch.float32, "cpu", fp8)
        layer.load_full("w", weight)
        assert layer.fp8 is not None
        cols.append(layer(x))
    assert torch.equal(torch.cat(cols, dim=1), full)  # the same groups and blocks: bit for bit
    row_weight = Fp8Weight.quantize(torch.randn(384, 512, generator=gen) / 20, fp8)
    y = torch.randn(9, 512, generator=gen)
    parts = []
    for rank in (0, 1):
        layer = RowParallelLinear(512, 384, False, rank, 2, None, torch.float32, "cpu", reduce_results=False, fp8=fp8)
        layer.load_full("w", row_weight)
        parts.append(layer(y[:, rank * 256 : (rank + 1) * 256]))
    torch.testing.assert_close(parts[0] + parts[1], kernels.fp8_linear(y, row_weight.q, row_weight.scale),
                               rtol=1e-5, atol=1e-5)


def test_fp8_weights_kept_on_cpu_run_the_reference_kernels_like_the_dequantized_model(
        fp8_dir: Path, fp8_llm: LLM, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """What the GPU runs (FP8 weights + scales in every linear layer and expert), through the torch
    references and, for decode, the graph-safe masked MoE path. With the activation quantizer made the
    identity it equals the dequantized model: every FP8 weight reached its kernel with the right scales."""
    import engine.quant

    monkeypatch.setattr(engine.quant, "fp8_kernels_run_on", lambda device: True)
    monkeypatch.setenv(kernels.fp8.ACT_ENV, "fp8")  # every GEMM input quantized, whatever its rows
    kept = LLM(str(fp8_dir), dtype="float32", page_size=16, num_pages=64, cuda_graph_max_bs=4)
    try:
        layer = kept.model.model.layers[1]
        assert layer.mlp.w13.dtype == FP8_DTYPE and layer.self_attn.o_proj.weight.dtype == FP8_DTYPE
        assert layer.mlp.shared_experts.down_proj.weight.dtype == FP8_DTYPE
        want = teacher_forced_logits(fp8_llm, prompts[2])
        with monkeypatch.context() as m:
            m.setattr(kernels.fp8, "_fp8_matmul_f32", lambda x, w, s, block, quant_act=True: x.float() @ kernels.
                      fp8.dequantize_fp8_weight(w, s, block).T)
            exact = teacher_forced_logits(kept, prompts[2])
        assert ((exact - want).norm() / want.norm()).item() < 1e-5
        got = teacher_forced_logits(kept, prompts[2])
        # Quantizing the activations (~2.5 % per GEMM input, ~8 GEMMs a layer, routing flips on this random
        # model) moves the logits by ~18 %: measured, not a bug (the line above shows the weights are right).
        rel = ((got - want).norm() / want.norm()).item()
        assert 1e-3 < rel < 0.35, rel
        assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.5
        # Greedy decode on the graph-safe FP8 path (masked experts) continues from its own prefill.
        idle = kept.kv_pool.available_pages  # the graph runner holds one scratch page until close()
        outs = kept.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
        assert all(len(o.token_ids) == 8 for o in outs)
        assert outs[2].token_ids[0] == int(got[-1].argmax())
        assert kept.kv_pool.available_pages == idle
    finally:
        kept.close()


def test_dummy_fp8_weights_are_fp8_values_of_the_checkpoints_shapes() -> None:
    config = ModelConfig.from_dict(tiny_config("v2-lite"))
    plan = plan_quantization("fp8", config, "cpu", torch.float32)
    assert plan.in_effect == Fp8Config() and not plan.keep_fp8
    model = DeepseekForCausalLM(config, dtype=torch.float32)
    load_model(model, None, "dummy", seed=4, fp8=plan.in_effect)
    plain = DeepseekForCausalLM(config, dtype=torch.float32)
    load_model(plain, None, "dummy", seed=4)
    got, raw = model.model.layers[1].self_attn.q_proj.weight, plain.model.layers[1].self_attn.q_proj.weight
    q, s = quantize_fp8_weight(raw)
    assert torch.equal(got, kernels.fp8.dequantize_fp8_weight(q, s)) and not torch.equal(got, raw)
    kept = DeepseekForCausalLM(config, dtype=torch.float32, fp8=Fp8Config())
    load_model(kept, None, "dummy", seed=4)
    assert torch.equal(kept.model.layers[1].mlp.w2.view(torch.uint8)[0],
                       quantize_fp8_weight(plain.model.layers[1].mlp.w2[0])[0].view(torch.uint8))


def test_fp8_q_and_kv_a_projections_run_as_one_gemm_where_their_scale_blocks_stack() -> None:
    """FP8 q_a (or q) and kv_a weights share one buffer, and their block scales another, when q's rows end on a
    128-row block: one FP8 GEMM gives both projections, as the two layers do apart. The tiny checkpoint's
    q_lora of 192 (1.5 blocks) cannot stack (a scale block would straddle both weights) and stays two GEMMs."""
    from engine.layers import stacked_in

    for q_lora, fused in ((256, True), (192, False)):
        config = ModelConfig.from_dict({**tiny_config("v3-fp8"), "q_lora_rank": q_lora})
        model = DeepseekForCausalLM(config, dtype=torch.float32, fp8=Fp8Config())
        load_model(model, None, "dummy", seed=4)
        attn = model.model.layers[0].self_attn
        kv_a = attn.kv_a_proj_with_mqa
        assert attn._q_in.weight.dtype == FP8_DTYPE and kv_a.weight.dtype == FP8_DTYPE
        assert (attn._q_kv_a is not None) is fused
        if fused:  # the loader filled the views: the buffers hold the dummy weights
            assert stacked_in(attn._q_kv_a, attn._q_in.weight, kv_a.weight)
            assert stacked_in(attn._q_kv_a_scale, attn._q_in.weight_scale_inv, kv_a.weight_scale_inv)
            assert attn._q_kv_a_scale is not None and attn._q_kv_a_scale.shape == (2 + 2, 2)
        x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(q_lora))
        q, latent = attn._project_hidden(x)
        for got, want in ((q, attn._q_in(x)), (latent, kv_a(x))):
            assert got.shape == want.shape and ((got - want).norm() / want.norm()).item() < 1e-6


def test_quantization_flag_resolves_from_the_config_and_none_forces_dequantization(fp8_dir: Path) -> None:
    config = ModelConfig.from_dir(fp8_dir)
    assert config.quantization == Fp8Config(128, 128)
    assert plan_quantization("auto", config, "cpu", torch.float32).in_effect == config.quantization
    assert plan_quantization("none", config, "cpu", torch.float32).in_effect is None
    bf16 = ModelConfig.from_dict(tiny_config("v3"))
    assert plan_quantization("auto", bf16, "cpu", torch.float32).in_effect is None
    with pytest.raises(ValueError, match="--quantization"):
        plan_quantization("int4", config, "cpu", torch.float32)


def test_auto_keeps_a_checkpoints_fp8_weights_where_the_kernels_run(fp8_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An FP8 checkpoint under `auto` stays FP8 on a GPU with FP8 tensor cores (the GPU tests keep the dequantized
    model's greedy tokens: tests/test_fp8_gpu.py), is dequantized where the kernels cannot run."""
    import engine.quant

    config = ModelConfig.from_dir(fp8_dir)
    monkeypatch.setattr(engine.quant, "fp8_kernels_run_on", lambda device: False)  # pre-sm89
    assert not plan_quantization("auto", config, "cuda", torch.bfloat16).keep_fp8
    monkeypatch.setattr(engine.quant, "fp8_kernels_run_on", lambda device: True)
    plan = plan_quantization("auto", config, "cuda", torch.bfloat16)
    assert plan.keep_fp8 and plan.model_fp8 == config.quantization
    assert not plan_quantization("none", config, "cuda", torch.bfloat16).keep_fp8


@pytest.mark.parametrize(("env", "value"), [("TANDEM_FP8_ACT", "int8"), ("TANDEM_FP8_GEMM", "cutlass")])
def test_a_bad_fp8_kernel_setting_is_refused_at_start_naming_it(fp8_dir: Path, env: str, value: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels read these on every call; the plan that keeps FP8 weights checks them before any forward."""
    import engine.quant

    config = ModelConfig.from_dir(fp8_dir)
    monkeypatch.setattr(engine.quant, "fp8_kernels_run_on", lambda device: True)
    assert plan_quantization("fp8", config, "cpu", torch.float32).keep_fp8  # the settings as they are: fine
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=f"{env}.*{value}"):
        plan_quantization("fp8", config, "cpu", torch.float32)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("quant_method", "awq", "quant_method"), ("fmt", "e5m2", "fmt"), ("activation_scheme", "static", "static"),
    ("weight_block_size", None, "per-tensor"),
])
def test_other_quantization_schemes_are_refused_naming_the_field(field: str, value: object, match: str) -> None:
    raw = tiny_config("v3-fp8")
    raw["quantization_config"][field] = value
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(raw)


def test_engine_generate_and_both_workers_take_the_quantization_flag(fp8_dir: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from decode_worker.__main__ import build_parser as decode_parser
    from engine.generate import main
    from engine.server.cli import engine_args
    from prefill_worker.__main__ import build_parser as prefill_parser

    for build in (prefill_parser, decode_parser):
        args = build().parse_args(["--model", str(fp8_dir), "--quantization", "none"])
        assert engine_args(args).quantization == "none"
        assert engine_args(build().parse_args(["--model", str(fp8_dir)])).quantization == "auto"
    outputs = []
    for flag in ("auto", "none"):
        assert main(["--model", str(fp8_dir), "--prompt-token-ids", "[[5, 6, 7, 8]]", "--max-new-tokens", "4",
                     "--json", "--quantization", flag]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4  # on CPU both dequantize at load


def test_tp2_instance_from_the_fp8_checkpoint_gives_the_single_rank_tokens(fp8_dir: Path, fp8_llm: LLM,
                                                                           prompts: list[list[int]]) -> None:
    """Real rank processes over gloo: EngineArgs carries --quantization, each rank cuts its shard of the
    dequantized FP8 weights (q_b_proj, o_proj, shared experts off the 128 grid) and experts whole."""
    from engine.runtime.colocated import EngineArgs
    from engine.runtime.launch import InstanceSpec
    from engine.runtime.offline import generate_on_ranks

    params = [SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)] * 2
    want = [o.token_ids for o in fp8_llm.generate(prompts[:2], params)]
    args = EngineArgs(model_dir=str(fp8_dir), page_size=16, num_pages=64, max_prefill_tokens=64, quantization="auto")
    outputs = generate_on_ranks(InstanceSpec(tp_size=2), args, prompts[:2], params, timeout_s=240)
    assert [o.token_ids for o in outputs] == want


def test_graph_safe_fp8_experts_equal_the_contiguous_fp8_experts() -> None:
    from engine.moe import moe_forward_static

    gen = torch.Generator().manual_seed(9)
    experts, hidden, inter, tokens, top_k = 8, 256, 192, 5, 2
    fp8 = Fp8Config()
    w13 = torch.empty(experts, 2 * inter, hidden, dtype=FP8_DTYPE)
    s13 = torch.empty(experts, 4, 2)
    for e in range(experts):
        for half in (0, 1):
            w = Fp8Weight.quantize(torch.randn(inter, hidden, generator=gen) / 16, fp8)
            w13[e, half * inter : (half + 1) * inter], s13[e, half * 2 : (half + 1) * 2] = w.q, w.scale
    w2, s2 = quantize_fp8_weight(torch.randn(experts, hidden, inter, generator=gen) / 14)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[0, 1] = -1
    weights = torch.rand(tokens, top_k, generator=gen)
    want = kernels.fp8_moe_forward(x, ids, weights, w13, s13, w2, s2)
    got = moe_forward_static(x, ids, weights, w13, w2, None, (s13, s2), fp8.block_size).tensor()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1
    # FP8 shared experts (wider than a routed one) riding in the routed launches: their output summed in.
    shared_inter = 320
    gate_up = [Fp8Weight.quantize(torch.randn(shared_inter, hidden, generator=gen) / 16, fp8) for _ in range(2)]
    down = Fp8Weight.quantize(torch.randn(hidden, shared_inter, generator=gen) / 18, fp8)
    shared = (torch.cat([gate_up[0].q, gate_up[1].q]), torch.cat([gate_up[0].scale, gate_up[1].scale]), down.q,
              down.scale)
    shared_out = kernels.fp8_gated_mlp(x, *shared, fp8.block_size)
    got = moe_forward_static(x, ids, weights, w13, w2, None, (s13, s2), fp8.block_size, shared=shared).tensor()
    torch.testing.assert_close(got, want + shared_out, rtol=1e-5, atol=1e-5)
    assert shared_out.abs().max() > 0.1


@pytest.mark.parametrize("packed", [False, True], ids=["per-expert", "packed-experts"])
def test_a_bf16_checkpoint_with_quantization_fp8_is_quantized_per_block_at_load(tmp_path: Path, packed: bool) -> None:
    from safetensors.torch import save_file

    model_dir = write_tiny_model(tmp_path, "v3", seed=1)
    raw = load_file(str(model_dir / "model.safetensors"))
    config = ModelConfig.from_dir(model_dir)
    if packed:  # transformers 5's save_pretrained layout
        for i in range(config.num_hidden_layers):
            if not config.is_moe_layer(i):
                continue
            p = f"model.layers.{i}.mlp.experts."
            experts = range(config.n_routed_experts)
            raw[p + "gate_up_proj"] = torch.stack([torch.cat([raw.pop(f"{p}{e}.gate_proj.weight"),
                                                              raw.pop(f"{p}{e}.up_proj.weight")]) for e in experts])
            raw[p + "down_proj"] = torch.stack([raw.pop(f"{p}{e}.down_proj.weight") for e in experts])
        save_file(raw, str(model_dir / "model.safetensors"))
    llm = LLM(str(model_dir), dtype="float32", page_size=16, num_pages=8, quantization="fp8")
    try:
        moe = llm.model.model.layers[1].mlp
        gate = raw["model.layers.1.mlp.experts.gate_up_proj"][3, : config.moe_intermediate_size] if packed else \
            raw["model.layers.1.mlp.experts.3.gate_proj.weight"]
        q, s = quantize_fp8_weight(gate)
        assert torch.equal(moe.w13[3, : config.moe_intermediate_size], kernels.fp8.dequantize_fp8_weight(q, s))
        o_proj = raw["model.layers.0.self_attn.o_proj.weight"]
        q, s = quantize_fp8_weight(o_proj)
        assert torch.equal(llm.model.model.layers[0].self_attn.o_proj.weight, kernels.fp8.dequantize_fp8_weight(q, s))
        assert not torch.equal(llm.model.model.layers[0].self_attn.o_proj.weight, o_proj)
        assert len(llm.generate([[4, 5, 6]], GREEDY)[0].token_ids) == NEW_TOKENS
    finally:
        llm.close()


def test_online_quantization_on_an_ep_rank_touches_only_its_own_experts(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from engine.quant import is_fp8_weight_name
    from engine.weights import checkpoint_tensor_shapes

    model_dir = write_tiny_model(tmp_path, "v3", seed=1)
    config = ModelConfig.from_dir(model_dir)
    model = DeepseekForCausalLM(config, ParallelContext(tp_rank=1, tp_size=2), dtype=torch.float32, fp8=Fp8Config())
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        load_model(model, model_dir)
    names = [n for n in checkpoint_tensor_shapes(config) if is_fp8_weight_name(n)]
    off_rank = [n for n in names if ".experts." in n and int(n.split(".experts.")[1].split(".")[0]) < 4]
    assert len(off_rank) == 24  # experts 0-3 of 2 MoE layers, 3 projections each
    assert any(f"quantized {len(names) - len(off_rank)} weights to FP8" in r.getMessage() for r in caplog.records)
    raw = load_file(str(model_dir / "model.safetensors"))
    want = quantize_fp8_weight(raw["model.layers.2.mlp.experts.6.down_proj.weight"])
    assert torch.equal(model.model.layers[2].mlp.w2[2].view(torch.uint8), want[0].view(torch.uint8))
