"""NIXL transfer engine: one NIXL agent (UCX backend) per rank; WRITEs with optional notifications.

UCX picks the transport per pair of memories: `cuda_ipc` between processes on one host for VRAM, `rc`/`dc`
over RDMA NICs; DRAM between processes of one host without RDMA went through `cma` (zero-copy
process_vm_writev) here, `tcp` across hosts. The cost of a write is
mostly per descriptor (TRANSPORTS.md), so callers coalesce pages and `write` posts all descriptors of a
call in as few NIXL requests as `max_descs_per_request` allows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kvtransfer.engines.base import (
    SMALL_WRITE,
    BackendUnavailable,
    Descriptors,
    TransferEngine,
    TransferError,
    TransferHandle,
    TransferStatus,
    descriptor_arrays,
    small_descriptors,
)
from kvtransfer.engines.regions import EngineMetadata, RegionTable, device_index

logger = logging.getLogger(__name__)

KIND = "nixl"


def _import_nixl() -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as exc:
        raise BackendUnavailable(f"the nixl engine needs the `nixl` package (pip install nixl): {exc}") from None
    return nixl_agent, nixl_agent_config


def _mem_type(device: str) -> str:
    return "DRAM" if device == "cpu" else "VRAM"


def _split(
    src: list[tuple[int, int]], dst: list[tuple[int, int]], piece: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut every descriptor pair longer than `piece` bytes into pieces of at most `piece` bytes."""
    out_src: list[tuple[int, int]] = []
    out_dst: list[tuple[int, int]] = []
    for (src_addr, nbytes), (dst_addr, _) in zip(src, dst, strict=True):
        for offset in range(0, nbytes, piece):
            length = min(piece, nbytes - offset)
            out_src.append((src_addr + offset, length))
            out_dst.append((dst_addr + offset, length))
    return out_src, out_dst


class NixlEngine(TransferEngine):
    """NIXL agent with the UCX backend; DRAM and VRAM; notifications supported.

    name: the NIXL agent name (unique per rank; peers must connect with exactly this name).
    num_threads: UCX backend worker threads (0: none, descriptors posted by the caller's thread). Threads
        post the descriptors of one request in parallel: on one H100 (bench/results/kv_transfer_cuda_h100_*)
        4 threads lifted 72 KiB descriptors from 5.5 to 20 GB/s and 1.1 MiB ones from 75 to 150 GB/s,
        and cost nothing on single large descriptors; splitting those (split_bytes) did not help.
    max_descs_per_request: split a write into NIXL requests of at most this many descriptors (0: one
        request for the whole write).
    split_bytes: in a write of few descriptors, cut each one larger than this into pieces, so that the
        UCX worker threads (`num_threads`) copy the pieces of one large run in parallel (0: never).
    backends: NIXL backends to create; UCX unless you know better.
    progress_thread: run NIXL's progress thread. Off by default: the bindings start it with no delay
        between polls, so it spins a whole core per agent even when idle (seen: ~100 % of a core, mostly
        system time, per idle rank on the 2-core CPU machine). Without it, the writer's `poll` progresses
        its own side and the target must call `progress()` while it waits for incoming writes (UCX over
        TCP emulates RMA with active messages the target handles). Turn it on where no one calls
        `progress()` on the target and the transport needs the target (not for cuda_ipc/RDMA, which are
        one-sided), or to trade a core per rank for latency.
    """

    kind = KIND

    def __init__(
        self,
        name: str,
        num_threads: int = 4,
        max_descs_per_request: int = 0,
        split_bytes: int = 0,
        backends: tuple[str, ...] = ("UCX",),
        progress_thread: bool = False,
    ) -> None:
        super().__init__(name)
        if num_threads < 0 or max_descs_per_request < 0 or split_bytes < 0:
            raise ValueError("num_threads, max_descs_per_request and split_bytes must be >= 0")
        nixl_agent, nixl_agent_config = _import_nixl()
        config = nixl_agent_config(
            enable_prog_thread=progress_thread, backends=list(backends), num_threads=num_threads
        )
        try:
            self._agent = nixl_agent(name, config)
        except Exception as exc:  # the bindings raise their own exception types
            raise TransferError(f"could not create NIXL agent {name!r}: {exc}") from exc
        missing = [b for b in backends if b not in self._agent.backends]
        if missing:
            raise BackendUnavailable(f"NIXL agent {name!r}: backend(s) {missing} not available here")
        self.num_threads = num_threads
        self.max_descs_per_request = max_descs_per_request
        self.split_bytes = split_bytes
        self.progress_thread = progress_thread
        # Notifications collected by `progress()` (which must drain them to make UCX progress) until
        # `notifications()` hands them out.
        self._notifs: list[tuple[str, bytes]] = []
        self._local = RegionTable()
        self._reg_descs: dict[int, Any] = {}  # region addr -> nixlRegDList, for deregistration
        self._peers: dict[str, tuple[bytes, RegionTable]] = {}

    # --- memory -------------------------------------------------------------------------------------
    def register(self, ptr: int, nbytes: int, device: str) -> None:
        self._check_open()
        self._local.add_checked(ptr, nbytes, device)
        try:
            descs = self._agent.get_reg_descs([(ptr, nbytes, device_index(device), "")], _mem_type(device))
            self._agent.register_memory(descs)
        except Exception as exc:
            self._local.remove(ptr)
            raise TransferError(f"NIXL could not register {nbytes} bytes at {ptr:#x} on {device}: {exc}") from exc
        self._reg_descs[ptr] = descs

    @property
    def num_registrations(self) -> int:
        return len(self._reg_descs)

    # --- peers --------------------------------------------------------------------------------------
    def metadata(self) -> bytes:
        self._check_open()
        native = bytes(self._agent.get_agent_metadata())
        return EngineMetadata(kind=KIND, name=self.name, native=native, regions=list(self._local.regions)).encode()

    def connect(self, peer_name: str, peer_metadata: bytes) -> None:
        self._check_open()
        meta = EngineMetadata.decode_peer(peer_metadata, KIND, peer_name)
        if peer_name == self.name:
            raise TransferError(f"NIXL agent {self.name!r} cannot connect to itself")
        known = self._peers.get(peer_name)
        if known is not None:
            if known[0] == peer_metadata:
                return
            self.disconnect(peer_name)  # the peer restarted or registered more memory: reload it
        try:
            loaded = self._agent.add_remote_agent(meta.native)
        except Exception as exc:
            raise TransferError(f"NIXL could not load metadata of {peer_name!r}: {exc}") from exc
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != peer_name:
            self._agent.remove_remote_agent(loaded)
            raise TransferError(f"NIXL metadata names agent {loaded!r}, expected {peer_name!r}")
        self._peers[peer_name] = (bytes(peer_metadata), RegionTable(meta.regions))

    def disconnect(self, peer_name: str) -> None:
        if self._peers.pop(peer_name, None) is None:
            return
        try:
            self._agent.remove_remote_agent(peer_name)
        except Exception as exc:  # the peer may be gone already; forgetting it locally is what matters
            logger.debug("NIXL remove_remote_agent(%s): %s", peer_name, exc)

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
        peer = self._peers.get(peer_name)
        src_rows: np.ndarray | list[tuple[int, int, int]]
        dst_rows: np.ndarray | list[tuple[int, int, int]]
        if len(src) <= SMALL_WRITE:
            src_list, dst_list, nbytes = small_descriptors(src, dst)
            if self.split_bytes:
                src_list, dst_list = _split(src_list, dst_list, self.split_bytes)
            if peer is None:
                raise TransferError(f"{self.name}: not connected to {peer_name!r}")
            src_rows, src_mem = self._small_rows(src_list, self._local, "source")
            dst_rows, dst_mem = self._small_rows(dst_list, peer[1], f"destination on {peer_name}")
        else:
            src_table, dst_table, nbytes = descriptor_arrays(src, dst)
            if peer is None:
                raise TransferError(f"{self.name}: not connected to {peer_name!r}")
            src_rows, src_mem = self._rows(src_table, self._local, "source")
            dst_rows, dst_mem = self._rows(dst_table, peer[1], f"destination on {peer_name}")

        handle = TransferHandle(peer_name=peer_name, num_descriptors=len(src_rows), nbytes=nbytes)
        self._handles[handle.id] = handle
        step = self.max_descs_per_request or len(src_rows)
        starts = list(range(0, len(src_rows), step))
        try:
            for i, start in enumerate(starts):
                # The notification rides on the last request. Requests are independent in UCX, so on
                # a multi-rail transport it may arrive before earlier requests land: with several
                # requests per write, treat it as a hint and poll the handle for completion.
                message = notify if (notify is not None and i == len(starts) - 1) else b""
                local = self._agent.get_xfer_descs(src_rows[start : start + step], src_mem)
                remote = self._agent.get_xfer_descs(dst_rows[start : start + step], dst_mem)
                xfer = self._agent.initialize_xfer("WRITE", local, remote, peer_name, message)
                handle.backend.append(xfer)
                if self._agent.transfer(xfer, message) == "ERR":
                    raise TransferError(f"NIXL refused to post a write to {peer_name!r}")
        except Exception as exc:
            handle.status = TransferStatus.FAILED
            handle.error = str(exc)
            logger.warning("%s: write to %s failed while posting: %s", self.name, peer_name, exc)
        return handle

    @staticmethod
    def _small_rows(
        descs: list[tuple[int, int]], regions: RegionTable, side: str
    ) -> tuple[list[tuple[int, int, int]], str]:
        rows, mem_types = [], set()
        for addr, nbytes in descs:
            region = regions.region_of(addr, nbytes, side)
            rows.append((addr, nbytes, device_index(region.device)))
            mem_types.add(_mem_type(region.device))
        if len(mem_types) != 1:
            raise TransferError(f"{side} descriptors mix DRAM and VRAM: issue one write per kind")
        return rows, mem_types.pop()

    @staticmethod
    def _rows(table: np.ndarray, regions: RegionTable, side: str) -> tuple[np.ndarray, str]:
        """N x 3 uint64 (addr, nbytes, device index) as NIXL's descriptor lists take them, and the memory
        type ("DRAM" | "VRAM") they all share; TransferError for ranges outside registered memory."""
        rows = np.empty((len(table), 3), dtype=np.uint64)
        rows[:, :2] = table
        region = regions.single_region(table)
        if region is not None:
            device = regions.regions[region].device
            rows[:, 2] = device_index(device)
            return rows, _mem_type(device)
        which = regions.locate(table, side)
        devices = regions.devices_of(which)
        if len({_mem_type(d) for d in devices}) != 1:
            raise TransferError(f"{side} descriptors mix DRAM and VRAM ({devices}): issue one write per kind")
        rows[:, 2] = np.array([device_index(r.device) for r in regions.regions], dtype=np.uint64)[which]
        return rows, _mem_type(devices[0])

    def poll(self, handle: TransferHandle) -> TransferStatus:
        if handle.status is not TransferStatus.PENDING or self._closed:
            return handle.status
        done = 0
        for xfer in handle.backend:
            state = self._agent.check_xfer_state(xfer)
            if state == "ERR":
                handle.status = TransferStatus.FAILED
                handle.error = f"NIXL reported an error writing to {handle.peer_name}"
                return handle.status
            done += state == "DONE"
        if done == len(handle.backend):
            handle.status = TransferStatus.DONE
        return handle.status

    def release(self, handle: TransferHandle) -> None:
        if self._handles.pop(handle.id, None) is None:
            return
        for xfer in handle.backend:
            try:
                self._agent.release_xfer_handle(xfer)
            except Exception as exc:  # a transfer UCX cannot cancel; NIXL frees it with the agent
                logger.warning("%s: releasing a NIXL request to %s: %s", self.name, handle.peer_name, exc)
        handle.backend.clear()
        if handle.status is TransferStatus.PENDING:
            handle.status = TransferStatus.FAILED
            handle.error = "released before completion"

    def notifications(self) -> list[tuple[str, bytes]]:
        self._check_open()
        self.progress()
        received, self._notifs = self._notifs, []
        return received

    def progress(self) -> None:
        # Fetching notifications is the bindings' cheapest call that runs the UCX workers' progress
        # (a few microseconds when idle); whatever it returns is kept for `notifications()`.
        if self._closed:
            return
        for peer, messages in self._agent.get_new_notifs().items():
            self._notifs.extend((peer, bytes(msg)) for msg in messages)

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        for handle in list(self._handles.values()):
            self.release(handle)
        for peer_name in list(self._peers):
            self.disconnect(peer_name)
        for addr, descs in list(self._reg_descs.items()):
            try:
                self._agent.deregister_memory(descs)
            except Exception as exc:
                logger.warning("%s: deregistering %#x: %s", self.name, addr, exc)
            del self._reg_descs[addr]
            self._local.remove(addr)
        self._closed = True
        # Dropping the agent here (not in a finalizer) tears down UCX while the interpreter is healthy.
        self._agent = None
