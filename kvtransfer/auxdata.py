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

# int64 token id, float32 logprob, little-endian; the rest of the slot is left as it was.
_RECORD = struct.Struct("<qf")
AUX_RECORD_BYTES = _RECORD.size


@dataclass(frozen=True)
class AuxRecord:
    first_token_id: int
    logprob: float

    def __post_init__(self) -> None:
        if not isinstance(self.first_token_id, int) or self.first_token_id < 0:
            raise ValueError(f"first_token_id must be a non-negative int, got {self.first_token_id!r}")
        if not isinstance(self.logprob, int | float) or math.isnan(self.logprob):
            raise ValueError(f"logprob must be a number, got {self.logprob!r}")

    def pack(self) -> bytes:
        return _RECORD.pack(self.first_token_id, self.logprob)

    @classmethod
    def unpack(cls, data: bytes) -> AuxRecord:
        token, logprob = _RECORD.unpack(data[:AUX_RECORD_BYTES])
        return cls(token, logprob)


def check_aux(aux: AuxLayout) -> None:
    if aux.slot_bytes < AUX_RECORD_BYTES:
        raise ValueError(f"aux slots of {aux.slot_bytes} bytes cannot hold a {AUX_RECORD_BYTES}-byte record")


def write_aux(aux: AuxLayout, slot: int, record: AuxRecord) -> None:
    """Store `record` at the start of local slot `slot`; on a GPU the bytes are there when this returns (the
    transfer engine reads them on its own stream)."""
    data = record.pack()
    if aux.device == "cpu":
        ctypes.memmove(aux.slot_addr(slot), data, len(data))
        return
    _device_bytes(aux, slot).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    torch.cuda.synchronize(aux.device)


def read_aux(aux: AuxLayout, slot: int) -> AuxRecord:
    """The record at local slot `slot`."""
    if aux.device == "cpu":
        return AuxRecord.unpack(ctypes.string_at(aux.slot_addr(slot), AUX_RECORD_BYTES))
    return AuxRecord.unpack(_device_bytes(aux, slot).cpu().numpy().tobytes())


class _DeviceBytes:
    """`__cuda_array_interface__` of raw device bytes, so torch can view them without owning them."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3}


def _device_bytes(aux: AuxLayout, slot: int) -> torch.Tensor:
    return torch.as_tensor(_DeviceBytes(aux.slot_addr(slot), AUX_RECORD_BYTES), device=aux.device)
