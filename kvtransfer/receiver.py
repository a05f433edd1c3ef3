"""Decode side, one room: `KVReceiver` asks the prefill ranks the mapping names to write into its pages.

Created by `KVReceiveManager.create_receiver` (receive_manager.py) once the prefill instance has been
looked up and the mapping computed; the worker calls `init` when it has reserved the pages, then `poll`
until terminal, `aux()` after Success, `abort` whenever the request dies.

States: Bootstrapping (looked up, pages not reserved yet) -> WaitingForInput (requests sent) ->
Transferring (some prefill rank reported done) -> Success (every contacted prefill rank reported done) |
Failed. Failed is reported only once no write of the room can still land in the pages (the real source
confirmed its abort, finished, or died, or `fence_s` passed), so the worker may reuse them at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtransfer.auxdata import AuxRecord, read_aux
from kvtransfer.mapping import RankSources
from kvtransfer.messages import Abort, RankRegistration, TransferRequest
from kvtransfer.sender import check_pages
from kvtransfer.state import KVPoll

if TYPE_CHECKING:
    from kvtransfer.receive_manager import KVReceiveManager

log = logging.getLogger(__name__)


class KVReceiver:
    """The decode side of one room on one rank. Attributes: `room`, `sources` (real and dummy prefill
    ranks), `bootstrap_addr`, `failure_reason` (None unless failed)."""

    def __init__(
        self,
        manager: KVReceiveManager,
        room: int,
        bootstrap_addr: tuple[str, int],
        sources: RankSources,
        contacts: dict[int, int],
        prefill_ranks: dict[int, RankRegistration],
        now: float,
    ) -> None:
        self.room = room
        self.bootstrap_addr = bootstrap_addr
        self.sources = sources
        self._manager = manager
        self._contacts = contacts  # prefill rank -> how many decode ranks contact it for this room
        self._prefill = prefill_ranks  # contacted prefill rank -> its registration
        self._state = KVPoll.Bootstrapping
        self._deadline = now + manager.timeouts.bootstrap_s
        self._requested = False
        self._aux_slot: int | None = None
        self._done: set[int] = set()
        self._aborted: set[int] = set()
        self._dead: set[int] = set()
        self._failure: str | None = None
        self._fence_deadline = 0.0
        self._retired = False

    # --- worker thread ------------------------------------------------------------------------------
    def init(self, dst_pages: Sequence[int], aux_slot: int, held_pages: int = 0) -> None:
        """Ask every mapped prefill rank for the room: the real one writes into `dst_pages` (this rank's
        pages for the prompt, in order, from page `held_pages` on: the leading pages this rank holds already
        are not written) and into aux slot `aux_slot`. After a failure it does nothing (`poll()` says
        Failed)."""
        manager = self._manager
        pages = check_pages(dst_pages, manager.layout.num_pages, "dst_pages")
        if not isinstance(aux_slot, int) or not 0 <= aux_slot < manager.aux.num_slots:
            raise ValueError(f"aux_slot {aux_slot!r} out of range [0, {manager.aux.num_slots})")
        if not isinstance(held_pages, int) or isinstance(held_pages, bool) or held_pages < 0:
            raise ValueError(f"held_pages must be a non-negative int, got {held_pages!r}")
        with manager.lock:
            if self._failure is not None or self._state.is_terminal:
                return
            if self._requested:
                raise RuntimeError(f"room {self.room}: init called twice")
            self._aux_slot = aux_slot
            for rank in self.sources.contacted:
                registration = self._prefill[rank]
                dummy = rank != self.sources.real
                request = TransferRequest(
                    sender=manager.endpoint,
                    session=manager.session,
                    room=self.room,
                    prefill_session=registration.session,
                    decode_rank=manager.rank,
                    is_dummy=dummy,
                    dst_pages=[] if dummy else pages,
                    aux_slot=aux_slot,
                    num_decode_peers=self._contacts[rank],
                    held_pages=0 if dummy else held_pages,
                    intro=manager.intro_for(registration),
                )
                if not manager.send_message(registration.control_endpoint, request):
                    self._requested = True
                    self.fail(f"prefill rank {rank} at {registration.control_endpoint} is not reading")
                    return
            self._requested = True
            self._state = KVPoll.WaitingForInput
            self._deadline = time.monotonic() + manager.timeouts.transfer_s

    def poll(self) -> KVPoll:
        """The room's state. While the room is live this also progresses the engine: the prefill ranks'
        writes into our pages complete only while we do (`TransferEngine.progress`)."""
        with self._manager.lock:
            if not self._state.is_terminal:
                self._manager.progress()
            if self._failure is not None and not self._state.is_terminal and self._fenced(time.monotonic()):
                self._state = KVPoll.Failed
            if self._state.is_terminal and not self._retired:
                self._retired = True
                self._manager.retire(self)
            return self._state

    def abort(self, reason: str = "aborted by the decode worker") -> None:
        """Fail the room and tell the prefill ranks; keep polling: Failed comes once the pages are safe."""
        with self._manager.lock:
            if not self._state.is_terminal:
                self.fail(reason)

    def aux(self) -> AuxRecord:
        """The first output token and its logprob, written by the real prefill rank (after Success)."""
        if self._state is not KVPoll.Success or self._aux_slot is None:
            raise RuntimeError(f"room {self.room}: aux data is only there after Success (state {self._state.name})")
        return read_aux(self._manager.aux, self._aux_slot)

    @property
    def failure_reason(self) -> str | None:
        return self._failure

    # --- manager's background thread and worker thread (manager lock held) --------------------------
    def _fenced(self, now: float) -> bool:
        real = self.sources.real
        return not self._requested or real in self._done | self._aborted | self._dead or now > self._fence_deadline

    def fail(self, reason: str) -> None:
        """Record the first failure and tell every contacted prefill rank that has not finished."""
        if self._failure is not None or self._state.is_terminal:
            return
        self._failure = reason
        self._fence_deadline = time.monotonic() + self._manager.timeouts.fence_s
        log.info("room %d failed on decode rank %d: %s", self.room, self._manager.rank, reason)
        for rank, registration in self._prefill.items():
            if rank not in self._done | self._aborted | self._dead:
                self._manager.send_message(
                    registration.control_endpoint,
                    Abort(sender=self._manager.endpoint, session=self._manager.session, room=self.room, reason=reason),
                )

    def on_done(self, rank: int) -> None:
        if self._state.is_terminal or rank not in self._prefill:
            return
        self._done.add(rank)
        if self._failure is not None:
            return
        if self._done >= set(self._prefill):
            self._state = KVPoll.Success
        else:
            self._state = KVPoll.Transferring

    def on_abort(self, rank: int, reason: str) -> None:
        if rank in self._prefill:
            self._aborted.add(rank)
            self.fail(f"prefill rank {rank}: {reason}")

    def peer_died(self, endpoint: str, reason: str) -> None:
        for rank, registration in self._prefill.items():
            if registration.control_endpoint == endpoint:
                self._dead.add(rank)
                self.fail(reason)
                # A "dead" peer may only be stalled (SIGSTOP, GC, partition): tell it too, so that on resuming
                # it drops the room instead of writing into pages that another request may own by then
                # (its writer also refuses to write to a peer it has not heard from: `heard_recently`).
                manager = self._manager
                manager.send_message(endpoint, Abort(sender=manager.endpoint, session=manager.session,
                                                     room=self.room, reason=f"declared dead: {reason}"))

    def check_deadline(self, now: float) -> None:
        if self._failure is None and not self._state.is_terminal and now > self._deadline:
            waited = "init (pages reserved)" if self._state is KVPoll.Bootstrapping else "the KV to arrive"
            self.fail(f"timed out waiting for {waited} ({self._state.name})")

    def rank_at(self, endpoint: str) -> int | None:
        for rank, registration in self._prefill.items():
            if registration.control_endpoint == endpoint:
                return rank
        return None

    @property
    def peers(self) -> set[str]:
        """Prefill endpoints to watch: only once requested (before that, they do not know us)."""
        if not self._requested or self._state.is_terminal:
            return set()
        return {r.control_endpoint for rank, r in self._prefill.items() if rank not in self._dead}
