"""What the prefill and decode managers share: a rank's identity, its control channel, the background thread
that reads it, peer liveness (heartbeats) and the memory of finished rooms.

The background thread only reads messages, updates room state under the manager's lock, sends heartbeats
and fires timeouts. It never calls the transfer engine: engine calls happen on the worker's thread (inside
`send`, `poll`, `abort`), so an engine never sees two threads.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from kvtransfer.auxdata import check_aux
from kvtransfer.bootstrap_client import BootstrapClient
from kvtransfer.channel import ControlChannel
from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.mapping import ParallelLayout
from kvtransfer.messages import ControlMessage, Heartbeat
from kvtransfer.state import KVTimeouts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    """Which rank of which instance this process is, and the address peers reach its control channel at."""

    rank: int
    tp_size: int
    dp_size: int = 1
    host: str = "127.0.0.1"
    # The model this rank serves (`engine.fingerprint`: opaque here); peers must serve the same one.
    model_fingerprint: str = ""
    # The deployment's key its control channel signs and checks frames with (`ControlChannel`); None: open.
    control_key: str | None = field(default=None, repr=False)
    mla_core: bool = False  # MLA-core data parallelism: each room's KV on one rank (kvtransfer.mapping)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.parallel.tp_size:
            raise ValueError(f"rank {self.rank} out of range [0, {self.tp_size})")

    @property
    def parallel(self) -> ParallelLayout:
        return ParallelLayout(self.tp_size, self.dp_size, self.mla_core)

    @property
    def dp_rank(self) -> int:
        return self.parallel.dp_rank_of(self.rank)


def model_mismatch(mine: str, theirs: str) -> str | None:
    """Why a peer with model fingerprint `theirs` serves another model than `mine`, or None. Fingerprints
    are `part=value` items (`engine.fingerprint`): the refusal names the parts that differ."""
    if mine == theirs:
        return None
    ours = dict(p.split("=", 1) for p in mine.split() if "=" in p)
    peer = dict(p.split("=", 1) for p in theirs.split() if "=" in p)
    differ = [f"{k} {ours.get(k, '(none)')} here, {peer.get(k, '(none)')} on the peer"
              for k in sorted(ours.keys() | peer.keys()) if ours.get(k) != peer.get(k)]
    return "the peer serves another model: " + ("; ".join(differ) or f"{mine!r} here, {theirs!r} there")


class RoomManager:
    """Base of `KVSendManager` and `KVReceiveManager`: owns the channel and the background thread.

    Subclasses implement `_on_message`, `_on_tick`, `_live_peers` and `_on_peer_dead`; all four run on the
    background thread with `self.lock` held. Attributes: `session` (random per manager: a restarted rank
    is a new session), `endpoint` (this rank's control endpoint), `layout`, `aux`, `rank`, `timeouts`,
    `client` (the bootstrap client: the one passed in, or a new one).
    """

    # How long the background thread waits for a message before checking timers.
    _TICK_S = 0.02

    def __init__(
        self,
        layout: PageLayout,
        aux: AuxLayout,
        rank_info: RankInfo,
        timeouts: KVTimeouts | None,
        bootstrap_client: BootstrapClient | None,
    ) -> None:
        check_aux(aux)  # before the channel exists: a bad aux buffer leaks nothing
        self.layout = layout
        self.aux = aux
        self.rank_info = rank_info
        self.rank = rank_info.rank
        self.timeouts = timeouts = timeouts or KVTimeouts()
        self.client = bootstrap_client or BootstrapClient(timeouts.http_s)
        self._owns_client = bootstrap_client is None  # a shared client is closed by whoever made it
        self.session = uuid.uuid4().hex
        self.channel = ControlChannel(rank_info.host, key=rank_info.control_key)
        self.endpoint = self.channel.endpoint
        self.lock = threading.RLock()
        self._last_heard: dict[str, float] = {}
        self._peer_sessions: dict[str, str] = {}
        self._tombstones: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-control-{rank_info.rank}", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    # --- for subclasses -----------------------------------------------------------------------------
    def _on_message(self, message: ControlMessage, now: float) -> None:
        raise NotImplementedError

    def _on_tick(self, now: float) -> None:
        raise NotImplementedError

    def _live_peers(self) -> set[str]:
        """Endpoints of the peers we share a live room with (heartbeated and watched)."""
        raise NotImplementedError

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        raise NotImplementedError

    def send_message(self, endpoint: str, message: ControlMessage) -> bool:
        return self.channel.send(endpoint, message)

    def _layout_mismatch(self, page_layout: PageLayout, aux_layout: AuxLayout, fingerprint: str) -> str | None:
        """Why a peer with these layouts and this model fingerprint cannot exchange pages with this rank,
        or None if it can."""
        why = model_mismatch(self.rank_info.model_fingerprint, fingerprint)
        if why is None:
            why = self.layout.compatible_with(page_layout)
        if why is None and aux_layout.slot_bytes != self.aux.slot_bytes:
            why = f"aux slots of {self.aux.slot_bytes} bytes here, {aux_layout.slot_bytes} on the peer"
        return why

    def _expect_session(self, endpoint: str, session: str) -> None:
        """Remember which session the peer at `endpoint` runs; a message from another one means it restarted."""
        self._peer_sessions[endpoint] = session

    def heard_recently(self, endpoint: str, now: float) -> bool:
        """Whether the peer at `endpoint` spoke within half the peer timeout (lock held). A writer asks
        before each write: a peer that has not been heard from that long may have declared *us* dead and
        given the room's pages to another request, so writing could corrupt it. Live peers heartbeat
        every `heartbeat_interval_s` (at most a quarter of the timeout); a peer never heard yet (its
        request is being handled) counts as heard."""
        last = self._last_heard.get(endpoint)
        return last is None or now - last <= self.timeouts.peer_timeout_s / 2

    def _bury(self, room: int, reason: str) -> None:
        """Remember a finished room for `tombstone_s`, to answer late messages about it."""
        self._tombstones[room] = (time.monotonic() + self.timeouts.tombstone_s, reason)

    def _tombstone(self, room: int) -> str | None:
        entry = self._tombstones.get(room)
        return entry[1] if entry else None

    # --- background thread --------------------------------------------------------------------------
    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            message = self.channel.recv(self._TICK_S)
            # One lock hold for everything queued: a rank resumed after a stall (SIGSTOP, GC, partition)
            # sees its peers' queued heartbeats and their aborts together, never fresh heartbeats without
            # the abort that followed them (see `heard_recently`).
            with self.lock:
                while message is not None:
                    self._dispatch(message)
                    message = self.channel.recv(0)
            now = time.monotonic()
            with self.lock:
                try:
                    if now >= next_beat:
                        next_beat = now + self.timeouts.heartbeat_interval_s
                        self._beat()
                    self._check_peers(now)
                    self._on_tick(now)
                    self._tombstones = {r: e for r, e in self._tombstones.items() if e[0] > now}
                except Exception:  # a bug here must be loud, not a silently dead control thread
                    log.exception("kv control thread of rank %d: tick failed", self.rank_info.rank)

    def _dispatch(self, message: ControlMessage) -> None:
        now = time.monotonic()
        known = self._peer_sessions.get(message.sender)
        if known is not None and known != message.session:
            self._on_peer_dead(message.sender, f"peer {message.sender} restarted (new session)")
            self._peer_sessions[message.sender] = message.session
        self._last_heard[message.sender] = now
        if isinstance(message, Heartbeat):
            return
        try:
            self._on_message(message, now)
        except Exception:
            log.exception("kv control thread of rank %d: handling %s failed", self.rank_info.rank, message)

    def _beat(self) -> None:
        beat = Heartbeat(sender=self.endpoint, session=self.session)
        for endpoint in self._live_peers():
            self.send_message(endpoint, beat)

    def _check_peers(self, now: float) -> None:
        live = self._live_peers()
        for endpoint in list(self._last_heard):
            if endpoint not in live:
                del self._last_heard[endpoint]  # a peer becoming live again gets a fresh grace period
        for endpoint in live:
            silent = now - self._last_heard.setdefault(endpoint, now)
            if silent > self.timeouts.peer_timeout_s:
                del self._last_heard[endpoint]
                self._on_peer_dead(endpoint, f"peer {endpoint} silent for {silent:.1f} s")

    # --- lifetime -----------------------------------------------------------------------------------
    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._owns_client:
            self.client.close()  # joins its lookup refreshes

    @property
    def num_tombstones(self) -> int:
        return len(self._tombstones)
