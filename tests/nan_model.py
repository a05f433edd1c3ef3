"""A tiny model whose embedding row for one token is NaN: a prompt holding that token runs a forward whose hidden
states, and so its logits, are NaN, while every other sequence of the same batch stays finite (the tests of a
request whose forward breaks failing alone)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from engine.tiny_model import write_tiny_model

POISON = 299  # the token whose embedding row is NaN


def write_nan_model(out: Path) -> Path:
    """The tiny model under ``out`` with ``POISON``'s embedding row NaN."""
    out = write_tiny_model(out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.embed_tokens.weight"][POISON] = float("nan")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
