"""Bad input fails with a message naming the problem and leaves nothing allocated or queued."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_engine import idle_llm, tiny_v3_dir

from engine.config import ConfigError, ModelConfig
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.tiny_model import tiny_config
from engine.weights import CheckpointError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def llm(tiny_dir: Path) -> Iterator[LLM]:
    yield from idle_llm(tiny_dir, num_pages=24)


def _copy_with(tiny_dir: Path, dest: Path, config: dict | None = None,
               tensors: dict[str, torch.Tensor] | None = None, drop: str | None = None) -> Path:
    dest.mkdir()
    raw = json.loads((tiny_dir / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config if config is not None else raw))
    weights = load_file(str(tiny_dir / "model.safetensors"))
    weights.update(tensors or {})
    if drop:
        del weights[drop]
    save_file(weights, str(dest / "model.safetensors"))
    return dest


def test_config_missing_fields_are_all_named() -> None:
    raw = tiny_config("v3")
    del raw["kv_lora_rank"], raw["moe_intermediate_size"]
    with pytest.raises(ConfigError, match="missing required field.*kv_lora_rank, moe_intermediate_size"):
        ModelConfig.from_dict(raw)


def test_missing_config_field_fails_at_load_with_its_name(tiny_dir: Path, tmp_path: Path) -> None:
    raw = tiny_config("v3")
    del raw["qk_rope_head_dim"]
    bad = _copy_with(tiny_dir, tmp_path / "m", config=raw)
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        LLM(str(bad))


def test_checkpoint_shape_mismatch_names_the_tensor_and_both_shapes(tiny_dir: Path, tmp_path: Path) -> None:
    bad = _copy_with(tiny_dir, tmp_path / "m", tensors={"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(128, 31)})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has shape "
                                              r"\(128, 31\), model expects \(128, 32\)"):
        LLM(str(bad))


def test_expert_shape_mismatch_names_the_expert_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    bad = _copy_with(tiny_dir, tmp_path / "m", tensors={name: torch.zeros(64, 33)})
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}' has shape \(64, 33\)"):
        LLM(str(bad))


def test_missing_checkpoint_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    bad = _copy_with(tiny_dir, tmp_path / "m", drop="model.layers.1.mlp.gate.e_score_correction_bias")
    with pytest.raises(CheckpointError, match="missing 1 tensor.*layers.1.mlp.gate.e_score_correction_bias"):
        LLM(str(bad))


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([[]], "prompt 0: prompt is empty"),
        ([""], "prompt 0: prompt is empty"),
        ([[5, 6], [7, 320]], "prompt 1: prompt token id 320 is outside the vocabulary \\[0, 320\\)"),
        ([[-1]], "token id -1 is outside"),
    ],
)
def test_bad_prompts_are_refused_before_any_work(llm: LLM, prompts: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, SamplingParams(max_new_tokens=4))
    assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
    assert not llm.scheduler.has_work()


def test_a_prompt_longer_than_the_model_context_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="at most 511"):
        llm.generate([[5] * 512], SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -2}, "top_k must be"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_request_needing_more_pages_than_the_pool_has_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="needs 25 KV pages but the pool has 24"):
        llm.generate([[5] * 380], SamplingParams(max_new_tokens=20))
    assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
