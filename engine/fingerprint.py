"""The identity of the model a worker serves, which prefill and decode compare before any KV moves.

Two instances whose KV pools have the same shape can still serve different models (DeepSeek-V3 and R1 share
every shape): KV computed by one is garbage to the other, and nothing would fail loudly. So each prefill
rank registers a fingerprint with its bootstrap service and each decode rank sends its own with its
first transfer request; either side refuses a peer whose fingerprint differs, naming the part that does
(vLLM's `compute_nixl_compatibility_hash` is the model). The page layout, KV dtype and wire version are
compared by `kvtransfer` already; this covers what only the engine knows.

The fingerprint is readable, `part=value` items joined by spaces, so a refusal can say which part differs
(`kvtransfer.rooms.model_mismatch`, which treats it as opaque otherwise):
    config=<hash of config.json>  weights=<hash of the checkpoint's tensor index and first bytes>|dummy-<seed>
    dtype=<model dtype>
Quantization is left out: one checkpoint served FP8 on one side and dequantized on the other is the same
model, off by rounding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Bytes of tensor data read per checkpoint file: enough to tell two trainings of one architecture apart
# (every shard's first tensor differs), cheap even for DeepSeek-V3's 163 shards.
_DATA_BYTES = 1 << 16


def _config_hash(model_dir: Path) -> str:
    raw = json.loads((model_dir / "config.json").read_text())
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def _weights_hash(model_dir: Path) -> str:
    """Each safetensors file's name, size, header (tensor names, shapes, dtypes, offsets) and first data
    bytes: a checkpoint's identity without reading it whole."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            head_len = int.from_bytes(f.read(8), "little")
            digest.update(path.name.encode() + path.stat().st_size.to_bytes(8, "little"))
            digest.update(f.read(min(head_len, 1 << 26)))
            digest.update(f.read(_DATA_BYTES))
    return digest.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path, load_format: str, seed: int, dtype: str) -> str:
    """The fingerprint of a model loaded from `model_dir` (see the module docstring); `dtype` is the model
    dtype in effect on this rank, e.g. "bfloat16"."""
    model_dir = Path(model_dir)
    weights = f"dummy-{seed}" if load_format == "dummy" else _weights_hash(model_dir)
    return f"config={_config_hash(model_dir)} weights={weights} dtype={dtype}"
