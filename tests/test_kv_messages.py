"""Control-plane messages: typed, versioned, and decoding rejects anything that is not exactly one of them."""

from __future__ import annotations

import ctypes

import msgspec
import pytest
import torch

from kvtransfer.auxdata import AUX_RECORD_BYTES, AuxRecord, check_aux, read_aux, write_aux
from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.messages import (
    PROTOCOL_VERSION,
    Abort,
    DecodeIntro,
    Heartbeat,
    RankRegistration,
    TransferDone,
    TransferRequest,
    decode_control,
    decode_json,
    encode_control,
    encode_json,
)
from kvtransfer.state import KVProtocolError

LAYOUT = PageLayout(num_pages=8, num_layers=3, page_size=4, token_dim=16, itemsize=2, dtype="bfloat16", base_ptr=4096)
AUX = AuxLayout(base_ptr=8192, slot_bytes=16, num_slots=4)


def _request(**overrides: object) -> TransferRequest:
    fields: dict[str, object] = dict(
        sender="tcp://127.0.0.1:5000",
        session="d-session",
        room=2**62 + 7,
        prefill_session="p-session",
        decode_rank=1,
        is_dummy=False,
        dst_pages=[5, 6, 9],
        aux_slot=3,
        num_decode_peers=2,
        intro=DecodeIntro(engine_name="d1", engine_metadata=b"\x00meta", page_layout=LAYOUT, aux_layout=AUX),
    )
    fields.update(overrides)
    return TransferRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        _request(),
        _request(intro=None, is_dummy=True, dst_pages=[]),
        _request(intro=None, held_pages=2),
        TransferDone(sender="tcp://h:1", session="s", room=9, prefill_rank=3),
        Abort(sender="tcp://h:1", session="s", room=9, reason="client went away"),
        Heartbeat(sender="tcp://h:1", session="s"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_control_message_survives_the_wire_unchanged(message: object) -> None:
    assert decode_control(encode_control(message)) == message  # type: ignore[arg-type]


def test_registration_round_trips_through_json_with_bytes_and_layouts() -> None:
    registration = RankRegistration(
        rank=1, tp_size=2, dp_size=1, session="s", control_endpoint="tcp://h:2", engine_kind="nixl",
        engine_name="p1", engine_metadata=bytes(range(256)), page_layout=LAYOUT, aux_layout=AUX,
    )
    assert decode_json(encode_json(registration), RankRegistration) == registration


def _raw(message: object) -> dict:
    """The message as the plain dict the wire carries (bytes stay bytes)."""
    return msgspec.msgpack.decode(encode_control(message))  # type: ignore[arg-type]


def test_unknown_message_type_is_rejected_by_name() -> None:
    frame = msgspec.msgpack.encode({"type": "Shutdown", "sender": "x", "session": "s"})
    with pytest.raises(KVProtocolError, match="Shutdown"):
        decode_control(frame)


def test_unknown_field_is_rejected() -> None:
    raw = _raw(TransferDone(sender="x", session="s", room=1, prefill_rank=0))
    raw["surprise"] = 1
    with pytest.raises(KVProtocolError, match="surprise"):
        decode_control(msgspec.msgpack.encode(raw))


def test_missing_or_mistyped_field_is_rejected() -> None:
    raw = _raw(TransferDone(sender="x", session="s", room=1, prefill_rank=0))
    del raw["room"]
    with pytest.raises(KVProtocolError, match="room"):
        decode_control(msgspec.msgpack.encode(raw))
    raw["room"] = "seven"
    with pytest.raises(KVProtocolError, match="room"):
        decode_control(msgspec.msgpack.encode(raw))


def test_other_protocol_version_is_named_as_such() -> None:
    old = Heartbeat(sender="x", session="s", version=PROTOCOL_VERSION + 1)
    with pytest.raises(KVProtocolError, match=f"version {PROTOCOL_VERSION + 1}"):
        decode_control(encode_control(old))
    newer = _raw(Heartbeat(sender="x", session="s"))
    newer.update(version=PROTOCOL_VERSION + 1, new_field=True)
    with pytest.raises(KVProtocolError, match="protocol version"):
        decode_control(msgspec.msgpack.encode(newer))


def test_garbage_bytes_and_bad_layouts_are_rejected() -> None:
    with pytest.raises(KVProtocolError):
        decode_control(b"\xc1\xc1 not msgpack")
    raw = _raw(_request())
    raw["intro"]["page_layout"]["page_size"] = 0
    with pytest.raises(KVProtocolError, match="page_size"):
        decode_control(msgspec.msgpack.encode(raw))
    with pytest.raises(KVProtocolError):
        decode_json(b'{"type": "RankRegistration"}', RankRegistration)


def test_only_control_messages_go_on_the_control_channel() -> None:
    with pytest.raises(TypeError):
        encode_control(DecodeIntro(engine_name="d", engine_metadata=b"", page_layout=LAYOUT, aux_layout=AUX))  # type: ignore[arg-type]


def test_aux_record_is_written_into_and_read_from_host_slots() -> None:
    buffer = (ctypes.c_uint8 * 64)()
    aux = AuxLayout(base_ptr=ctypes.addressof(buffer), slot_bytes=16, num_slots=4)
    check_aux(aux)
    write_aux(aux, 2, AuxRecord(first_token_id=128_000, logprob=-0.25))
    assert read_aux(aux, 2) == AuxRecord(128_000, -0.25)
    assert bytes(buffer[:32]) == bytes(32) and bytes(buffer[32 + AUX_RECORD_BYTES:]) == bytes(64 - 32 - AUX_RECORD_BYTES)
    with pytest.raises(IndexError):
        write_aux(aux, 4, AuxRecord(1, 0.0))
    with pytest.raises(ValueError, match="cannot hold"):
        check_aux(AuxLayout(base_ptr=0, slot_bytes=8, num_slots=1))
    with pytest.raises(ValueError, match="first_token_id"):
        AuxRecord(-1, 0.0)


def test_aux_records_carry_the_first_tokens_alternatives_when_the_slots_hold_them() -> None:
    from kvtransfer.auxdata import MAX_TOP_LOGPROBS, aux_slot_bytes

    top = tuple((t, -0.5 * t) for t in range(1, 6))
    buffer = (ctypes.c_uint8 * (2 * aux_slot_bytes(5)))()
    aux = AuxLayout(base_ptr=ctypes.addressof(buffer), slot_bytes=aux_slot_bytes(5), num_slots=2)
    write_aux(aux, 1, AuxRecord(7, -0.125, top))
    assert read_aux(aux, 1) == AuxRecord(7, -0.125, top) and AuxRecord(7, -0.125, top).size == aux_slot_bytes(5)
    assert bytes(buffer[: aux_slot_bytes(5)]) == bytes(aux_slot_bytes(5))  # slot 0 untouched
    small = AuxLayout(base_ptr=ctypes.addressof(buffer), slot_bytes=16, num_slots=2)
    with pytest.raises(ValueError, match="does not fit 16-byte aux slots"):
        write_aux(small, 0, AuxRecord(7, -0.125, top))
    with pytest.raises(ValueError, match="at most 20"):
        AuxRecord(1, 0.0, tuple((t, 0.0) for t in range(MAX_TOP_LOGPROBS + 1)))
    with pytest.raises(ValueError, match="claims 5 alternatives"):
        AuxRecord.unpack(AuxRecord(7, -0.125, top).pack()[:20])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_aux_slots_are_written_and_read_in_device_memory() -> None:
    buffer = torch.zeros(64, dtype=torch.uint8, device="cuda")
    aux = AuxLayout(base_ptr=buffer.data_ptr(), slot_bytes=16, num_slots=4, device="cuda:0")
    check_aux(aux)
    write_aux(aux, 1, AuxRecord(first_token_id=129_279, logprob=-1.5))
    assert read_aux(aux, 1) == AuxRecord(129_279, -1.5)
    host = buffer.cpu()
    assert host[:16].eq(0).all() and host[16 + AUX_RECORD_BYTES :].eq(0).all()
