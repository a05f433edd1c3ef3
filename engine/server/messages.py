"""Messages between a worker's HTTP process and its rank processes.

Both directions are dataclasses encoded with msgspec's msgpack codec; `version` lets a newer process
refuse an older peer's message with a clear error instead of misreading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

# 2: BootstrapInfo.prefill_dp_rank, GenerateRequest.data_parallel_rank; 3: BootstrapInfo.prefill_layout,
# RoomsPlaced; 4: OutputBatch (a turn's outputs in one message)
MESSAGE_VERSION = 4


@dataclass
class SamplingSpec:
    """Sampling settings as they cross the process boundary (validated again by the engine)."""

    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: list[tuple[int, float]] = field(default_factory=list)
    min_new_tokens: int = 0
    min_p: float = 0.0
    # Structured output (engine.grammar): kind "json" | "regex" | "choice" | "ebnf" and its text; "" = none.
    grammar_kind: str = ""
    grammar: str = ""


@dataclass
class BootstrapInfo:
    """Where a disaggregated request's KV lives (SGLang's bootstrap fields)."""

    host: str
    port: int
    room: int
    # The prefill's attention-DP group that holds the KV (`disagg_prefill_dp_rank`); None: room % its dp_size.
    prefill_dp_rank: int | None = None
    # (tp_size, dp_size) of an elastic prefill instance when it started the room (its `RoomPlacement`, which a
    # decode worker's HTTP process fetched, with `prefill_dp_rank`); None: the instance's layout at lookup.
    prefill_layout: tuple[int, int] | None = None


@dataclass
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling: SamplingSpec
    bootstrap: BootstrapInfo | None = None
    # The attention-DP group of this instance that runs it (`data_parallel_rank`); None: the instance picks.
    # A prefill instance ignores it: in a disaggregated body it names the decode instance's group.
    data_parallel_rank: int | None = None
    return_logprob: bool = False
    top_logprobs: int = 0  # with return_logprob: the most likely tokens per position, this many
    # Prompt log-probabilities: -1 off; k >= 0 each prompt token's logprob and k alternatives (colocated only:
    # the router serves such requests on decode alone).
    prompt_logprobs: int = -1
    version: int = MESSAGE_VERSION


@dataclass
class AbortRequest:
    rid: str
    version: int = MESSAGE_VERSION


@dataclass
class TokenOutput:
    """New tokens of one request since its last output; the last one has `finished` set."""

    rid: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token: (id, logprob), best first
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    # With `error`: the HTTP status the client gets (4xx: the request was at fault, 5xx: the server or a peer
    # was) and OpenAI's machine-readable `code`.
    error_status: int = 500
    error_code: str | None = None
    prompt_tokens: int = 0
    # Prompt tokens whose KV came from the prefix cache (SGLang's meta_info.cached_tokens); None where this
    # instance did not prefill the prompt (a decode worker's disaggregated requests).
    cached_tokens: int | None = None
    # Decode-side reuse (`--decode-prefix-cache`), with a disaggregated request's first token: prompt tokens whose
    # KV this decode instance held already (not transferred); the cache-aware router learns from it.
    kv_reused_tokens: int | None = None
    # With the first token of a request that asked for them: per prompt token (None for the first).
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    version: int = MESSAGE_VERSION


@dataclass
class OutputBatch:
    """Every output of one rank's loop turn, in order: one message per turn, not one per request (each
    message costs a send on the rank and a receive, a decode and an event-loop wake-up in the HTTP process;
    at batch 64 that was 64 of each per decode step)."""

    outputs: list[TokenOutput]
    version: int = MESSAGE_VERSION


@dataclass
class RankStatus:
    """A DP-group leader's periodic report: ready flag and pool counts (for /health, /server_info)."""

    rank: int
    dp_rank: int
    num_requests: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    sent_at: float = 0.0  # wall-clock time.time() of the report, so readers can refuse stale counts
    # Instance-wide values every rank holds alike (EPLB's balancedness): shown as they are, never summed.
    gauges: dict[str, float] = field(default_factory=dict)
    version: int = MESSAGE_VERSION


@dataclass
class ScaleInstance:
    """Elastic EP (`engine.runtime.elastic`): re-form the instance at `tp_size` ranks in `dp_size` DP groups.

    Rank 0 holds it until the DP groups that leave have drained, then broadcasts it; every rank switches at the
    end of that turn. `rendezvous` is the new world's meeting point ("file://PATH" on one node); if it does not
    form within `join_timeout_s`, the old ranks meet again at `rollback` and keep the old layout."""

    epoch: int
    tp_size: int
    dp_size: int
    rendezvous: str
    rollback: str
    join_timeout_s: float
    version: int = MESSAGE_VERSION


@dataclass
class ScaleReport:
    """A rank's word on a scale: a joining rank's "loaded" (its shard is built, it waits at the rendezvous),
    rank 0's "switched" or "rolled_back" (with `error`) once every rank took the new layout or kept the old."""

    epoch: int
    rank: int
    phase: str  # "loaded" | "switched" | "rolled_back"
    tp_size: int
    dp_size: int
    error: str | None = None
    drain_s: float = 0.0  # rank 0: from the command to the turn it switched at (every leaving DP group empty)
    drained_requests: int = 0  # rank 0: the most requests the leaving DP groups held while they drained
    pause_s: float = 0.0  # rank 0: the turn boundary's length (rendezvous, groups, expert moves)
    experts_moved: int = 0
    version: int = MESSAGE_VERSION


@dataclass
class RoomsPlaced:
    """Rank 0 of an elastic prefill instance, each turn it routed rooms: their DP groups in the layout of that
    turn. The HTTP process hands them to its bootstrap service, where decode ranks look each room up
    (`kvtransfer.placements`)."""

    tp_size: int
    dp_size: int
    rooms: list[tuple[int, int]]  # (bootstrap_room, dp_rank)
    version: int = MESSAGE_VERSION


ToRanks = GenerateRequest | AbortRequest | ScaleInstance
FromRanks = OutputBatch | RankStatus | ScaleReport | RoomsPlaced

# msgspec cannot tell two dataclasses apart inside a union, so each message travels as
# [kind, fields] and the kind picks the decoder.
_KINDS: dict[str, type] = {"generate": GenerateRequest, "abort": AbortRequest, "outputs": OutputBatch,
                           "status": RankStatus, "scale": ScaleInstance, "scale_report": ScaleReport,
                           "rooms_placed": RoomsPlaced}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}
_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
_decoders = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in _KINDS.items()}


class MessageError(ValueError):
    """A message of an unknown shape or version arrived."""


def encode(message: ToRanks | FromRanks) -> bytes:
    return _encoder.encode((_KIND_OF[type(message)], msgspec.Raw(_encoder.encode(message))))


def _decode(data: bytes, allowed: tuple[str, ...]) -> ToRanks | FromRanks:
    try:
        kind, raw = _envelope_decoder.decode(data)
        if kind not in allowed:
            raise MessageError(f"unexpected message kind {kind!r}, expected one of {allowed}")
        message = _decoders[kind].decode(raw)
    except msgspec.DecodeError as exc:
        raise MessageError(f"malformed message: {exc}") from exc
    if message.version != MESSAGE_VERSION:
        raise MessageError(f"message version {message.version}, expected {MESSAGE_VERSION}")
    return message


def decode_to_ranks(data: bytes) -> ToRanks:
    message = _decode(data, ("generate", "abort", "scale"))
    assert isinstance(message, GenerateRequest | AbortRequest | ScaleInstance)
    return message


def decode_from_ranks(data: bytes) -> FromRanks:
    message = _decode(data, ("outputs", "status", "scale_report", "rooms_placed"))
    assert isinstance(message, OutputBatch | RankStatus | ScaleReport | RoomsPlaced)
    return message
