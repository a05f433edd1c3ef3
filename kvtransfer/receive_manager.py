"""Decode side, one rank: `KVReceiveManager` looks prefill instances up (cached), checks that their pages fit
ours, maps ranks, and creates a `KVReceiver` per room; its background thread collects the prefill ranks'
notices.

Usage (the decode worker, one per rank; pool and aux buffer registered with `engine` beforehand):

    manager = KVReceiveManager(engine, layout, aux, RankInfo(rank, tp_size, dp_size, host))
    receiver = manager.create_receiver(bootstrap_host, bootstrap_port, room)   # KVBootstrapError if not
    receiver.init(dst_pages, aux_slot)                                          # once pages are reserved
    while not receiver.poll().is_terminal: ...
    first_token = receiver.aux().first_token_id                                 # after Success
    manager.close()
"""

from __future__ import annotations

import logging
import time

from kvtransfer.bootstrap_client import BootstrapClient
from kvtransfer.engines.base import TransferEngine
from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.mapping import ParallelLayout, sources_for
from kvtransfer.messages import (
    Abort,
    AbortCode,
    ControlMessage,
    DecodeIntro,
    InstanceInfo,
    RankRegistration,
    TransferDone,
)
from kvtransfer.receiver import KVReceiver
from kvtransfer.rooms import RankInfo, RoomManager
from kvtransfer.state import KVBootstrapError, KVTimeouts

log = logging.getLogger(__name__)


def registered_ranks(info: InstanceInfo) -> set[int]:
    return {registration.rank for registration in info.ranks}


class KVReceiveManager(RoomManager):
    """The KV receiving side of one decode rank.

    Supports: any number of prefill instances (looked up through their bootstrap services, cached per
    instance and refreshed when one restarts), any TP/DP pairing the mapping serves, timeouts, aborts both
    ways, dead-peer detection. Attributes: `layout`, `aux`, `rank`, `endpoint`, `session`; counter
    `num_live_rooms`.

    Args:
        engine: this rank's transfer engine, with `layout`'s pool and `aux`'s buffer already registered.
            Prefill ranks write into our memory; the manager reads its metadata and calls its `progress()`
            (from the worker's thread, in `progress` and `KVReceiver.poll`), and does not close it.
        layout: this rank's KV pool.
        aux: this rank's aux buffer (host memory); the worker owns its slots.
        rank_info: this rank within its instance, and the host prefill ranks reach it at.
        timeouts: bounds on every wait.
        bootstrap_client: a shared client (one is made otherwise); it holds the lookup cache.
    Call `close()`: it fails live rooms (telling the prefill ranks) and joins the background thread.
    """

    def __init__(
        self,
        engine: TransferEngine,
        layout: PageLayout,
        aux: AuxLayout,
        rank_info: RankInfo,
        timeouts: KVTimeouts | None = None,
        bootstrap_client: BootstrapClient | None = None,
    ) -> None:
        super().__init__(layout, aux, rank_info, timeouts, bootstrap_client)
        self._engine = engine
        self._engine_kind = engine.kind
        self._intro = DecodeIntro(
            engine_name=engine.name, engine_metadata=engine.metadata(), page_layout=layout, aux_layout=aux,
            model_fingerprint=rank_info.model_fingerprint,
        )
        self._receivers: dict[int, KVReceiver] = {}
        self._introduced: set[tuple[str, str]] = set()  # (prefill endpoint, prefill session)
        self._checked: set[tuple[str, tuple[tuple[int, str], ...]]] = set()  # instances (id, ranks) that fit ours
        self._start()

    # --- worker thread ------------------------------------------------------------------------------
    def create_receiver(
        self, bootstrap_host: str, bootstrap_port: int, room: int, prefill_dp_rank: int | None = None,
        decode_owner: int | None = None, prefill_layout: tuple[int, int] | None = None,
    ) -> KVReceiver:
        """The receiver of `room`, whose KV the prefill instance at bootstrap_host:bootstrap_port computes.
        On an mla-core decode instance `decode_owner` names the rank holding the room's pages (this one).
        `prefill_layout`: (tp_size, dp_size) of an elastic prefill instance when it started the room (its
        `RoomPlacement`, with `prefill_dp_rank`); None: the layout the lookup gives.

        Raises `KVBootstrapError` (clear message) if the instance is unreachable or not ready, if its
        pages do not fit ours, or if the TP/DP pairing or `prefill_dp_rank` cannot be served.
        """
        if not isinstance(room, int) or room < 0:
            raise ValueError(f"room must be a non-negative int, got {room!r}")
        address = f"{bootstrap_host}:{bootstrap_port}"
        info = self.client.lookup(bootstrap_host, bootstrap_port)  # blocking HTTP, outside the lock
        self._check_instance(info, address)
        if prefill_layout is not None:
            prefill = ParallelLayout(*prefill_layout, info.mla_core)
        else:
            prefill = ParallelLayout(info.tp_size, info.dp_size, info.mla_core)
        sources, contacts = sources_for(prefill, self.rank_info.parallel, self.rank, room, prefill_dp_rank,
                                        decode_owner)
        if any(rank not in registered_ranks(info) for rank in sources.contacted):
            # A room of a layout newer than our cached lookup (ranks that joined a scale-up): look again.
            self.client.invalidate(bootstrap_host, bootstrap_port)
            info = self.client.lookup(bootstrap_host, bootstrap_port)
            self._check_instance(info, address)
            missing = sorted(set(sources.contacted) - registered_ranks(info))
            if missing:
                raise KVBootstrapError(f"prefill instance at {address} has no rank {missing[0]} registered, "
                                       f"which holds room {room}'s KV")
        registrations = {rank: info.rank(rank) for rank in sources.contacted}
        with self.lock:
            if room in self._receivers:
                raise ValueError(f"room {room} already has a receiver on decode rank {self.rank}")
            receiver = KVReceiver(
                self, room, (bootstrap_host, bootstrap_port), sources, contacts, registrations, time.monotonic()
            )
            self._receivers[room] = receiver
            for registration in registrations.values():
                self._expect_session(registration.control_endpoint, registration.session)
            return receiver

    def _check_instance(self, info: InstanceInfo, address: str) -> None:
        # Checked once per set of registered ranks: an elastic instance's ranks come and go under one id.
        key = (info.instance_id, tuple((r.rank, r.session) for r in info.ranks))
        if key in self._checked:
            return
        for registration in info.ranks:
            if registration.engine_kind != self._engine_kind:
                raise KVBootstrapError(
                    f"prefill instance at {address} uses {registration.engine_kind} transfer engines, "
                    f"this decode rank {self._engine_kind}"
                )
            why = self._layout_mismatch(registration.page_layout, registration.aux_layout,
                                        registration.model_fingerprint)
            if why is not None:
                raise KVBootstrapError(
                    f"prefill rank {registration.rank} at {address} cannot write into our pages: {why}"
                )
        self._checked.add(key)

    def intro_for(self, registration: RankRegistration) -> DecodeIntro | None:
        """Our engine and layout, the first time we write to this prefill session (lock held)."""
        key = (registration.control_endpoint, registration.session)
        if key in self._introduced:
            return None
        self._introduced.add(key)
        return self._intro

    def progress(self) -> None:
        """Let the engine serve the writes coming into this rank (worker thread only: engines are not
        thread-safe, so the background thread never calls this). `KVReceiver.poll` calls it for every
        live room; a worker loop that waits on transfers without polling receivers calls it itself."""
        self._engine.progress()

    def retire(self, receiver: KVReceiver) -> None:
        self._receivers.pop(receiver.room, None)
        self._bury(receiver.room, receiver.failure_reason or "succeeded")

    @property
    def num_live_rooms(self) -> int:
        return len(self._receivers)

    # --- background thread (lock held) --------------------------------------------------------------
    def _on_message(self, message: ControlMessage, now: float) -> None:
        if isinstance(message, TransferDone):
            receiver = self._receivers.get(message.room)
            if receiver is not None and receiver.rank_at(message.sender) == message.prefill_rank:
                receiver.on_done(message.prefill_rank)
        elif isinstance(message, Abort):
            if message.code == AbortCode.NEED_INTRO:
                self._introduced = {k for k in self._introduced if k[0] != message.sender}
            receiver = self._receivers.get(message.room)
            if receiver is None:
                return
            if message.code == AbortCode.STALE_SESSION:
                self.client.invalidate(*receiver.bootstrap_addr)
                self._checked.clear()
            rank = receiver.rank_at(message.sender)
            if rank is not None:
                receiver.on_abort(rank, message.reason)
        else:
            log.warning("decode rank %d: unexpected %s from %s", self.rank, type(message).__name__, message.sender)

    def _on_tick(self, now: float) -> None:
        for receiver in list(self._receivers.values()):
            receiver.check_deadline(now)

    def _live_peers(self) -> set[str]:
        peers: set[str] = set()
        for receiver in self._receivers.values():
            peers |= receiver.peers
        return peers

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        for receiver in list(self._receivers.values()):
            if receiver.rank_at(endpoint) is not None:
                receiver.peer_died(endpoint, reason)
                # The instance may have restarted elsewhere: look it up afresh next time.
                self.client.invalidate(*receiver.bootstrap_addr)
        self._introduced = {k for k in self._introduced if k[0] != endpoint}
        self.channel.forget(endpoint)

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Fail every live room (telling the prefill ranks), stop the thread, close the channel. Idempotent."""
        if self._stop.is_set():
            return
        self._stop_thread()
        with self.lock:
            for receiver in list(self._receivers.values()):
                receiver.fail("decode rank shutting down")
            self._receivers.clear()
        self.channel.close()
