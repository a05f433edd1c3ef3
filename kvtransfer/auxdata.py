"""The record a prefill rank writes into the decode rank's aux slot: the first output token and its logprob.

Aux buffers live in host memory (`AuxLayout.device == "cpu"`): the record is a dozen bytes, written once per
request, and the decode worker reads it on the CPU before its first decode step.
"""

from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import dataclass

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


def check_host_aux(aux: AuxLayout) -> None:
    if aux.device != "cpu":
        raise ValueError(f"aux buffers must be in host memory, got device {aux.device!r}")
    if aux.slot_bytes < AUX_RECORD_BYTES:
        raise ValueError(f"aux slots of {aux.slot_bytes} bytes cannot hold a {AUX_RECORD_BYTES}-byte record")


def write_aux(aux: AuxLayout, slot: int, record: AuxRecord) -> None:
    """Store `record` at the start of local slot `slot` (host memory)."""
    data = record.pack()
    ctypes.memmove(aux.slot_addr(slot), data, len(data))


def read_aux(aux: AuxLayout, slot: int) -> AuxRecord:
    """The record at local slot `slot` (host memory)."""
    return AuxRecord.unpack(ctypes.string_at(aux.slot_addr(slot), AUX_RECORD_BYTES))
