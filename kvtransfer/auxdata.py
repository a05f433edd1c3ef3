"""The record a prefill rank writes into the decode rank's aux slot: the first output token and its logprob.

Aux buffers live in host memory (`AuxLayout.device == "cpu"`) wherever the transfer engine can reach it: the
record is a dozen bytes, written once per request, and the decode worker reads it on the CPU before its
first decode step. A transport that moves GPU memory only (Mooncake's intra-node NVLink) gets them on the
GPU of the KV pool instead; reading and writing a slot is then a synchronous copy of those bytes.
"""

from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import dataclass

import torch

from kvtransfer.layout import AuxLayout

# Little-endian: int64 token id, float32 logprob, uint16 number of alternatives, then that many
# (int32 token id, float32 logprob) pairs; the rest of the slot is left as it was.
_HEADER = struct.Struct("<qfH")
_PAIR = struct.Struct("<if")
AUX_RECORD_BYTES = _HEADER.size  # the smallest record: no alternatives
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


def aux_slot_bytes(top_logprobs: int) -> int:
    """Slot size for records with up to `top_logprobs` alternatives."""
    return AUX_RECORD_BYTES + top_logprobs * _PAIR.size


@dataclass(frozen=True)
class AuxRecord:
    """The first output token, its logprob and, when asked for, the most likely alternatives at that position
    (token id, logprob), best first."""

    first_token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.first_token_id, int) or self.first_token_id < 0:
            raise ValueError(f"first_token_id must be a non-negative int, got {self.first_token_id!r}")
        if not isinstance(self.logprob, int | float) or math.isnan(self.logprob):
            raise ValueError(f"logprob must be a number, got {self.logprob!r}")
        if len(self.top) > MAX_TOP_LOGPROBS:
            raise ValueError(f"at most {MAX_TOP_LOGPROBS} alternatives, got {len(self.top)}")

    @property
    def size(self) -> int:
        return aux_slot_bytes(len(self.top))

    def pack(self) -> bytes:
        pairs = b"".join(_PAIR.pack(int(t), float(lp)) for t, lp in self.top)
        return _HEADER.pack(self.first_token_id, self.logprob, len(self.top)) + pairs

    @classmethod
    def unpack(cls, data: bytes) -> AuxRecord:
        token, logprob, n = _HEADER.unpack(data[:AUX_RECORD_BYTES])
        if n > MAX_TOP_LOGPROBS or len(data) < aux_slot_bytes(n):
            raise ValueError(f"aux record claims {n} alternatives in {len(data)} bytes")
        top = tuple(_PAIR.unpack_from(data, AUX_RECORD_BYTES + i * _PAIR.size) for i in range(n))
        return cls(token, logprob, top)


def check_aux(aux: AuxLayout) -> None:
    if aux.slot_bytes < AUX_RECORD_BYTES:
        raise ValueError(f"aux slots of {aux.slot_bytes} bytes cannot hold a {AUX_RECORD_BYTES}-byte record")


def write_aux(aux: AuxLayout, slot: int, record: AuxRecord) -> None:
    """Store `record` at the start of local slot `slot`; on a GPU the bytes are there when this returns (the
    transfer engine reads them on its own stream). ValueError when it does not fit the slot."""
    data = record.pack()
    if len(data) > aux.slot_bytes:
        raise ValueError(f"an aux record of {len(data)} bytes ({len(record.top)} alternatives) does not fit "
                         f"{aux.slot_bytes}-byte aux slots")
    if aux.device == "cpu":
        ctypes.memmove(aux.slot_addr(slot), data, len(data))
        return
    _device_bytes(aux, slot, len(data)).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    torch.cuda.synchronize(aux.device)


def read_aux(aux: AuxLayout, slot: int) -> AuxRecord:
    """The record at local slot `slot`."""
    if aux.device == "cpu":
        return AuxRecord.unpack(ctypes.string_at(aux.slot_addr(slot), aux.slot_bytes))
    return AuxRecord.unpack(_device_bytes(aux, slot, aux.slot_bytes).cpu().numpy().tobytes())


class _DeviceBytes:
    """`__cuda_array_interface__` of raw device bytes, so torch can view them without owning them."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3}


def _device_bytes(aux: AuxLayout, slot: int, nbytes: int) -> torch.Tensor:
    return torch.as_tensor(_DeviceBytes(aux.slot_addr(slot), nbytes), device=aux.device)
