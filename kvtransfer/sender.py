"""Prefill side, one room: `KVSender` writes the room's pages and aux record into each decode rank that asked.

Created by `KVSendManager.create_sender` (send_manager.py). The worker's scheduler calls only `send`,
`send_aux`, `poll` and `abort`, all on its own thread; the manager's background thread adds destinations
as the decode ranks' requests arrive, and fails the room on an abort, a dead peer or a timeout.

States: Bootstrapping (waiting for every decode rank that maps to this rank) -> WaitingForInput (no chunk
sent yet) -> Transferring -> Success (every write landed, every decode rank told) | Failed (the writes
already issued have drained or been released, every reachable decode rank told). The sender frees nothing
of the worker's: the worker frees its pages once `poll()` is terminal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtransfer.auxdata import AuxRecord, write_aux
from kvtransfer.engines.base import TransferError, TransferHandle, TransferStatus
from kvtransfer.layout import page_descriptors
from kvtransfer.messages import Abort, TransferDone
from kvtransfer.state import KVPoll

if TYPE_CHECKING:
    from kvtransfer.send_manager import KVSendManager

log = logging.getLogger(__name__)


@dataclass
class Destination:
    """One decode rank's request for a room: where to write (unless dummy), and whether it has been told the
    room's outcome. `dst_pages[i]` takes the prompt's page `held_pages + i`: the decode rank holds the first
    `held_pages` pages already (decode-side prefix reuse), so those are never written."""

    endpoint: str
    decode_rank: int
    is_dummy: bool
    dst_pages: list[int]
    aux_slot: int
    told: bool = False
    held_pages: int = 0


def check_pages(pages: Sequence[int], num_pages: int, what: str) -> list[int]:
    """A list of distinct valid page indices, or ValueError naming the first bad one."""
    if isinstance(pages, str | bytes) or not isinstance(pages, Sequence):
        raise ValueError(f"{what} must be a sequence of page indices, got {type(pages).__name__}")
    result = list(pages)
    if not result:
        raise ValueError(f"{what} is empty")
    for page in result:
        if not isinstance(page, int) or isinstance(page, bool) or not 0 <= page < num_pages:
            raise ValueError(f"{what}: page {page!r} out of range [0, {num_pages})")
    if len(set(result)) != len(result):
        raise ValueError(f"{what} names a page twice")
    return result


class KVSender:
    """The prefill side of one room on one rank. Attributes: `room`, `failure_reason` (None unless Failed),
    `is_dummy` (None until every decode rank has asked; then True if this rank only sends the notice)."""

    def __init__(self, manager: KVSendManager, room: int, now: float) -> None:
        self.room = room
        self._manager = manager
        self._state = KVPoll.Bootstrapping
        self._deadline = now + manager.timeouts.bootstrap_s
        self._destinations: dict[str, Destination] = {}
        self._expected: int | None = None
        self._queued: list[tuple[list[int], int]] = []  # chunks sent while still bootstrapping
        self._last = False
        self._aux: AuxRecord | None = None
        self._aux_issued = False
        self.aux_slot: int | None = None  # this rank's aux slot holding the record, while the room lives
        self._handles: list[tuple[str, TransferHandle]] = []
        self._failure: str | None = None
        self._dead_peers: set[str] = set()
        self._drain_deadline: float | None = None
        self.pages_written = 0  # pages written into decode ranks' pages (per destination)

    # --- worker thread ------------------------------------------------------------------------------
    def send(self, src_pages: Sequence[int], page_position: int, last: bool = False) -> None:
        """Write `src_pages` (this rank's pages of one chunk, in prompt order) into each real decode rank's
        pages at positions [page_position, page_position + len(src_pages)) of its page list. Returns at
        once; `poll()` tracks the writes. `last` marks the final chunk. Before bootstrapping ends the chunk
        is queued; after a failure it is ignored (`poll()` says Failed)."""
        pages = check_pages(src_pages, self._manager.layout.num_pages, "src_pages")
        if not isinstance(page_position, int) or page_position < 0:
            raise ValueError(f"page_position must be a non-negative int, got {page_position!r}")
        with self._manager.lock:
            if self._state is KVPoll.Success or self._last:
                raise RuntimeError(f"room {self.room}: send after the last chunk")
            self._last = bool(last)
            if self._failure is not None:
                return
            self._queued.append((pages, page_position))
            self._manager.service()
            self._progress(time.monotonic())

    def send_aux(self, first_token_id: int, logprob: float, top: tuple[tuple[int, float], ...] = ()) -> None:
        """The room's aux record (first output token, its logprob and the alternatives asked for), written
        after or with the pages."""
        record = AuxRecord(first_token_id, logprob, top)
        with self._manager.lock:
            if self._aux is not None:
                raise RuntimeError(f"room {self.room}: send_aux called twice")
            self._aux = record
            if self._failure is None:
                self._manager.service()
                self._progress(time.monotonic())

    def poll(self) -> KVPoll:
        with self._manager.lock:
            if self._state.is_terminal:
                return self._state
            now = time.monotonic()
            self._manager.service()
            if self._failure is None:
                self._progress(now)
            if self._failure is not None:
                self.drain(now)
            return self._state

    def abort(self, reason: str = "aborted by the prefill worker") -> None:
        """Fail the room; decode ranks are told once this rank's writes have drained. Keep polling until
        `poll()` returns Failed. No-op once terminal."""
        with self._manager.lock:
            if not self._state.is_terminal:
                self.fail(reason)

    @property
    def failure_reason(self) -> str | None:
        return self._failure

    @property
    def is_dummy(self) -> bool | None:
        if self._state is KVPoll.Bootstrapping:
            return None
        return all(d.is_dummy for d in self._destinations.values())

    @property
    def num_inflight(self) -> int:
        return len(self._handles)

    # --- progress (manager lock held) ---------------------------------------------------------------
    def _progress(self, now: float) -> None:
        if self._state is KVPoll.Bootstrapping:
            return
        real = [d for d in self._destinations.values() if not d.is_dummy]
        pending_writes = self._queued or (self._aux is not None and not self._aux_issued and self._last)
        if pending_writes:
            stale = [d.endpoint for d in real if not self._manager.heard_recently(d.endpoint, now)]
            if stale:  # fence: this rank stalled, the decode side may have freed and reused the pages
                self.fail(f"decode peer {stale[0]} not heard from for over half the peer timeout: not writing")
                return
        try:
            for pages, position in self._queued:
                self._write_chunk(pages, position)
            self._queued.clear()
            if self._aux is not None and not self._aux_issued and self._last and real:
                self._write_aux(self._aux)
        except (TransferError, ValueError) as exc:
            self.fail(str(exc))
            return
        for endpoint, handle in list(self._handles):
            status = self._poll_write(handle)
            if status is TransferStatus.PENDING:
                continue
            if status is TransferStatus.FAILED:
                self.fail(f"write to decode peer {endpoint} failed: {handle.error}")
                return
            self._manager.engine.release(handle)
            self._handles.remove((endpoint, handle))
        if self._last and not self._handles and (self._aux_issued or not real):
            for destination in self._destinations.values():
                self._manager.send_to(destination.endpoint, TransferDone, room=self.room, prefill_rank=self._manager.rank)
                destination.told = True
            self._state = KVPoll.Success
            self._manager.retire(self, "succeeded")

    def _write_chunk(self, pages: list[int], position: int) -> None:
        manager = self._manager
        for destination in self._destinations.values():
            if destination.is_dummy:
                continue
            # The prompt's pages before `held_pages` are in the decode rank's pages already: skip them.
            skip = min(len(pages), max(0, destination.held_pages - position))
            if skip == len(pages):
                continue
            start = position + skip - destination.held_pages
            dst_pages = destination.dst_pages[start : start + len(pages) - skip]
            if len(dst_pages) != len(pages) - skip:
                raise ValueError(
                    f"chunk at pages [{position}, {position + len(pages)}) does not fit the "
                    f"{len(destination.dst_pages)} pages decode rank {destination.decode_rank} reserved after "
                    f"the {destination.held_pages} it holds"
                )
            peer = manager.connect(destination.endpoint)
            src, dst = page_descriptors(manager.layout, pages[skip:], peer.page_layout, dst_pages)
            self._issue(destination.endpoint, manager.engine.write(peer.engine_name, src, dst))
            self.pages_written += len(dst_pages)
            manager.count_written(len(dst_pages), sum(n for _, n in src))
        self._state = KVPoll.Transferring

    def _write_aux(self, record: AuxRecord) -> None:
        manager = self._manager
        self.aux_slot = manager.take_aux_slot()
        if self.aux_slot is None:
            raise ValueError(f"no free aux slot on prefill rank {manager.rank} ({manager.aux.num_slots} in use)")
        write_aux(manager.aux, self.aux_slot, record)
        src = [(manager.aux.slot_addr(self.aux_slot), record.size)]
        for destination in self._destinations.values():
            if destination.is_dummy:
                continue
            peer = manager.connect(destination.endpoint)
            if record.size > peer.aux_layout.slot_bytes:
                raise ValueError(f"decode rank {destination.decode_rank}'s aux slots hold "
                                 f"{peer.aux_layout.slot_bytes} bytes, the record {record.size}")
            dst = [(peer.aux_layout.slot_addr(destination.aux_slot), record.size)]
            self._issue(destination.endpoint, manager.engine.write(peer.engine_name, src, dst))
        self._aux_issued = True
        self._state = KVPoll.Transferring

    def _poll_write(self, handle: TransferHandle) -> TransferStatus:
        """The write's status; an engine that raises (NIXL does when the peer has disconnected) counts as a
        failed write, so that a dead peer fails the room instead of the worker's thread."""
        try:
            return self._manager.engine.poll(handle)
        except Exception as exc:
            handle.status = TransferStatus.FAILED
            handle.error = f"{type(exc).__name__}: {exc}"
            return TransferStatus.FAILED

    def _issue(self, endpoint: str, handle: TransferHandle) -> None:
        self._handles.append((endpoint, handle))
        if handle.status is TransferStatus.FAILED:
            raise TransferError(f"write to decode peer {endpoint} failed to start: {handle.error}")

    def drain(self, now: float, force: bool = False) -> None:
        """After a failure: wait (at most `fence_s`) for issued writes to finish, release them, then tell every
        decode rank — so that an Abort from here means no write of ours can still land in their pages."""
        if self._drain_deadline is None:
            self._drain_deadline = now + self._manager.timeouts.fence_s
        engine = self._manager.engine
        for endpoint, handle in list(self._handles):
            gone = force or endpoint in self._dead_peers or now > self._drain_deadline
            if gone or self._poll_write(handle) is not TransferStatus.PENDING:
                engine.release(handle)
                self._handles.remove((endpoint, handle))
        if self._handles:
            return
        self._tell_abort()
        self._state = KVPoll.Failed
        self._manager.retire(self, f"failed: {self._failure}")

    # --- manager's background thread and worker thread (manager lock held) --------------------------
    def fail(self, reason: str) -> None:
        """Record the first failure; with no write in flight the decode ranks are told at once (from any
        thread), else after the drain in `poll()`."""
        if self._failure is not None or self._state.is_terminal:
            return
        self._failure = reason
        log.info("room %d failed on prefill rank %d: %s", self.room, self._manager.rank, reason)
        if not self._handles:
            self._tell_abort()

    def _tell_abort(self) -> None:
        for destination in self._destinations.values():
            if not destination.told and destination.endpoint not in self._dead_peers:
                self._manager.send_to(destination.endpoint, Abort, room=self.room, reason=self._failure or "failed")
            destination.told = True

    def add_destination(self, destination: Destination, expected: int, now: float) -> None:
        """A decode rank's request arrived; once all `expected` have, bootstrapping is over."""
        if self._failure is not None or self._state.is_terminal:
            self._manager.send_to(destination.endpoint, Abort, room=self.room, reason=self._failure or "room ended")
            return
        if self._state is not KVPoll.Bootstrapping:
            self.fail(f"decode rank {destination.decode_rank} asked after bootstrapping ended")
            return
        if self._expected is not None and expected != self._expected:
            self.fail(f"decode ranks disagree on how many of them contact this rank ({self._expected}, {expected})")
            return
        self._expected = expected
        self._destinations[destination.endpoint] = destination
        if len(self._destinations) >= expected:
            self._state = KVPoll.WaitingForInput
            self._deadline = now + self._manager.timeouts.transfer_s

    def check_deadline(self, now: float) -> None:
        if self._failure is None and now > self._deadline:
            waited = "every decode rank to ask" if self._state is KVPoll.Bootstrapping else "the room to finish"
            self.fail(f"timed out waiting for {waited} ({self._state.name})")

    def peer_died(self, endpoint: str, reason: str) -> None:
        if endpoint in self._destinations and not self._state.is_terminal:
            self._dead_peers.add(endpoint)
            self.fail(reason)

    @property
    def peers(self) -> set[str]:
        return set(self._destinations) if not self._state.is_terminal else set()
