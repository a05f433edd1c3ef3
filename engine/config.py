"""Model configuration of the DeepSeek-V2/V3 family, read from a HuggingFace ``config.json``.

Accepts both spellings of the rope settings: the original checkpoints' ``rope_theta`` + ``rope_scaling``
and transformers 5's ``rope_parameters``. Every missing field is named in one error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The checkpoint's config.json cannot describe a model this engine runs."""


_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
_REQUIRED_MOE_FIELDS = ("num_experts_per_tok", "moe_intermediate_size")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the rope part of q/k (``qk_rope_head_dim`` values), with optional YaRN."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Fp8Config:
    """DeepSeek-V3's FP8 scheme: e4m3 weights with one float32 scale per ``block_n x block_k`` block
    (``*.weight_scale_inv``), activations quantized dynamically per ``1 x block_k`` token group."""

    block_n: int = 128
    block_k: int = 128

    @property
    def block_size(self) -> tuple[int, int]:
        return self.block_n, self.block_k


def parse_quantization_config(raw: Any) -> Fp8Config | None:
    """config.json's ``quantization_config``; anything but V3's block FP8 is refused, naming the field."""
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("quantization_config must be an object")
    method = str(raw.get("quant_method", ""))
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (only DeepSeek-V3's 'fp8')")
    fmt = str(raw.get("fmt", "e4m3"))
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    scheme = str(raw.get("activation_scheme", "dynamic"))
    if scheme != "dynamic":
        raise ConfigError(f"quantization_config.activation_scheme {scheme!r} is not supported (only 'dynamic')")
    block = raw.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError("quantization_config.weight_block_size must be two positive integers (per-tensor FP8 "
                          f"is not supported), got {block!r}")
    if block[1] & (block[1] - 1) or block[1] < 16:
        raise ConfigError(f"quantization_config.weight_block_size K block {block[1]} must be a power of two >= 16")
    return Fp8Config(block_n=block[0], block_k=block[1])


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine reads from config.json, validated once."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    attention_bias: bool = False
    # MoE; n_routed_experts == 0 means every layer is dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3)
    topk_method: str = "greedy"  # "greedy", "group_limited_greedy" (V2) or "noaux_tc" (V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    quantization: Fp8Config | None = None  # the checkpoint's own (config.json quantization_config)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values per token per layer in the KV pool: the normalised latent, then the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim) squared."""
        scale = self.qk_head_dim**-0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        missing = [name for name in _REQUIRED_FIELDS if raw.get(name) is None]
        n_routed = int(raw.get("n_routed_experts") or 0)
        if n_routed:
            missing += [name for name in _REQUIRED_MOE_FIELDS if raw.get(name) is None]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        model_type = str(raw.get("model_type", "deepseek_v3"))
        is_v3 = model_type.startswith("deepseek_v3")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        cfg = cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            kv_lora_rank=int(raw["kv_lora_rank"]),
            q_lora_rank=None if raw.get("q_lora_rank") is None else int(raw["q_lora_rank"]),
            qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
            qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
            v_head_dim=int(raw["v_head_dim"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope=_parse_rope(raw),
            # The original V2 code always interleaves; transformers' V3 makes it a flag (default on).
            rope_interleave=bool(raw.get("rope_interleave", True)),
            attention_bias=bool(raw.get("attention_bias", False)),
            n_routed_experts=n_routed,
            n_shared_experts=int(raw.get("n_shared_experts") or 0),
            num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
            first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
            scoring_func=str(raw.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")),
            topk_method=str(raw.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")),
            n_group=int(raw.get("n_group") or 1),
            topk_group=int(raw.get("topk_group") or 1),
            norm_topk_prob=bool(raw.get("norm_topk_prob", is_v3)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            quantization=parse_quantization_config(raw.get("quantization_config")),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank")
        bad = [name for name in positive if getattr(self, name) <= 0]
        if bad:
            raise ConfigError(f"config fields must be positive: {', '.join(bad)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"unknown scoring_func {self.scoring_func!r} (expected softmax or sigmoid)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"unknown topk_method {self.topk_method!r}")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(f"num_experts_per_tok must be in [1, {self.n_routed_experts}]")
            if self.topk_group > self.n_group:
                raise ConfigError(f"topk_group {self.topk_group} > n_group {self.n_group}")
        if self.rope.rope_type not in ("default", "yarn"):
            raise ConfigError(f"unsupported rope type {self.rope.rope_type!r} (default or yarn)")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "yarn" and params.get("factor") is None:
        raise ConfigError("rope scaling 'yarn' needs a 'factor'")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 4096))
        ),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        truncate=bool(params.get("truncate", True)),
    )
