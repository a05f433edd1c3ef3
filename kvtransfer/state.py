"""The state a room reaches on either side, the errors of the control plane, and its timeouts.

Both `KVSender.poll()` (prefill) and `KVReceiver.poll()` (decode) answer a `KVPoll`; the worker's scheduler
acts on it and on nothing else: keep the pages while it is not terminal, free them once it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class KVPoll(enum.IntEnum):
    """Bootstrapping -> WaitingForInput -> Transferring -> Success | Failed (DESIGN.md, request flow).

    Ordered so that `state >= KVPoll.Success` means terminal. A terminal state is final and, once
    `poll()` returns it, the room holds no transfer handle and no write can still land in its pages.
    """

    Bootstrapping = 0
    WaitingForInput = 1
    Transferring = 2
    Success = 3
    Failed = 4

    @property
    def is_terminal(self) -> bool:
        return self >= KVPoll.Success


class KVTransferError(RuntimeError):
    """Base of the control plane's errors."""


class KVBootstrapError(KVTransferError):
    """The bootstrap service is unreachable, answers with an error, or describes an instance we cannot use
    (incomplete, layouts that do not match, a TP/DP combination that cannot be served)."""


class KVProtocolError(KVTransferError):
    """A message that is not one of ours: unknown type, unknown or missing fields, another version."""


class KVMappingError(KVBootstrapError):
    """A (prefill, decode) parallel layout pair or a request that the rank mapping cannot serve."""


@dataclass(frozen=True)
class KVTimeouts:
    """Every wait of the control plane is bounded by one of these (seconds).

    bootstrap_s: a room's senders and receivers wait this long for the other side to show up (the prefill
        side holds its KV only this long while the decode side reserves pages and looks it up).
    transfer_s: from the end of bootstrapping to Success: the prefill computation and all writes.
    heartbeat_interval_s: how often a manager tells each peer it shares a live room with that it is alive.
    peer_timeout_s: a peer silent for this long is dead; its rooms fail.
    fence_s: after a decode-side abort, how long the receiver waits for the prefill side to confirm that
        no write of the room is still in flight, before it declares the pages free anyway.
    http_s: each bootstrap HTTP request (registration retries for this long while the service starts).
    tombstone_s: how long a finished room's id is remembered, to answer late messages about it.
    """

    bootstrap_s: float = 120.0
    transfer_s: float = 600.0
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 10.0
    fence_s: float = 5.0
    http_s: float = 5.0
    tombstone_s: float = 300.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"KVTimeouts.{name} must be positive, got {value!r}")
        if self.peer_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"KVTimeouts.peer_timeout_s ({self.peer_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or live peers would be declared dead"
            )
