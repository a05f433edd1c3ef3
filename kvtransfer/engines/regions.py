"""Registered memory regions and the metadata an engine hands to its peers.

Both engines wrap their native metadata (NIXL agent metadata, Mooncake session id) in `EngineMetadata`,
which also lists the registered regions, so that a writer checks every destination range against what
the peer registered and fails with a clear message instead of a backend error (or a silent scribble).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np

from kvtransfer.engines.base import TransferError

METADATA_VERSION = 1


def device_index(device: str) -> int:
    """0 for "cpu", N for "cuda:N"; anything else is refused."""
    if device == "cpu":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r}")


@dataclass(frozen=True)
class Region:
    """One registered buffer: [addr, addr + nbytes) on `device`."""

    addr: int
    nbytes: int
    device: str

    @property
    def is_cuda(self) -> bool:
        return self.device != "cpu"


@dataclass
class EngineMetadata:
    """What `TransferEngine.metadata()` returns, msgpack-encoded. `native` is the backend's own blob."""

    kind: str
    name: str
    native: bytes
    regions: list[Region] = field(default_factory=list)
    version: int = METADATA_VERSION

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def decode_peer(cls, data: bytes, expected_kind: str, peer_name: str) -> EngineMetadata:
        """`decode`, also refusing metadata that names another engine than `peer_name`."""
        meta = cls.decode(data, expected_kind)
        if meta.name != peer_name:
            raise TransferError(f"metadata belongs to {expected_kind} engine {meta.name!r}, not {peer_name!r}")
        return meta

    @classmethod
    def decode(cls, data: bytes, expected_kind: str) -> EngineMetadata:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TransferError(f"peer metadata must be bytes, got {type(data).__name__}")
        try:
            meta = msgspec.msgpack.decode(bytes(data), type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TransferError(f"peer metadata is not {expected_kind} engine metadata: {exc}") from None
        if meta.version != METADATA_VERSION:
            raise TransferError(f"peer metadata version {meta.version}, this engine speaks {METADATA_VERSION}")
        if meta.kind != expected_kind:
            raise TransferError(f"peer {meta.name!r} is a {meta.kind} engine, this one is {expected_kind}")
        return meta


class RegionTable:
    """The regions of one side (ours or a peer's); maps descriptor lists to the region each falls in."""

    def __init__(self, regions: list[Region] | None = None) -> None:
        self.regions: list[Region] = list(regions or [])

    def add_checked(self, ptr: int, nbytes: int, device: str) -> Region:
        """Validate a registration and add it (overlaps are refused before the backend sees them)."""
        if nbytes <= 0 or ptr <= 0:
            raise ValueError(f"register needs a positive address and size, got ({ptr:#x}, {nbytes})")
        region = Region(ptr, nbytes, device)
        self.add(region)
        return region

    def add(self, region: Region) -> None:
        for other in self.regions:
            if region.addr < other.addr + other.nbytes and other.addr < region.addr + region.nbytes:
                raise ValueError(f"region {region} overlaps registered region {other}")
        self.regions.append(region)

    def remove(self, addr: int) -> Region:
        for i, region in enumerate(self.regions):
            if region.addr == addr:
                return self.regions.pop(i)
        raise KeyError(f"no region registered at {addr:#x}")

    def __len__(self) -> int:
        return len(self.regions)

    def region_of(self, addr: int, nbytes: int, side: str) -> Region:
        """The region holding [addr, addr + nbytes), or TransferError."""
        for region in self.regions:
            if region.addr <= addr and addr + nbytes <= region.addr + region.nbytes:
                return region
        raise TransferError(f"{side} range ({addr:#x}, {nbytes} bytes) is outside every registered region")

    def single_region(self, table: np.ndarray) -> int | None:
        """Index of a region holding every (addr, nbytes) row, or None: the common, cheap case."""
        low = int(table[:, 0].min())
        high = int((table[:, 0] + table[:, 1]).max())
        for i, region in enumerate(self.regions):
            if region.addr <= low and high <= region.addr + region.nbytes:
                return i
        return None

    def locate(self, table: np.ndarray, side: str) -> np.ndarray:
        """Region index per row of an N x 2 (addr, nbytes) array — or TransferError naming the first
        descriptor that lies outside every region. Vectorised: tens of thousands of descriptors."""
        starts, ends = table[:, 0], table[:, 0] + table[:, 1]
        which = np.full(len(table), -1, dtype=np.int64)
        for i, region in enumerate(self.regions):
            inside = (starts >= region.addr) & (ends <= region.addr + region.nbytes) & (which < 0)
            which[inside] = i
        missing = np.flatnonzero(which < 0)
        if len(missing):
            addr, nbytes = (int(v) for v in table[missing[0]])
            raise TransferError(
                f"{side} range ({addr:#x}, {nbytes} bytes) is outside every registered region "
                f"({len(missing)} of {len(table)} descriptors are)"
            )
        return which

    def devices_of(self, which: np.ndarray) -> list[str]:
        return sorted({self.regions[int(i)].device for i in np.unique(which)})

    def check(self, table: np.ndarray, side: str) -> None:
        """TransferError unless every row lies inside one registered region."""
        if self.single_region(table) is None:
            self.locate(table, side)
