"""Prefill side, one rank: `KVSendManager` registers the rank with its instance's bootstrap service, answers
decode ranks' transfer requests on its control channel, and creates a `KVSender` per room.

Usage (the prefill worker, one per rank; pool and aux buffer registered with `engine` beforehand):

    manager = KVSendManager(engine, layout, aux, RankInfo(rank, tp_size, dp_size, host), "host:port")
    sender = manager.create_sender(room)
    sender.send(pages_of_chunk, page_position, last=False)   # per chunk
    sender.send_aux(first_token_id, logprob)                 # with or after the last chunk
    while not sender.poll().is_terminal: ...                  # then free the request's pages
    manager.close()
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kvtransfer.bootstrap_client import BootstrapClient
from kvtransfer.engines.base import TransferEngine
from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.messages import Abort, AbortCode, ControlMessage, RankRegistration, TransferRequest
from kvtransfer.rooms import RankInfo, RoomManager
from kvtransfer.sender import Destination, KVSender
from kvtransfer.state import KVBootstrapError, KVTimeouts

log = logging.getLogger(__name__)


@dataclass
class DecodePeer:
    """A decode rank as its intro described it; kept per control endpoint."""

    endpoint: str
    session: str
    engine_name: str
    engine_metadata: bytes
    page_layout: PageLayout
    aux_layout: AuxLayout


class KVSendManager(RoomManager):
    """The KV sending side of one prefill rank.

    Supports: registration with the bootstrap service, transfer requests from any number of decode
    instances, chunked page writes and aux records per room, timeouts, aborts both ways, dead-peer
    detection. Attributes: `engine`, `layout`, `aux`, `rank`, `endpoint`, `session`; counters
    `num_live_rooms` (senders + requests for rooms not created yet), `num_free_aux_slots`.

    Args:
        engine: this rank's transfer engine, with `layout`'s pool and `aux`'s buffer already registered.
            The manager uses it from the worker's thread only and does not close it.
        layout: this rank's KV pool.
        aux: this rank's aux buffer (host memory); the manager owns its slots.
        rank_info: this rank within its instance, and the host decode ranks reach it at.
        bootstrap_addr: "host:port" of the instance's `BootstrapService`.
        timeouts: bounds on every wait.
        bootstrap_client: a shared client (one is made otherwise).
    Call `close()`: it fails live rooms, deregisters the rank and joins the background thread.
    """

    def __init__(
        self,
        engine: TransferEngine,
        layout: PageLayout,
        aux: AuxLayout,
        rank_info: RankInfo,
        bootstrap_addr: str,
        timeouts: KVTimeouts | None = None,
        bootstrap_client: BootstrapClient | None = None,
    ) -> None:
        super().__init__(layout, aux, rank_info, timeouts, bootstrap_client)
        self.engine = engine
        self.bootstrap_addr = bootstrap_addr
        self._senders: dict[int, KVSender] = {}
        self._pending: dict[int, list[tuple[float, Destination, int]]] = {}
        self._decode_peers: dict[str, DecodePeer] = {}
        self._connected: dict[str, bytes] = {}  # engine name -> the metadata it was connected with
        self._to_disconnect: set[str] = set()
        self._free_aux_slots = list(range(aux.num_slots - 1, -1, -1))
        # KV pages (and their bytes) written into decode ranks so far, for /metrics: decode-side prefix reuse
        # shows here as pages not written.
        self.pages_written = 0
        self.bytes_written = 0
        registration = RankRegistration(
            rank=rank_info.rank,
            tp_size=rank_info.tp_size,
            dp_size=rank_info.dp_size,
            session=self.session,
            control_endpoint=self.endpoint,
            engine_kind=engine.kind,
            engine_name=engine.name,
            engine_metadata=engine.metadata(),
            page_layout=layout,
            aux_layout=aux,
            model_fingerprint=rank_info.model_fingerprint,
            mla_core=rank_info.mla_core,
        )
        try:
            self.client.register(bootstrap_addr, registration)
        except KVBootstrapError:
            self.channel.close()
            raise
        self._start()

    # --- worker thread ------------------------------------------------------------------------------
    def create_sender(self, room: int) -> KVSender:
        """The sender of `room`; it absorbs requests that arrived before it. A room this rank already
        failed (e.g. the decode side aborted first) gives a sender that fails at the first poll."""
        if not isinstance(room, int) or room < 0:
            raise ValueError(f"room must be a non-negative int, got {room!r}")
        with self.lock:
            if room in self._senders:
                raise ValueError(f"room {room} already has a sender on prefill rank {self.rank}")
            now = time.monotonic()
            sender = KVSender(self, room, now)
            self._senders[room] = sender
            ended = self._tombstone(room)
            if ended is not None:
                sender.fail(f"room already ended here: {ended}")
            for _, destination, expected in self._pending.pop(room, []):
                sender.add_destination(destination, expected, now)
            return sender

    def service(self) -> None:
        """Engine work the background thread deferred to this thread: forget dead peers' engines."""
        for name in self._to_disconnect:
            self.engine.disconnect(name)
            self._connected.pop(name, None)
        self._to_disconnect.clear()

    def connect(self, endpoint: str) -> DecodePeer:
        """The decode peer at `endpoint`, its engine connected (once per metadata)."""
        peer = self._decode_peers[endpoint]
        if self._connected.get(peer.engine_name) != peer.engine_metadata:
            self.engine.connect(peer.engine_name, peer.engine_metadata)
            self._connected[peer.engine_name] = peer.engine_metadata
        return peer

    def count_written(self, pages: int, nbytes: int) -> None:
        self.pages_written += pages
        self.bytes_written += nbytes

    def take_aux_slot(self) -> int | None:
        return self._free_aux_slots.pop() if self._free_aux_slots else None

    def retire(self, sender: KVSender, outcome: str) -> None:
        """A sender reached a terminal state: forget it, free its aux slot, remember the room's outcome."""
        self._senders.pop(sender.room, None)
        if sender.aux_slot is not None:
            self._free_aux_slots.append(sender.aux_slot)
            sender.aux_slot = None
        self._bury(sender.room, outcome)

    def send_to(self, endpoint: str, kind: type[ControlMessage], **fields: Any) -> bool:
        return self.send_message(endpoint, kind(sender=self.endpoint, session=self.session, **fields))

    @property
    def num_live_rooms(self) -> int:
        return len(self._senders) + len(self._pending)

    @property
    def num_free_aux_slots(self) -> int:
        return len(self._free_aux_slots)

    # --- background thread (lock held) --------------------------------------------------------------
    def _on_message(self, message: ControlMessage, now: float) -> None:
        if isinstance(message, TransferRequest):
            self._on_request(message, now)
        elif isinstance(message, Abort):
            self._on_abort(message)
        else:
            log.warning("prefill rank %d: unexpected %s from %s", self.rank, type(message).__name__, message.sender)

    def _refuse(self, request: TransferRequest, code: str, reason: str) -> None:
        log.info("prefill rank %d refused room %d from %s: %s", self.rank, request.room, request.sender, reason)
        self.send_to(request.sender, Abort, room=request.room, reason=reason, code=code)

    def _on_request(self, request: TransferRequest, now: float) -> None:
        if request.prefill_session != self.session:
            self._refuse(request, AbortCode.STALE_SESSION, f"prefill rank {self.rank} restarted: look it up again")
            return
        if request.intro is not None:
            intro = request.intro
            why = self._layout_mismatch(intro.page_layout, intro.aux_layout, intro.model_fingerprint)
            if why is not None:
                self._refuse(request, AbortCode.REFUSED, f"decode rank's layout does not match: {why}")
                return
            self._decode_peers[request.sender] = DecodePeer(
                request.sender, request.session, intro.engine_name, intro.engine_metadata,
                intro.page_layout, intro.aux_layout,
            )
            self._expect_session(request.sender, request.session)
        peer = self._decode_peers.get(request.sender)
        if peer is None or peer.session != request.session:
            self._refuse(request, AbortCode.NEED_INTRO, f"prefill rank {self.rank} has no intro from {request.sender}")
            return
        why = self._check_request(request, peer)
        if why is not None:
            self._refuse(request, AbortCode.REFUSED, why)
            return
        ended = self._tombstone(request.room)
        if ended is not None and request.room not in self._senders:
            self._refuse(request, AbortCode.FAILED, f"room already ended on prefill rank {self.rank}: {ended}")
            return
        destination = Destination(request.sender, request.decode_rank, request.is_dummy, list(request.dst_pages),
                                  request.aux_slot, held_pages=request.held_pages)
        sender = self._senders.get(request.room)
        if sender is not None:
            sender.add_destination(destination, request.num_decode_peers, now)
        else:
            expires = now + self.timeouts.bootstrap_s
            self._pending.setdefault(request.room, []).append((expires, destination, request.num_decode_peers))

    @staticmethod
    def _check_request(request: TransferRequest, peer: DecodePeer) -> str | None:
        if request.num_decode_peers < 1:
            return f"num_decode_peers must be positive, got {request.num_decode_peers}"
        if request.held_pages < 0:
            return f"held_pages must be >= 0, got {request.held_pages}"
        if request.is_dummy:
            return None
        if not request.dst_pages:
            return "a real transfer request without destination pages"
        limit = peer.page_layout.num_pages
        bad = [p for p in request.dst_pages if not 0 <= p < limit]
        if bad:
            return f"destination page {bad[0]} out of range [0, {limit})"
        if not 0 <= request.aux_slot < peer.aux_layout.num_slots:
            return f"aux slot {request.aux_slot} out of range [0, {peer.aux_layout.num_slots})"
        return None

    def _on_abort(self, abort: Abort) -> None:
        reason = f"aborted by decode peer {abort.sender}: {abort.reason}"
        sender = self._senders.get(abort.room)
        if sender is not None:
            sender.fail(reason)  # tells every decode rank, this one included, once its writes drained
            return
        pending = self._pending.pop(abort.room, [])
        for _, destination, _ in pending:
            if destination.endpoint != abort.sender:
                self.send_to(destination.endpoint, Abort, room=abort.room, reason=reason)
        self._bury(abort.room, reason)
        # Nothing of ours can be writing into the room: confirm at once so the decode rank frees its pages.
        self.send_to(abort.sender, Abort, room=abort.room, reason=reason)

    def _on_tick(self, now: float) -> None:
        for sender in list(self._senders.values()):
            sender.check_deadline(now)
        for room, entries in list(self._pending.items()):
            alive = [e for e in entries if e[0] > now]
            for _, destination, _ in (e for e in entries if e[0] <= now):
                reason = f"prefill rank {self.rank} got no request for room {room} within the bootstrap timeout"
                self.send_to(destination.endpoint, Abort, room=room, reason=reason)
            if alive:
                self._pending[room] = alive
            else:
                del self._pending[room]

    def _live_peers(self) -> set[str]:
        peers: set[str] = set()
        for sender in self._senders.values():
            peers |= sender.peers
        for entries in self._pending.values():
            peers.update(destination.endpoint for _, destination, _ in entries)
        return peers

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        for sender in list(self._senders.values()):
            sender.peer_died(endpoint, reason)
        for room, entries in list(self._pending.items()):
            entries[:] = [e for e in entries if e[1].endpoint != endpoint]
            if not entries:
                del self._pending[room]
        peer = self._decode_peers.get(endpoint)
        if peer is not None:
            self._to_disconnect.add(peer.engine_name)

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Fail every live room (releasing its writes at once), deregister, stop the thread. Idempotent."""
        if self._stop.is_set():
            return
        self._stop_thread()
        with self.lock:
            for sender in list(self._senders.values()):
                sender.fail("prefill rank shutting down")
                sender.drain(time.monotonic(), force=True)  # release writes at once, then tell peers
            for room, entries in self._pending.items():
                for _, destination, _ in entries:
                    self.send_to(destination.endpoint, Abort, room=room, reason="prefill rank shutting down")
            self._pending.clear()
            self.service()
        try:
            self.client.deregister(self.bootstrap_addr, self.rank, self.session)
        except Exception as exc:  # the service may be gone first; the rank is leaving either way
            log.info("prefill rank %d: deregistering: %s", self.rank, exc)
        self.channel.close()
