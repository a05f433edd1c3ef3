"""Checkpoint loading: HF safetensors (one file or sharded with an index) or seeded dummy weights.

Names are those of HF DeepSeek checkpoints. Routed experts are stored per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``; transformers' packed ``experts.gate_up_proj`` /
``experts.down_proj`` are accepted too) and packed here into ``w13`` / ``w2`` for the rank's own
expert range. Every parameter must be loaded exactly once; anything else is an error naming the tensor.

FP8 checkpoints (DeepSeek-V3/R1: ``X.weight`` e4m3 + ``X.weight_scale_inv`` float32 per 128x128 block)
are paired tensor by tensor (``pair_fp8``) into ``engine.quant.Fp8Weight``s; a layer that keeps FP8
takes the weight and scales as they are (cut for its shard), any other dequantizes at load. With FP8
in effect for a bf16 checkpoint or dummy weights, the linear weights are quantized at load first, so
both paths compute with the same FP8-representable values. Layers past ``num_hidden_layers`` (V3's
multi-token-prediction layer 61) are skipped, with a log line.
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

from engine.config import Fp8Config, ModelConfig
from engine.model import DeepseekForCausalLM
from engine.moe import MoEBlock
from engine.quant import SCALE_SUFFIX, Fp8Weight, is_fp8_weight_name
from kernels.fp8 import FP8_DTYPE

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


Tensor = torch.Tensor | Fp8Weight


def iter_dummy(config: ModelConfig, seed: int, device: torch.device | str,
               fp8: Fp8Config | None = None) -> Iterator[tuple[str, Tensor]]:
    """Seeded random weights; with ``fp8``, the linear weights as FP8 + block scales of their shapes."""
    for name, shape in checkpoint_tensor_shapes(config).items():
        tensor = dummy_tensor(name, shape, seed, torch.float32, device)
        yield name, (Fp8Weight.quantize(tensor, fp8) if fp8 is not None and is_fp8_weight_name(name) else tensor)


def pair_fp8(tensors: Iterable[tuple[str, torch.Tensor]], fp8: Fp8Config | None) -> Iterator[tuple[str, Tensor]]:
    """Joins each float8 ``X`` with its ``X_scale_inv`` (in whichever order, even across shards).

    ``fp8`` is the checkpoint's own scheme (config.json); float8 tensors without one are refused.
    """
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith(SCALE_SUFFIX):
            base = name.removesuffix(SCALE_SUFFIX)
            if base in weights:
                yield base, _fp8_weight(base, weights.pop(base), tensor, fp8)
            else:
                scales[base] = tensor
        elif tensor.dtype in (FP8_DTYPE, torch.float8_e5m2):
            if name in scales:
                yield name, _fp8_weight(name, tensor, scales.pop(name), fp8)
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights:
        raise CheckpointError(f"FP8 tensor(s) without a {SCALE_SUFFIX} scale: {', '.join(sorted(weights)[:5])}")
    if scales:
        raise CheckpointError(f"{SCALE_SUFFIX} scale(s) without their FP8 weight: {', '.join(sorted(scales)[:5])}")


def _fp8_weight(name: str, q: torch.Tensor, scale: torch.Tensor, fp8: Fp8Config | None) -> Fp8Weight:
    if fp8 is None:
        raise CheckpointError(f"checkpoint tensor {name!r} is {q.dtype} but config.json has no quantization_config")
    weight = Fp8Weight(q, scale.float(), fp8.block_size)
    try:
        weight.validate(name)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return weight


class _Fp8Report:
    """What the loader did with FP8 weights, logged once at the end (not one line per tensor)."""

    def __init__(self) -> None:
        self.kept = 0
        self.dequantized = 0
        self.quantized = 0
        self.fallbacks: dict[tuple[str, str], int] = {}
        self.skipped: dict[int, int] = {}

    def log(self, model: DeepseekForCausalLM) -> None:
        if self.skipped:
            layers = ", ".join(str(i) for i in sorted(self.skipped))
            log.info("skipped %d tensors of layer(s) %s: multi-token-prediction (MTP) layers past "
                     "num_hidden_layers=%d are not used for generation", sum(self.skipped.values()), layers,
                     model.config.num_hidden_layers)
        if self.quantized:
            log.info("quantized %d weights to FP8 at load (128x128 blocks of the bf16/dummy tensors)", self.quantized)
        dtype = str(model.dtype).removeprefix("torch.")
        if self.kept:
            log.info("FP8: %d weights kept in FP8 on %s", self.kept, model.device)
        for (suffix, reason), n in sorted(self.fallbacks.items()):
            log.info("FP8: %s dequantized at load to %s on %d layer(s): %s", suffix, dtype, n, reason)
        plain = self.dequantized - sum(self.fallbacks.values())
        if plain:
            log.info("FP8: %d weights dequantized at load to %s", plain, dtype)


def load_weights(model: DeepseekForCausalLM, tensors: Iterable[tuple[str, Tensor]],
                 fp8: Fp8Config | None = None) -> None:
    """Copy checkpoint tensors into the model's (possibly sharded) parameters; validate completeness.

    ``fp8``: FP8 in effect (``QuantPlan.in_effect``): plain linear weights are quantized first.
    """
    cfg = model.config
    fp8 = fp8 or model.fp8
    expected = checkpoint_tensor_shapes(cfg)
    loaded: set[str] = set()
    unknown: list[str] = []
    report = _Fp8Report()
    started, count = time.monotonic(), 0
    with torch.no_grad():
        for name, tensor in tensors:
            count += 1
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
                index = int(layer.group(1))
                report.skipped[index] = report.skipped.get(index, 0) + 1
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if (fp8 is not None and not isinstance(tensor, Fp8Weight) and is_fp8_weight_name(name)
                    and not _off_rank_expert(model, name)):
                tensor = Fp8Weight.quantize(tensor.to(model.device), fp8)
                report.quantized += 1
            if _load_experts(model, name, tensor, loaded, report, fp8):
                continue
            if isinstance(tensor, Fp8Weight) and not is_fp8_weight_name(name):
                raise CheckpointError(f"checkpoint tensor {name!r} is FP8; only linear weights of the decoder "
                                      "layers may be")
            if name not in expected:
                unknown.append(name)
                continue
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {expected[name]}"
                )
            module_name, _, _ = name.rpartition(".")
            if isinstance(tensor, Fp8Weight):
                module = model.get_submodule(module_name)
                _note_fp8(report, name, getattr(module, "fp8", None) is not None, getattr(module, "fp8_fallback", None))
                module.load_full(name, tensor.to(model.device))
            elif name == "lm_head.weight" or name.endswith("mlp.gate.weight") or name.endswith("correction_bias"):
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
    report.log(model)
    log.info("loaded %d tensors in %.1fs", count, time.monotonic() - started)


def _note_fp8(report: _Fp8Report, name: str, kept: bool, fallback: str | None) -> None:
    if kept:
        report.kept += 1
        return
    report.dequantized += 1
    if fallback:
        suffix = re.sub(r"^model\.layers\.\d+\.", "", name)
        report.fallbacks[(suffix, fallback)] = report.fallbacks.get((suffix, fallback), 0) + 1


def _load_plain(model: DeepseekForCausalLM, name: str, tensor: torch.Tensor) -> None:
    if name == "lm_head.weight":
        model.lm_head.load_full(name, tensor.to(model.device))
        return
    gate = model.get_submodule(name.rpartition(".")[0])
    target = getattr(gate, name.rpartition(".")[2])
    target.copy_(tensor.to(device=model.device, dtype=torch.float32))


def _load_experts(model: DeepseekForCausalLM, name: str, tensor: Tensor, loaded: set[str],
                  report: _Fp8Report, fp8: Fp8Config | None) -> bool:
    """Pack routed-expert tensors into their layer's w13/w2 (and scales) for the experts this rank holds."""
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
        slots = block.slots_of(expert)
        if slots:
            if isinstance(tensor, Fp8Weight):
                _note_fp8(report, name, block.fp8 is not None, None)
            # Only this rank's experts travel to the device (the others are dropped where they were read);
            # an expert with EPLB replicas on this rank fills each of its slots.
            on_device = tensor.to(model.device)
            for slot in slots:
                _load_one_expert(block, slot, proj, on_device)
        return True
    match = _PACKED_EXPERTS.match(name)
    if match:
        layer_id, packed = int(match.group(1)), match.group(2)
        block = _moe_block(model, layer_id, name)
        if isinstance(tensor, Fp8Weight):
            raise CheckpointError(f"checkpoint tensor {name!r}: packed FP8 experts are not supported "
                                  "(DeepSeek-V3 stores FP8 experts one by one)")
        e = cfg.n_routed_experts
        want = (e, 2 * inter, hidden) if packed == "gate_up_proj" else (e, hidden, inter)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {want}")
        names = ("gate_proj", "up_proj") if packed == "gate_up_proj" else ("down_proj",)
        loaded.update(f"model.layers.{layer_id}.mlp.experts.{x}.{n}.weight" for x in range(e) for n in names)
        if fp8 is None:
            target = block.w13 if packed == "gate_up_proj" else block.w2
            target.copy_(tensor[block.local_experts].to(model.device))
            return True
        # FP8: each expert's gate, up and down are quantized as the separate tensors V3 would ship.
        for local, expert in enumerate(block.local_experts):
            pieces = tensor[expert].chunk(2, dim=0) if packed == "gate_up_proj" else (tensor[expert],)
            for proj, piece in zip(names, pieces, strict=True):
                q = Fp8Weight.quantize(piece.to(model.device), fp8)
                report.quantized += 1
                _note_fp8(report, name, block.fp8 is not None, None)
                _load_one_expert(block, local, proj, q)
        return True
    return False


def _off_rank_expert(model: DeepseekForCausalLM, name: str) -> bool:
    """A routed expert another EP rank holds (its tensor is only counted, never quantized or copied here)."""
    match = _EXPERT.match(name)
    if not match or int(match.group(1)) >= model.config.num_hidden_layers:
        return False
    block = model.model.layers[int(match.group(1))].mlp
    return isinstance(block, MoEBlock) and not block.slots_of(int(match.group(2)))


def _load_one_expert(block: MoEBlock, local: int, proj: str, tensor: Tensor) -> None:
    inter = block.w2.shape[2]
    if block.fp8 is None:
        src = tensor.dequantize() if isinstance(tensor, Fp8Weight) else tensor
        if proj == "gate_proj":
            block.w13[local, :inter].copy_(src)
        elif proj == "up_proj":
            block.w13[local, inter:].copy_(src)
        else:
            block.w2[local].copy_(src)
        return
    if not isinstance(tensor, Fp8Weight):
        raise CheckpointError("an FP8 model got a plain expert weight (FP8 must be in effect at load)")
    if tensor.block_size != block.fp8.block_size:
        raise CheckpointError(f"expert blocks {tensor.block_size}, model expects {block.fp8.block_size}")
    assert block.w13_scale_inv is not None and block.w2_scale_inv is not None
    half = block.w13_scale_inv.shape[1] // 2
    if proj == "gate_proj":
        block.w13[local, :inter].copy_(tensor.q)
        block.w13_scale_inv[local, :half].copy_(tensor.scale)
    elif proj == "up_proj":
        block.w13[local, inter:].copy_(tensor.q)
        block.w13_scale_inv[local, half:].copy_(tensor.scale)
    else:
        block.w2[local].copy_(tensor.q)
        block.w2_scale_inv[local].copy_(tensor.scale)


def _moe_block(model: DeepseekForCausalLM, layer_id: int, name: str) -> MoEBlock:
    if layer_id >= model.config.num_hidden_layers or not model.config.is_moe_layer(layer_id):
        raise CheckpointError(f"checkpoint tensor {name!r} is an expert of layer {layer_id}, which is not MoE")
    block = model.model.layers[layer_id].mlp
    assert isinstance(block, MoEBlock)
    return block


def load_model(model: DeepseekForCausalLM, model_dir: str | Path | None, load_format: str = "auto",
               seed: int = 0, fp8: Fp8Config | None = None) -> None:
    """Fill ``model`` from ``model_dir`` ("auto": safetensors) or from seeded random weights ("dummy").

    ``fp8``: FP8 in effect (``engine.quant.QuantPlan.in_effect``); must be set when the model keeps FP8.
    Dummy weights are then FP8 + block scales of the checkpoint's shapes.
    """
    fp8 = fp8 or model.fp8
    if load_format == "dummy":
        load_weights(model, iter_dummy(model.config, seed, model.device, fp8), fp8)
    elif load_format in ("auto", "safetensors"):
        if model_dir is None:
            raise CheckpointError("load_format 'auto' needs a model directory")
        load_weights(model, pair_fp8(iter_safetensors(model_dir), model.config.quantization), fp8)
    else:
        raise ValueError(f"unknown load_format {load_format!r} (auto, safetensors or dummy)")
