"""KV transfer between prefill and decode instances: bootstrap, rank mapping, engines, per-room state machines.

Names are loaded on first use (PEP 562) so that `import kvtransfer.protocol` — all the router needs — stays
cheap and pulls in neither zmq, aiohttp, numpy nor a transfer backend.

Prefill side: `KVSendManager` -> `KVSender` (send, send_aux, poll, abort).
Decode side: `KVReceiveManager` -> `KVReceiver` (init, poll, abort, aux).
Shared: `BootstrapService`, `BootstrapClient`, `ParallelLayout`, `RankInfo`, `map_ranks`, `KVPoll`, `KVTimeouts`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuxLayout": "kvtransfer.layout",
    "PageLayout": "kvtransfer.layout",
    "AuxRecord": "kvtransfer.auxdata",
    "BootstrapClient": "kvtransfer.bootstrap_client",
    "BootstrapService": "kvtransfer.bootstrap",
    "KVBootstrapError": "kvtransfer.state",
    "KVMappingError": "kvtransfer.state",
    "KVPoll": "kvtransfer.state",
    "KVProtocolError": "kvtransfer.state",
    "KVTimeouts": "kvtransfer.state",
    "KVTransferError": "kvtransfer.state",
    "ParallelLayout": "kvtransfer.mapping",
    "RankSources": "kvtransfer.mapping",
    "map_ranks": "kvtransfer.mapping",
    "RankInfo": "kvtransfer.rooms",
    "KVReceiveManager": "kvtransfer.receive_manager",
    "KVReceiver": "kvtransfer.receiver",
    "KVSendManager": "kvtransfer.send_manager",
    "KVSender": "kvtransfer.sender",
    "TransferEngine": "kvtransfer.engines",
    "make_engine": "kvtransfer.engines",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtransfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
