"""Mooncake transfer engine: `mooncake.engine.TransferEngine` with P2P handshake (no metadata server).

Mooncake's Python binding has no non-blocking status check for a batch (`get_batch_transfer_status` spins
until the batch ends), so a write runs `batch_transfer_sync` calls on a small worker pool (the binding
releases the GIL inside) and `poll` looks at the worker's future. A write is split into batches of at most
`max_descs_per_batch` descriptors because the TCP transport refuses batches beyond its per-peer queue
(`MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER`, TRANSPORTS.md); the engine also raises that queue when unset.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from kvtransfer.engines.base import (
    BackendUnavailable,
    Descriptors,
    TransferEngine,
    TransferError,
    TransferHandle,
    TransferStatus,
    descriptor_arrays,
)
from kvtransfer.engines.regions import EngineMetadata, RegionTable

logger = logging.getLogger(__name__)

KIND = "mooncake"
# Per-peer queue of the TCP transport, in transfers; its default (1024) is below one write of small pages.
TCP_QUEUE_ENV = "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER"
INTRANODE_NVLINK_ENV = "MC_INTRANODE_NVLINK"
TCP_QUEUE_DEFAULT = "16384"


def _import_mooncake() -> Any:
    try:
        from mooncake import engine as mooncake_engine
    except (ImportError, OSError) as exc:  # OSError: libibverbs.so.1 missing under the wheel
        raise BackendUnavailable(
            "the mooncake engine needs `mooncake-transfer-engine-non-cuda` (CPU) or "
            f"`mooncake-transfer-engine-cuda13` (GPU), plus libibverbs1/librdmacm1/libnuma1: {exc}"
        ) from None
    return mooncake_engine


class MooncakeEngine(TransferEngine):
    """Mooncake TransferEngine in P2PHANDSHAKE mode; DRAM, and VRAM with a CUDA build; notifications.

    name: this engine's name (peers connect with it; Mooncake itself addresses peers by "host:port").
    hostname: address peers reach this process at (its RPC port is picked by Mooncake).
    protocol: "tcp" (any machine), "rdma" with RDMA NICs, "nvlink_intra" where the wheel supports it.
    device_filter: comma-separated RDMA devices, "" for all.
    max_descs_per_batch: descriptors per Mooncake batch (see module docstring).
    num_workers: threads running batches; writes beyond this many wait in line.
    transfer_timeout_s: Mooncake's per-batch timeout (MC_TRANSFER_TIMEOUT, minimum 5); None keeps the
        environment's value (30 s by default). A dead peer fails a write no later than this.
    """

    kind = KIND

    def __init__(
        self,
        name: str,
        hostname: str = "127.0.0.1",
        protocol: str = "tcp",
        device_filter: str = "",
        max_descs_per_batch: int = 1024,
        num_workers: int = 2,
        transfer_timeout_s: int | None = None,
    ) -> None:
        super().__init__(name)
        if max_descs_per_batch <= 0 or num_workers <= 0:
            raise ValueError("max_descs_per_batch and num_workers must be positive")
        mooncake_engine = _import_mooncake()
        os.environ.setdefault(TCP_QUEUE_ENV, TCP_QUEUE_DEFAULT)
        if transfer_timeout_s is not None:
            # Read once by the binding's constructor: set it right before constructing.
            os.environ["MC_TRANSFER_TIMEOUT"] = str(max(5, int(transfer_timeout_s)))
        if protocol == "nvlink_intra":
            # The wheels pick their transport by auto-discovery (TCP when no RDMA NIC is found) whatever
            # `initialize` is told; this variable is what selects the intra-node NVLink (CUDA IPC) transport
            # (seen with mooncake-transfer-engine-cuda13 0.3.14 on one H100: without it, "Using TCP transport").
            os.environ.setdefault(INTRANODE_NVLINK_ENV, "1")
        self._mc = mooncake_engine
        self._engine = mooncake_engine.TransferEngine()
        if self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_filter) != 0:
            raise TransferError(f"Mooncake could not initialise on {hostname} with protocol {protocol!r}")
        self.session_id = f"{hostname}:{self._engine.get_rpc_port()}"
        self.protocol = protocol
        self.max_descs_per_batch = max_descs_per_batch
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix=f"mooncake-{name}")
        self._local = RegionTable()
        self._peers: dict[str, tuple[bytes, str, RegionTable]] = {}
        # Writes released while still running: Mooncake cannot abort them, so close() waits for them.
        self._orphans: list[Future[None]] = []

    # --- memory -------------------------------------------------------------------------------------
    def register(self, ptr: int, nbytes: int, device: str) -> None:
        self._check_open()
        self._local.add_checked(ptr, nbytes, device)
        location = "cpu:0" if device == "cpu" else device
        if self._engine.register_memory(ptr, nbytes, location) != 0:
            self._local.remove(ptr)
            raise TransferError(f"Mooncake could not register {nbytes} bytes at {ptr:#x} on {device}")

    @property
    def num_registrations(self) -> int:
        return len(self._local)

    # --- peers --------------------------------------------------------------------------------------
    def metadata(self) -> bytes:
        self._check_open()
        return EngineMetadata(
            kind=KIND, name=self.name, native=self.session_id.encode(), regions=list(self._local.regions)
        ).encode()

    def connect(self, peer_name: str, peer_metadata: bytes) -> None:
        self._check_open()
        meta = EngineMetadata.decode_peer(peer_metadata, KIND, peer_name)
        known = self._peers.get(peer_name)
        if known is not None and known[0] == peer_metadata:
            return
        session = meta.native.decode(errors="replace")
        host, _, port = session.rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(f"Mooncake peer {peer_name!r} has a bad session id {session!r}")
        # A probe costs one RPC round trip and turns "wrong address" into an error here, not at the
        # first write.
        if hasattr(self._engine, "send_probe") and self._engine.send_probe(session) != 0:
            raise TransferError(f"Mooncake peer {peer_name!r} at {session} is unreachable")
        self._peers[peer_name] = (bytes(peer_metadata), session, RegionTable(meta.regions))

    def disconnect(self, peer_name: str) -> None:
        self._peers.pop(peer_name, None)

    @property
    def num_peers(self) -> int:
        return len(self._peers)

    # --- transfers ----------------------------------------------------------------------------------
    def write(
        self,
        peer_name: str,
        src: Descriptors | np.ndarray,
        dst: Descriptors | np.ndarray,
        notify: bytes | None = None,
    ) -> TransferHandle:
        self._check_open()
        src_table, dst_table, nbytes = descriptor_arrays(src, dst)
        peer = self._peers.get(peer_name)
        if peer is None:
            raise TransferError(f"{self.name}: not connected to {peer_name!r}")
        _, session, regions = peer
        self._local.check(src_table, "source")
        regions.check(dst_table, f"destination on {peer_name}")
        handle = TransferHandle(peer_name=peer_name, num_descriptors=len(src_table), nbytes=nbytes)
        self._handles[handle.id] = handle
        handle.backend.append(self._pool.submit(self._run_write, session, src_table, dst_table, notify))
        return handle

    def _run_write(self, session: str, src: np.ndarray, dst: np.ndarray, notify: bytes | None) -> None:
        """Worker thread: the batches of one write, in order; raises TransferError on the first failure."""
        step = self.max_descs_per_batch
        for start in range(0, len(src), step):
            srcs = src[start : start + step, 0].tolist()
            dsts = dst[start : start + step, 0].tolist()
            lengths = src[start : start + step, 1].tolist()
            last = start + step >= len(src)
            if last and notify is not None:
                # Notifications ride on the batch; Mooncake carries them as strings.
                message = self._mc.TransferNotify(self.name, notify.decode("latin-1"))
                ret = self._engine.batch_transfer_sync(
                    session, srcs, dsts, lengths, self._mc.TransferOpcode.Write, message
                )
            else:
                ret = self._engine.batch_transfer_sync_write(session, srcs, dsts, lengths)
            if ret != 0:
                raise TransferError(f"Mooncake batch to {session} failed (code {ret})")

    def poll(self, handle: TransferHandle) -> TransferStatus:
        if handle.status is not TransferStatus.PENDING or not handle.backend:
            return handle.status
        future: Future[None] = handle.backend[0]
        if not future.done():
            return TransferStatus.PENDING
        error = future.exception()
        if error is None:
            handle.status = TransferStatus.DONE
        else:
            handle.status = TransferStatus.FAILED
            handle.error = str(error)
        return handle.status

    def release(self, handle: TransferHandle) -> None:
        if self._handles.pop(handle.id, None) is None:
            return
        for future in handle.backend:
            if not future.cancel() and not future.done():
                self._orphans.append(future)
        handle.backend.clear()
        if handle.status is TransferStatus.PENDING:
            handle.status = TransferStatus.FAILED
            handle.error = "released before completion"
        self._orphans = [f for f in self._orphans if not f.done()]

    def notifications(self) -> list[tuple[str, bytes]]:
        self._check_open()
        return [(n.name, n.msg.encode("latin-1")) for n in self._engine.get_notifies()]

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        for handle in list(self._handles.values()):
            self.release(handle)
        for future in self._orphans:
            try:  # bounded by Mooncake's own transfer timeout
                future.exception(timeout=120)
            except FutureTimeout:
                logger.error("%s: a Mooncake write outlived its timeout; closing anyway", self.name)
        self._orphans.clear()
        self._pool.shutdown(wait=True)
        self._peers.clear()
        for region in list(self._local.regions):
            if self._engine.unregister_memory(region.addr) != 0:
                logger.warning("%s: Mooncake could not unregister %#x", self.name, region.addr)
            self._local.remove(region.addr)
        self._closed = True
        self._engine = None  # its destructor closes the segments, here rather than at interpreter exit
