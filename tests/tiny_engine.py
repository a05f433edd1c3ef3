"""What the engine tests share: the tiny V3 checkpoint they load and an LLM that must end idle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.tiny_model import write_tiny_model


def tiny_v3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeepSeek-V3 checkpoint (seed 0) in a fresh temporary folder."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "v3", seed=0)


def idle_llm(model_dir: Path, num_pages: int) -> Iterator[LLM]:
    """For a module fixture: an LLM on 16-token pages; after the module its pool must be back at idle."""
    engine = LLM(str(model_dir), page_size=16, num_pages=num_pages)
    try:
        yield engine
        assert engine.kv_pool.available_pages == engine.kv_pool.num_pages
    finally:
        engine.close()
