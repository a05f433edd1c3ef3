"""Write a tiny random DeepSeek checkpoint in HF format (config.json, safetensors, tokenizer.json).

    python -m engine.tiny_model --out DIR [--variant v3|v2-lite|v2-group] [--seed N] [--shards N]
                                [--train-steps N]

No transformers needed (unless ``--train-steps``: ``engine.tiny_train``): tensors are named and shaped as HF's ``save_pretrained`` writes them, filled
by ``engine.weights.dummy_tensor`` (activations O(1)) with norm weights and the V3 router's correction
bias perturbed, so a mix-up of any of them changes the output. Variants:
  v3       q-LoRA, YaRN (mscale != mscale_all_dim), sigmoid router + correction bias, group-limited
           top-k, first_k_dense_replace=1, shared experts
  v2-lite  no q-LoRA, YaRN, softmax router, greedy top-k, 2 shared experts
  v2-group like v2-lite with group_limited_greedy routing and plain (non-YaRN) rope
  v3-eplb  v3 with 14 experts in 2 groups, one group per token (EPLB: 14 + 2 redundant over 4 ranks)
  v3-fp8   v3 at dims that span several 128x128 blocks (with partial edge blocks), saved as DeepSeek-V3
           ships: linear weights float8_e4m3fn + ``weight_scale_inv`` per block, quantization_config,
           and one multi-token-prediction layer (index num_hidden_layers) that the engine must skip
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.quant import SCALE_SUFFIX, Fp8Weight, is_fp8_weight_name
from engine.tokenizer import write_byte_level_tokenizer
from engine.weights import checkpoint_tensor_shapes, dummy_tensor

_COMMON: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
    "rope_theta": 10000.0,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "v3": {
        **_COMMON,
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "q_lora_rank": 48,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
        "num_nextn_predict_layers": 0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    },
    "v2-lite": {
        **_COMMON,
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "n_shared_experts": 2,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
}
VARIANTS["v2-group"] = {**VARIANTS["v2-lite"], "n_group": 4, "topk_group": 2,
                        "topk_method": "group_limited_greedy", "rope_scaling": None}
# EPLB tests: 14 experts in 2 groups (one group per token), so 14 + 2 redundant slots split over 4 ranks
# (and 14 alone over 2).
VARIANTS["v3-eplb"] = {**VARIANTS["v3"], "n_routed_experts": 14, "n_group": 2, "topk_group": 1}
# Rows/cols: hidden 256 (2 blocks), dense 512 (4; 2 per rank at tp2), experts 192 (1.5: a partial block),
# q_lora 192, kv_a 144 (128 + rope 16), q_b 192, o_proj in 128: at tp2 q_b / o_proj / shared-expert
# shards are 96 / 64 / 96 wide, off the 128 grid (dequantized at load), the dense MLP's 256 on it.
VARIANTS["v3-fp8"] = {
    **VARIANTS["v3"], "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 192,
    "q_lora_rank": 192, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def tiny_config(variant: str) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    return json.loads(json.dumps(VARIANTS[variant]))


def tiny_tensors(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = dummy_tensor(name, shape, seed)
    return tensors


def mtp_tensors(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A few tensors of DeepSeek-V3's multi-token-prediction layer (index num_hidden_layers), unquantized."""
    p, d = f"model.layers.{config.num_hidden_layers}.", config.hidden_size
    shapes = {"embed_tokens.weight": (config.vocab_size, d), "enorm.weight": (d,), "hnorm.weight": (d,),
              "eh_proj.weight": (d, 2 * d), "input_layernorm.weight": (d,),
              "self_attn.kv_a_proj_with_mqa.weight": (config.kv_cache_dim, d), "shared_head.norm.weight": (d,),
              "shared_head.head.weight": (config.vocab_size, d)}
    return {p + n: dummy_tensor(p + n, shape, seed) for n, shape in shapes.items()}


def fp8_checkpoint(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """V3's on-disk form: each linear weight as float8_e4m3fn plus its float32 ``weight_scale_inv``, the
    rest (embeddings, norms, router, LM head) in bfloat16."""
    assert config.quantization is not None
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_fp8_weight_name(name) or name.endswith("eh_proj.weight"):
            w = Fp8Weight.quantize(tensor, config.quantization)
            out[name], out[name + SCALE_SUFFIX] = w.q, w.scale
        else:
            out[name] = tensor.to(torch.bfloat16)
    return out


def write_tiny_model(out: str | Path, variant: str = "v3", seed: int = 0, shards: int = 1,
                     train_steps: int = 0) -> Path:
    """The tiny model of ``variant`` in its checkpoint format, random (``train_steps`` 0) or trained on a
    synthetic chain (``engine.tiny_train``: decisive greedy margins, for comparisons under quantization)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(variant)
    config = ModelConfig.from_dict(raw)
    if train_steps > 0:
        from engine.tiny_train import trained_tensors

        tensors = trained_tensors(raw, seed, train_steps)
        expected = checkpoint_tensor_shapes(config)
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got.keys() != expected.keys() or any(got[n] != tuple(expected[n]) for n in expected):
            raise RuntimeError(f"trained tensors do not match the checkpoint's: {sorted(got.keys() ^ expected.keys())[:4]}")
    else:
        tensors = tiny_tensors(config, seed)
    if raw.get("num_nextn_predict_layers"):
        tensors.update(mtp_tensors(config, seed))
    if config.quantization is not None:
        tensors = fp8_checkpoint(tensors, config)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_byte_level_tokenizer(out / "tokenizer.json")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.tiny_model", description="write a tiny DeepSeek model")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--variant", default="v3", choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train on a synthetic chain first (engine.tiny_train; needs transformers)")
    args = parser.parse_args(argv)
    path = write_tiny_model(args.out, args.variant, args.seed, args.shards, args.train_steps)
    print(f"wrote {args.variant} tiny model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
