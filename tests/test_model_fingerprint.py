"""The model fingerprint prefill and decode compare: equal for one checkpoint, different for another
checkpoint of the same shapes, another dtype or other dummy weights."""

from __future__ import annotations

from pathlib import Path

from engine.fingerprint import model_fingerprint
from engine.tiny_model import write_tiny_model


def test_one_checkpoint_has_one_fingerprint_and_same_shaped_other_weights_another(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a", seed=1)
    a_copy = write_tiny_model(tmp_path / "a-copy", seed=1)
    b = write_tiny_model(tmp_path / "b", seed=2)  # V3 vs R1: every shape and config field the same
    fp = model_fingerprint(a, "auto", 0, "float32")
    assert fp == model_fingerprint(a_copy, "auto", 0, "float32")
    other = model_fingerprint(b, "auto", 0, "float32")
    assert other != fp and other.split()[0] == fp.split()[0]  # same config, other weights
    assert model_fingerprint(a, "auto", 0, "bfloat16") != fp
    assert model_fingerprint(a, "dummy", 0, "float32") != model_fingerprint(a, "dummy", 1, "float32")
