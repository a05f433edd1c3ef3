"""Transfer engines behind one interface: `make_engine("nixl" | "mooncake", name, ...)`.

The backends' native packages are imported only when an engine of that kind is made, so this package
imports cleanly where neither is installed; a missing backend raises `BackendUnavailable`.
"""

from __future__ import annotations

from typing import Any

from kvtransfer.engines.base import (
    BackendUnavailable,
    Descriptors,
    TransferEngine,
    TransferError,
    TransferHandle,
    TransferStatus,
)

ENGINE_NAMES = ("nixl", "mooncake")


def make_engine(kind: str, name: str, **options: Any) -> TransferEngine:
    """A new engine of `kind` called `name` (unique per rank). Options go to the engine's constructor."""
    if kind == "nixl":
        from kvtransfer.engines.nixl_engine import NixlEngine

        return NixlEngine(name, **options)
    if kind == "mooncake":
        from kvtransfer.engines.mooncake_engine import MooncakeEngine

        return MooncakeEngine(name, **options)
    raise ValueError(f"unknown transfer engine {kind!r}; choose one of {', '.join(ENGINE_NAMES)}")


__all__ = [
    "ENGINE_NAMES",
    "BackendUnavailable",
    "Descriptors",
    "TransferEngine",
    "TransferError",
    "TransferHandle",
    "TransferStatus",
    "make_engine",
]
