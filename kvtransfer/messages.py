"""Every message that crosses a process in the control plane, and the one codec that carries them.

Messages are msgspec Structs (typed, frozen dataclass-like records), tagged by class name and versioned by
a `version` field. Decoding rejects anything that is not exactly one of them: an unknown type, an unknown
or missing field, a wrong type, or another protocol version, each with a `KVProtocolError` saying which.

Two encodings of the same types: msgpack on the zmq control channel (binary, fast), JSON on the bootstrap
service's HTTP API (readable with curl; bytes travel as base64).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.state import KVProtocolError

# 2: registrations and intros carry the model fingerprint; 3: transfer requests say which leading pages the
# decode rank holds already (`TransferRequest.held_pages`, decode-side prefix reuse); 4: an elastic prefill
# instance publishes each room's placement (`InstanceInfo.room_placements`, `RoomPlacement`)
PROTOCOL_VERSION = 4


class Message(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, tag=True):
    """Base of every message: its class name is its wire tag, `version` is checked on decode."""

    version: int = PROTOCOL_VERSION


# --- bootstrap service (HTTP, JSON) -------------------------------------------------------------------


class RankRegistration(Message):
    """A prefill rank announces itself to its instance's bootstrap service.

    session: random per KVSendManager; changes when the rank restarts, so peers can tell stale info apart.
    control_endpoint: the rank's zmq control channel, "tcp://host:port".
    engine_kind / engine_name / engine_metadata: its transfer engine (kind must match the decode side's).
    model_fingerprint: the model it serves (`engine.fingerprint`); decode refuses an instance whose differs.
    """

    rank: int
    tp_size: int
    dp_size: int
    session: str
    control_endpoint: str
    engine_kind: str
    engine_name: str
    engine_metadata: bytes
    page_layout: PageLayout
    aux_layout: AuxLayout
    model_fingerprint: str = ""
    mla_core: bool = False  # the instance runs MLA-core data parallelism (one KV rank per room)


class InstanceInfo(Message):
    """What the bootstrap service answers to a lookup: the instance's layout and its registered ranks."""

    instance_id: str
    tp_size: int
    dp_size: int
    ranks: list[RankRegistration]
    mla_core: bool = False  # one KV rank per room, `room % tp_size` (kvtransfer.mapping.prefill_owner)
    # The instance can change its layout live (elastic EP): decode takes each room's layout from its
    # `RoomPlacement` (`GET /v1/rooms/{room}`), never from `tp_size` / `dp_size` here, which may have changed
    # since the room started.
    room_placements: bool = False

    @property
    def complete(self) -> bool:
        """Every rank of the current layout is registered (ranks joining a scale-up may be there too)."""
        return {r.rank for r in self.ranks} >= set(range(self.tp_size))

    def rank(self, rank: int) -> RankRegistration:
        for registration in self.ranks:
            if registration.rank == rank:
                return registration
        raise KeyError(rank)


class RoomPlacement(Message):
    """Where an elastic prefill instance runs a room, fixed when its rank 0 routed the room: the attention-DP
    group `dp_rank` of the layout (`tp_size`, `dp_size`) in force then. The decode ranks map with it, so a room
    begun before a switch keeps its sources whatever the layout is when decode asks."""

    room: int
    dp_rank: int
    tp_size: int
    dp_size: int


class Deregistration(Message):
    """A prefill rank leaves (its manager closes); only the session that registered may remove it."""

    rank: int
    session: str


# --- control channel (zmq, msgpack) -------------------------------------------------------------------


class DecodeIntro(Message):
    """A decode rank's transfer engine, pages and model fingerprint, sent once per prefill rank session (the
    first request)."""

    engine_name: str
    engine_metadata: bytes
    page_layout: PageLayout
    aux_layout: AuxLayout
    model_fingerprint: str = ""
    mla_core: bool = False  # the instance runs MLA-core data parallelism (one KV rank per room)


class ControlMessage(Message):
    """Every control message names its sender: `sender` is its control endpoint, `session` its manager's
    session id (a restarted peer at the same endpoint has a new one)."""

    sender: str
    session: str


class TransferRequest(ControlMessage):
    """Decode -> prefill: where to write the room's KV (real) or that it only wants the notice (dummy).

    prefill_session: the session this request was meant for (from the bootstrap service); a prefill rank
        with another session answers `Abort` so that the decode side refreshes its cached lookup.
    dst_pages: the decode rank's pages for the request, in prompt order from page `held_pages` on (empty for a
        dummy).
    held_pages: how many of the prompt's leading pages the decode rank holds already (its own prefix cache
        kept them from an earlier request, e.g. the conversation's last turn): the real prefill rank writes
        only the prompt's pages from that one on. 0: write every page.
    num_decode_peers: how many decode ranks contact this prefill rank for this room.
    intro: the decode rank's engine and layout, when this prefill session has not seen them yet.
    """

    room: int
    prefill_session: str
    decode_rank: int
    is_dummy: bool
    dst_pages: list[int]
    aux_slot: int
    num_decode_peers: int
    held_pages: int = 0
    intro: DecodeIntro | None = None


class TransferDone(ControlMessage):
    """Prefill -> decode: this prefill rank is done with the room (a real one: every write has landed)."""

    room: int
    prefill_rank: int


class AbortCode:
    """Why a room was aborted, as far as the peer must act on it (the text is in `Abort.reason`)."""

    FAILED = "failed"  # anything else: timeout, abort by a worker, a failed write, a dead peer
    STALE_SESSION = "stale_session"  # the request named a prefill session that is gone: look up again
    NEED_INTRO = "need_intro"  # the prefill rank does not know this decode rank's engine: send the intro
    REFUSED = "refused"  # the request itself is invalid (pages out of range, layouts that differ)


class Abort(ControlMessage):
    """Either way: the room failed. From a prefill rank it also promises that none of its writes of the
    room is still in flight (it is sent only after they drained), which is what a decode rank waits for
    before its pages may be reused."""

    room: int
    reason: str
    code: str = AbortCode.FAILED


class Heartbeat(ControlMessage):
    """Sent to each peer we share a live room with, every `heartbeat_interval_s`."""


ControlMessages = TransferRequest | TransferDone | Abort | Heartbeat

_msgpack_encoder = msgspec.msgpack.Encoder()
_control_decoder = msgspec.msgpack.Decoder(ControlMessages)

T = TypeVar("T", bound=Message)


def _check_version(message: Message) -> None:
    if message.version != PROTOCOL_VERSION:
        raise KVProtocolError(
            f"{type(message).__name__} speaks control protocol version {message.version}, "
            f"this process speaks {PROTOCOL_VERSION}"
        )


def _explain(raw: Any, exc: Exception, what: str) -> KVProtocolError:
    """A clear error; a peer of another version is named as such rather than as a bad field."""
    if isinstance(raw, dict) and raw.get("version") not in (None, PROTOCOL_VERSION):
        return KVProtocolError(
            f"{what} of protocol version {raw.get('version')!r}; this process speaks {PROTOCOL_VERSION}"
        )
    return KVProtocolError(f"not a valid {what}: {exc}")


def encode_control(message: ControlMessage) -> bytes:
    if not isinstance(message, TransferRequest | TransferDone | Abort | Heartbeat):
        raise TypeError(f"not a control message: {type(message).__name__}")
    return _msgpack_encoder.encode(message)


def decode_control(data: bytes) -> ControlMessage:
    """Decode a control channel frame; `KVProtocolError` for anything that is not one of ours."""
    try:
        message = _control_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            raw = msgspec.msgpack.decode(data)
        except msgspec.DecodeError:
            raw = None
        raise _explain(raw, exc, "control message") from None
    _check_version(message)
    return message


def encode_json(message: Message) -> bytes:
    return msgspec.json.encode(message)


def decode_json(data: bytes, kind: type[T]) -> T:
    """Decode an HTTP body as exactly `kind`; `KVProtocolError` otherwise."""
    try:
        message = msgspec.json.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            raw = msgspec.json.decode(data)
        except msgspec.DecodeError:
            raw = None
        raise _explain(raw, exc, kind.__name__) from None
    _check_version(message)
    return message
