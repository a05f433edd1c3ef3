"""One prefill or decode rank for the KV flow tests: an engine, a pool, an aux buffer and a manager.

`serve` runs a rank in a child process (multiprocessing spawn) and answers commands on a Pipe; the rank
classes also run inside the test process. Torch-free so a child starts quickly. Every prefill rank's pool
holds bytes derived from its rank, so the destination shows which rank wrote each page.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kvtransfer.engines import make_engine
from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.receive_manager import KVReceiveManager
from kvtransfer.receiver import KVReceiver
from kvtransfer.rooms import RankInfo
from kvtransfer.send_manager import KVSendManager
from kvtransfer.sender import KVSender
from kvtransfer.state import KVPoll, KVTimeouts, KVTransferError

# Untouched decode bytes hold this: any stray write shows up against it.
SENTINEL = 0xA5
AUX_SLOTS = 8
AUX_SLOT_BYTES = 16


@dataclass(frozen=True)
class PoolShape:
    num_pages: int = 32
    num_layers: int = 3
    page_size: int = 4
    token_dim: int = 16

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.num_layers * self.page_size * self.token_dim * 2


def prefill_pool_bytes(shape: PoolShape, rank: int) -> np.ndarray:
    """The bytes prefill rank `rank` holds: random but reproducible, different per rank."""
    return np.random.default_rng(1000 + rank).integers(0, 256, shape.nbytes, dtype=np.uint8)


@dataclass
class Rank:
    """Engine + pool + aux buffer of one rank; `manager` is set by the subclasses."""

    kind: str
    name: str
    shape: PoolShape
    pool: np.ndarray
    engine_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine = make_engine(self.kind, self.name, **self.engine_options)
        self.aux_buffer = np.full(AUX_SLOTS * AUX_SLOT_BYTES, SENTINEL, dtype=np.uint8)
        s = self.shape
        self.layout = PageLayout(s.num_pages, s.num_layers, s.page_size, s.token_dim, 2, "bfloat16", self.pool.ctypes.data)
        self.aux = AuxLayout(self.aux_buffer.ctypes.data, AUX_SLOT_BYTES, AUX_SLOTS)
        self.engine.register(self.layout.base_ptr, self.layout.pool_bytes, "cpu")
        self.engine.register(self.aux.base_ptr, self.aux.pool_bytes, "cpu")
        # What the worker's page allocator would do: a room holds its pages until poll() is terminal.
        self.held_pages: dict[int, list[int]] = {}
        self.closed = False

    def hold(self, room: int, pages: list[int]) -> None:
        self.held_pages.setdefault(room, []).extend(pages)

    def free_when_terminal(self, room: int, state: KVPoll) -> None:
        if state.is_terminal:
            self.held_pages.pop(room, None)

    def counts(self) -> dict[str, int]:
        manager = self.manager  # type: ignore[attr-defined]
        counts = {
            "live_rooms": manager.num_live_rooms,
            "inflight_handles": self.engine.num_inflight_handles,
            "registrations": self.engine.num_registrations,
            "free_pages": self.shape.num_pages - sum(len(p) for p in self.held_pages.values()),
        }
        if isinstance(manager, KVSendManager):
            counts["free_aux_slots"] = manager.num_free_aux_slots
        return counts

    def close(self) -> dict[str, int]:
        self.closed = True
        self.manager.close()  # type: ignore[attr-defined]
        self.engine.close()
        return {
            "inflight_handles": self.engine.num_inflight_handles,
            "registrations": self.engine.num_registrations,
            "peers": self.engine.num_peers,
        }


class PrefillRank(Rank):
    """A prefill rank that sends rooms chunk by chunk, one chunk per step, polling in between."""

    def __init__(self, kind: str, rank_info: RankInfo, bootstrap_addr: str, shape: PoolShape, timeouts: KVTimeouts,
                 engine_options: dict[str, Any] | None = None) -> None:
        super().__init__(kind, f"p{rank_info.rank}-{os.getpid()}", shape, prefill_pool_bytes(shape, rank_info.rank),
                         engine_options or {})
        self.manager = KVSendManager(self.engine, self.layout, self.aux, rank_info, bootstrap_addr, timeouts)
        self.senders: dict[int, KVSender] = {}
        self.plans: dict[int, list[tuple[str, Any]]] = {}

    def start(self, room: int, chunks: list[tuple[list[int], int]], aux: tuple[int, float] | None,
              stop_after: int | None = None) -> None:
        """Plan a room: each chunk (pages, page_position) then the aux record; `stop_after` chunks, then hang."""
        self.senders[room] = self.manager.create_sender(room)
        self.hold(room, [page for pages, _ in chunks for page in pages])
        plan: list[tuple[str, Any]] = [("chunk", (pages, pos, i == len(chunks) - 1)) for i, (pages, pos) in enumerate(chunks)]
        if stop_after is not None:
            plan = plan[:stop_after] + [("hang", None)]
        elif aux is not None:
            plan.append(("aux", aux))
        self.plans[room] = plan

    def step(self) -> None:
        for room, sender in self.senders.items():
            plan = self.plans[room]
            if plan and plan[0][0] != "hang":
                what, arg = plan.pop(0)
                if what == "chunk":
                    sender.send(arg[0], arg[1], last=arg[2])
                else:
                    sender.send_aux(*arg)
            self.free_when_terminal(room, sender.poll())

    def result(self, room: int) -> tuple[str, str | None] | None:
        state = self.senders[room].poll()
        self.free_when_terminal(room, state)
        return (state.name, self.senders[room].failure_reason) if state.is_terminal else None

    def abort(self, room: int) -> None:
        self.senders[room].abort("test aborts on the prefill side")

    def state(self, room: int) -> str:
        return self.senders[room].poll().name


class DecodeRank(Rank):
    """A decode rank with a pool of SENTINEL bytes."""

    def __init__(self, kind: str, rank_info: RankInfo, shape: PoolShape, timeouts: KVTimeouts,
                 engine_options: dict[str, Any] | None = None) -> None:
        super().__init__(kind, f"d{rank_info.rank}-{os.getpid()}", shape,
                         np.full(shape.nbytes, SENTINEL, dtype=np.uint8), engine_options or {})
        self.manager = KVReceiveManager(self.engine, self.layout, self.aux, rank_info, timeouts)
        self.receivers: dict[int, KVReceiver] = {}

    def start(self, host: str, port: int, room: int, dst_pages: list[int] | None, aux_slot: int,
              prefill_dp_rank: int | None = None, held_pages: int = 0,
              prefill_layout: tuple[int, int] | None = None) -> tuple[int, tuple[int, ...]]:
        """Create the room's receiver and (unless dst_pages is None) init it; (real, dummies) prefill ranks.
        `held_pages`: the prompt's leading pages this rank says it holds (dst_pages take the rest);
        `prefill_layout`: an elastic prefill's layout when it started the room (its placement)."""
        receiver = self.manager.create_receiver(host, port, room, prefill_dp_rank, prefill_layout=prefill_layout)
        self.receivers[room] = receiver
        if dst_pages is not None:
            receiver.init(dst_pages, aux_slot, held_pages)
            self.hold(room, dst_pages)
        return receiver.sources.real, receiver.sources.dummies

    def step(self) -> None:
        if self.closed:
            return
        for room, receiver in self.receivers.items():
            self.free_when_terminal(room, receiver.poll())

    def result(self, room: int) -> tuple[str, str | None, tuple[int, float] | None] | None:
        receiver = self.receivers[room]
        state = receiver.poll()
        self.free_when_terminal(room, state)
        if not state.is_terminal:
            return None
        aux = receiver.aux() if state is KVPoll.Success else None
        return state.name, receiver.failure_reason, (aux.first_token_id, aux.logprob) if aux else None

    def abort(self, room: int) -> None:
        self.receivers[room].abort("test aborts on the decode side")

    def dump(self) -> tuple[bytes, bytes]:
        return self.pool.tobytes(), self.aux_buffer.tobytes()


def serve(conn: Connection, role: str, kwargs: dict[str, Any]) -> None:
    """Child process: build the rank (reply "ready" or the error), then answer commands until "close".

    A command is (name, *args); `result` replies only once the room is terminal (or after `timeout_s`:
    None), stepping the rank meanwhile. Errors are sent back as ("error", message).
    """
    try:
        rank: PrefillRank | DecodeRank = PrefillRank(**kwargs) if role == "prefill" else DecodeRank(**kwargs)
    except KVTransferError as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", rank.manager.endpoint))
    waiting: list[tuple[int, float]] = []  # rooms whose result was asked for, with deadlines
    while True:
        rank.step()
        for room, deadline in list(waiting):
            result = rank.result(room)
            if result is not None or time.monotonic() > deadline:
                conn.send(("ok", result))
                waiting.remove((room, deadline))
        if not conn.poll(0.002):
            continue
        name, *args = conn.recv()
        try:
            if name == "result":
                waiting.append((args[0], time.monotonic() + args[1]))
                continue
            if name == "close":
                conn.send(("ok", rank.close()))
                return
            conn.send(("ok", getattr(rank, name)(*args)))
        except (KVTransferError, ValueError, RuntimeError) as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
