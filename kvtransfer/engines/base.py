"""The interface every transfer engine keeps: register memory, exchange metadata, write (addr, nbytes) lists."""

from __future__ import annotations

import enum
import itertools
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Descriptors = list[tuple[int, int]]  # (address, nbytes) per contiguous range


class TransferError(RuntimeError):
    """A transfer engine operation failed (bad peer metadata, unregistered memory, backend error)."""


class BackendUnavailable(TransferError):
    """The engine's Python package (or the native library under it) is not installed here."""


class TransferStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


_handle_ids = itertools.count(1)


@dataclass(eq=False)
class TransferHandle:
    """One asynchronous write issued by `TransferEngine.write`; poll it, then `release` it.

    peer_name: the engine the bytes go to.
    num_descriptors: (addr, nbytes) pairs the caller passed.
    nbytes: total bytes written.
    status: last status seen by `poll` (FAILED also when issuing failed part-way).
    error: why it failed, when it did.
    backend: the engine's own objects for this write (NIXL xfer handles, Mooncake batch ids).
    """

    peer_name: str
    num_descriptors: int
    nbytes: int
    status: TransferStatus = TransferStatus.PENDING
    error: str | None = None
    backend: list[Any] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_handle_ids))


def descriptor_arrays(src: Descriptors | np.ndarray, dst: Descriptors | np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate a write's descriptor lists; return them as N x 2 int64 arrays (addr, nbytes) and the total
    bytes. Vectorised with few numpy calls: a per-layer write has tens of thousands of descriptors, and a
    one-descriptor write must stay cheap (its fixed cost shows against a GPU copy of a few hundred us)."""
    src_arr = np.asarray(src, dtype=np.int64)
    dst_arr = np.asarray(dst, dtype=np.int64)
    if src_arr.ndim != 2 or src_arr.shape[1:] != (2,):
        src_arr = src_arr.reshape(-1, 2)
    if dst_arr.ndim != 2 or dst_arr.shape[1:] != (2,):
        dst_arr = dst_arr.reshape(-1, 2)
    if len(src_arr) != len(dst_arr):
        raise ValueError(f"src has {len(src_arr)} descriptors, dst {len(dst_arr)}: they must pair up one to one")
    if not len(src_arr):
        raise ValueError("write needs at least one descriptor")
    lengths = src_arr[:, 1]
    if (lengths != dst_arr[:, 1]).any() or (lengths <= 0).any() or (src_arr[:, 0] < 0).any() or (
        dst_arr[:, 0] < 0
    ).any():
        bad = np.flatnonzero(lengths != dst_arr[:, 1])
        if len(bad):
            i = bad[0]
            raise ValueError(
                f"descriptor sizes differ: src {src_arr[i, 1]} bytes at {src_arr[i, 0]:#x}, dst {dst_arr[i, 1]}"
            )
        i = np.flatnonzero((lengths <= 0) | (src_arr[:, 0] < 0) | (dst_arr[:, 0] < 0))[0]
        raise ValueError(f"bad descriptor {i}: src ({src_arr[i, 0]:#x}, {src_arr[i, 1]}), dst ({dst_arr[i, 0]:#x})")
    return src_arr, dst_arr, int(lengths.sum())


# `TransferEngine.wait`: poll back to back (yielding the core) this long, then every WAIT_POLL_S. Writes that
# take longer than the spin are long enough that a 50 us late detection is noise (< 0.1 %).
WAIT_SPIN_S = 0.05
WAIT_POLL_S = 5e-5

# Writes with at most this many descriptors are checked in plain Python: numpy's per-call cost would be
# most of a one-descriptor write's fixed overhead.
SMALL_WRITE = 16


def small_descriptors(
    src: Descriptors | np.ndarray, dst: Descriptors | np.ndarray
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """`descriptor_arrays` for a handful of descriptors: lists of int tuples and the total bytes."""
    src_list = [(int(a), int(n)) for a, n in (src.reshape(-1, 2).tolist() if isinstance(src, np.ndarray) else src)]
    dst_list = [(int(a), int(n)) for a, n in (dst.reshape(-1, 2).tolist() if isinstance(dst, np.ndarray) else dst)]
    if len(src_list) != len(dst_list):
        raise ValueError(f"src has {len(src_list)} descriptors, dst {len(dst_list)}: they must pair up one to one")
    if not src_list:
        raise ValueError("write needs at least one descriptor")
    total = 0
    for i, ((src_addr, src_len), (dst_addr, dst_len)) in enumerate(zip(src_list, dst_list, strict=True)):
        if src_len != dst_len:
            raise ValueError(f"descriptor sizes differ: src {src_len} bytes at {src_addr:#x}, dst {dst_len}")
        if src_len <= 0 or src_addr < 0 or dst_addr < 0:
            raise ValueError(f"bad descriptor {i}: src ({src_addr:#x}, {src_len}), dst ({dst_addr:#x})")
        total += src_len
    return src_list, dst_list, total


class TransferEngine(ABC):
    """Moves bytes from this process's registered memory into a peer process's registered memory.

    Supports: one-sided WRITE of lists of (addr, nbytes) ranges, DRAM ("cpu") and VRAM ("cuda:N"), between
    processes on one host or across hosts, asynchronous with `poll`; optional notifications (NIXL only).
    Attributes: `name` (unique per rank: peers address this engine by it), `kind`, counters `num_inflight_handles`,
    `num_registrations`, `num_peers` (tests check they return to idle).

    Threads: call an engine from one thread at a time (NIXL's agent runs without locks); the engines' own
    worker threads are theirs to manage.

    Lifetime: `register` each pool once at start-up, hand `metadata()` to peers (through the bootstrap
    service), `connect` to the peers you write to, then `write`/`poll`/`release`. Call `close()` explicitly:
    it releases every handle, forgets every peer and deregisters every buffer; releasing native resources
    from a destructor can hang interpreter shutdown, so there is no `__del__`.
    """

    name: str
    kind: str  # "nixl" | "mooncake": which engines can talk to each other

    def __init__(self, name: str) -> None:
        if not name:
            raise ValueError("engine name must be non-empty")
        self.name = name
        self._closed = False
        self._handles: dict[int, TransferHandle] = {}

    # --- memory -------------------------------------------------------------------------------------
    @abstractmethod
    def register(self, ptr: int, nbytes: int, device: str) -> None:
        """Register [ptr, ptr + nbytes) on `device` ("cpu" | "cuda:N") as a source and destination."""

    # --- peers --------------------------------------------------------------------------------------
    @abstractmethod
    def metadata(self) -> bytes:
        """What a peer passes to `connect` to reach this engine and write into its registered memory.

        Call after `register`: NIXL's metadata carries the registrations (register later, publish again).
        """

    @abstractmethod
    def connect(self, peer_name: str, peer_metadata: bytes) -> None:
        """Make `peer_name` writable; a no-op if already connected with the same metadata."""

    @abstractmethod
    def disconnect(self, peer_name: str) -> None:
        """Forget a peer (its in-flight writes fail or finish; release them as usual). Unknown: no-op."""

    # --- transfers ----------------------------------------------------------------------------------
    @abstractmethod
    def write(
        self,
        peer_name: str,
        src: Descriptors | np.ndarray,
        dst: Descriptors | np.ndarray,
        notify: bytes | None = None,
    ) -> TransferHandle:
        """Start writing src[i] (local) into dst[i] (peer's) for every i; returns at once.

        Pairs must have equal sizes; callers coalesce consecutive pages first (`layout.page_descriptors`).
        src/dst may also be N x 2 integer arrays (addr, nbytes): no per-descriptor Python work then.
        `notify` is delivered to the peer's `notifications()` after the bytes, where the engine can.
        """

    @abstractmethod
    def poll(self, handle: TransferHandle) -> TransferStatus:
        """Current status of a write; never blocks."""

    @abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Free a write's native resources (aborting it if still pending). Idempotent."""

    def notifications(self) -> list[tuple[str, bytes]]:
        """(peer_name, message) pairs received since the last call. Engines without notifications: []."""
        return []

    def progress(self) -> None:
        """Let the backend serve writes that peers make INTO this engine's memory; cheap, never blocks.

        An engine without a progress thread of its own (NIXL with `progress_thread=False`) completes a
        write it is the target of only while its owner calls this: UCX over TCP emulates RMA with active
        messages that the target's worker must handle. So a rank waiting for incoming writes calls it
        every turn of its loop (the decode side does, in `KVReceiver.poll`). Writers need not: `poll` of
        a write progresses the writing side. Engines that need nothing from the caller: a no-op.
        """
        return None

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        """Poll until DONE or FAILED, or raise TimeoutError after `timeout_s` (a bounded wait, for tests/tools).

        Polls back to back for the first `WAIT_SPIN_S`, yielding the core between polls, then every
        `WAIT_POLL_S`. An earlier version slept with a growing backoff (up to 1 ms) after 50 polls: a
        288 MB GPU write (~0.3 ms) was then seen up to ~0.1 ms late and a 2.3 GB one ~0.5 ms late, which
        alone held NIXL at 0.64-0.66x of `copy_` on one H100 (bench/results/kv_transfer_cuda_h100_nixl.json).
        `os.sched_yield` rather than a sleep keeps the detection exact while still handing the core to a
        runnable peer or backend thread (on one host, UCX over TCP needs the target process to run)."""
        deadline = time.monotonic() + timeout_s
        spin_until = time.monotonic() + WAIT_SPIN_S
        while True:
            status = self.poll(handle)
            if status is not TransferStatus.PENDING:
                return status
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{self.name}: write {handle.id} to {handle.peer_name} still pending")
            if now < spin_until:
                os.sched_yield()
            else:
                time.sleep(WAIT_POLL_S)

    # --- counters and lifetime ----------------------------------------------------------------------
    @property
    def num_inflight_handles(self) -> int:
        """Handles issued and not yet released (DONE but unreleased ones count: they hold resources)."""
        return len(self._handles)

    @property
    @abstractmethod
    def num_registrations(self) -> int: ...

    @property
    @abstractmethod
    def num_peers(self) -> int: ...

    @abstractmethod
    def close(self) -> None:
        """Release every handle, disconnect every peer, deregister every buffer. Idempotent."""

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"transfer engine {self.name} is closed")

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
