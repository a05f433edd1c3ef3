"""Checkpoint loading: HF safetensors (one file or sharded with an index) or seeded dummy weights.

Names are those of HF DeepSeek checkpoints. Routed experts are stored per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``; transformers' packed ``experts.gate_up_proj`` /
``experts.down_proj`` are accepted too) and packed here into ``w13`` / ``w2`` for the rank's own
expert range. Every parameter must be loaded exactly once; anything else is an error naming the tensor.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.model import DeepseekForCausalLM
from engine.moe import MoEBlock

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config.json describes."""


def checkpoint_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a full (unsharded, unquantized) HF checkpoint of this config, with its shape."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        a = p + "self_attn."
        if c.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (c.num_attention_heads * c.qk_head_dim, c.hidden_size)
        else:
            shapes[a + "q_a_proj.weight"] = (c.q_lora_rank, c.hidden_size)
            shapes[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (c.num_attention_heads * c.qk_head_dim, c.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c.kv_cache_dim, c.hidden_size)
        shapes[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                          c.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (c.hidden_size, c.num_attention_heads * c.v_head_dim)
        if c.attention_bias:
            if c.q_lora_rank is not None:
                shapes[a + "q_a_proj.bias"] = (c.q_lora_rank,)
            shapes[a + "kv_a_proj_with_mqa.bias"] = (c.kv_cache_dim,)
            shapes[a + "o_proj.bias"] = (c.hidden_size,)
        m = p + "mlp."
        if c.is_moe_layer(i):
            shapes[m + "gate.weight"] = (c.n_routed_experts, c.hidden_size)
            if c.topk_method == "noaux_tc":
                shapes[m + "gate.e_score_correction_bias"] = (c.n_routed_experts,)
            inter = c.moe_intermediate_size
            for e in range(c.n_routed_experts):
                shapes[f"{m}experts.{e}.gate_proj.weight"] = (inter, c.hidden_size)
                shapes[f"{m}experts.{e}.up_proj.weight"] = (inter, c.hidden_size)
                shapes[f"{m}experts.{e}.down_proj.weight"] = (c.hidden_size, inter)
            if c.n_shared_experts:
                shared = inter * c.n_shared_experts
                shapes[m + "shared_experts.gate_proj.weight"] = (shared, c.hidden_size)
                shapes[m + "shared_experts.up_proj.weight"] = (shared, c.hidden_size)
                shapes[m + "shared_experts.down_proj.weight"] = (c.hidden_size, shared)
        else:
            shapes[m + "gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
            shapes[m + "up_proj.weight"] = (c.intermediate_size, c.hidden_size)
            shapes[m + "down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def dummy_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded random tensor for checkpoint entry ``name`` that keeps activations O(1).

    Norm weights are 1, biases and the router correction bias 0, embeddings N(0, 1), every matrix
    N(0, 1/fan_in). The seed mixes in the name, so a tensor does not depend on load order or rank.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    std = 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5
    out = torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * std
    return out.to(dtype)


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, file by file."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    for i, path in enumerate(files):
        if not path.is_file():
            raise CheckpointError(f"shard {path.name} named in the index is missing from {model_dir}")
        if len(files) > 1:
            log.info("loading shard %d/%d: %s", i + 1, len(files), path.name)
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def iter_dummy(config: ModelConfig, seed: int, device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in checkpoint_tensor_shapes(config).items():
        yield name, dummy_tensor(name, shape, seed, torch.float32, device)


def load_weights(model: DeepseekForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model's (possibly sharded) parameters; validate completeness."""
    cfg = model.config
    expected = checkpoint_tensor_shapes(cfg)
    loaded: set[str] = set()
    unknown: list[str] = []
    started, count = time.monotonic(), 0
    with torch.no_grad():
        for name, tensor in tensors:
            count += 1
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
                continue  # multi-token-prediction layers: not used for generation
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if _load_experts(model, name, tensor, loaded):
                continue
            if name not in expected:
                unknown.append(name)
                continue
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {expected[name]}"
                )
            module_name, _, _ = name.rpartition(".")
            if name == "lm_head.weight" or name.endswith("mlp.gate.weight") or name.endswith("correction_bias"):
                _load_plain(model, name, tensor)
            else:
                model.get_submodule(module_name).load_full(name, tensor.to(model.device))
            loaded.add(name)
            if name == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
                model.lm_head.load_full("lm_head.weight", tensor.to(model.device))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise CheckpointError(f"checkpoint has tensors the model does not know: {shown}")
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    log.info("loaded %d tensors in %.1fs", count, time.monotonic() - started)


def _load_plain(model: DeepseekForCausalLM, name: str, tensor: torch.Tensor) -> None:
    if name == "lm_head.weight":
        model.lm_head.load_full(name, tensor.to(model.device))
        return
    gate = model.get_submodule(name.rpartition(".")[0])
    target = getattr(gate, name.rpartition(".")[2])
    target.copy_(tensor.to(device=model.device, dtype=torch.float32))


def _load_experts(model: DeepseekForCausalLM, name: str, tensor: torch.Tensor, loaded: set[str]) -> bool:
    """Pack one routed-expert tensor into its layer's w13/w2 if this rank holds that expert."""
    cfg = model.config
    inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
    match = _EXPERT.match(name)
    if match:
        layer_id, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
        block = _moe_block(model, layer_id, name)
        if expert >= cfg.n_routed_experts:
            raise CheckpointError(f"checkpoint tensor {name!r} names expert {expert} of {cfg.n_routed_experts}")
        want = (hidden, inter) if proj == "down_proj" else (inter, hidden)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {want}")
        loaded.add(name)
        if not block.expert_start <= expert < block.expert_end:
            return True
        local = expert - block.expert_start
        src = tensor.to(model.device)
        if proj == "gate_proj":
            block.w13[local, :inter].copy_(src)
        elif proj == "up_proj":
            block.w13[local, inter:].copy_(src)
        else:
            block.w2[local].copy_(src)
        return True
    match = _PACKED_EXPERTS.match(name)
    if match:
        layer_id, proj = int(match.group(1)), match.group(2)
        block = _moe_block(model, layer_id, name)
        e = cfg.n_routed_experts
        want = (e, 2 * inter, hidden) if proj == "gate_up_proj" else (e, hidden, inter)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {want}")
        target = block.w13 if proj == "gate_up_proj" else block.w2
        target.copy_(tensor[block.expert_start : block.expert_end].to(model.device))
        names = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
        loaded.update(f"model.layers.{layer_id}.mlp.experts.{x}.{n}.weight" for x in range(e) for n in names)
        return True
    return False


def _moe_block(model: DeepseekForCausalLM, layer_id: int, name: str) -> MoEBlock:
    if layer_id >= model.config.num_hidden_layers or not model.config.is_moe_layer(layer_id):
        raise CheckpointError(f"checkpoint tensor {name!r} is an expert of layer {layer_id}, which is not MoE")
    block = model.model.layers[layer_id].mlp
    assert isinstance(block, MoEBlock)
    return block


def load_model(model: DeepseekForCausalLM, model_dir: str | Path | None, load_format: str = "auto",
               seed: int = 0) -> None:
    """Fill ``model`` from ``model_dir`` ("auto": safetensors) or from seeded random weights ("dummy")."""
    if load_format == "dummy":
        load_weights(model, iter_dummy(model.config, seed, model.device))
    elif load_format in ("auto", "safetensors"):
        if model_dir is None:
            raise CheckpointError("load_format 'auto' needs a model directory")
        load_weights(model, iter_safetensors(model_dir))
    else:
        raise ValueError(f"unknown load_format {load_format!r} (auto, safetensors or dummy)")
