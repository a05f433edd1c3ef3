"""Client request bodies: validation, the prompt facts routing needs, and the PD fields spliced in.

The body is parsed once (orjson) to validate it and to read `stream` and the prompt. The body sent to
the workers is the client's bytes with the PD fields spliced in before the closing brace: no JSON
re-encoding on the common path. Re-encoding happens only when the client set a field the router
owns (`bootstrap_*`) or for a batch `/generate`, which needs per-item lists.
"""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass
from typing import Any

import orjson

from kvtransfer.protocol import (
    BOOTSTRAP_HOST,
    BOOTSTRAP_PORT,
    BOOTSTRAP_ROOM,
    DATA_PARALLEL_RANK,
    DISAGG_PREFILL_DP_RANK,
    ROUTED_DP_RANK,
)
from router.errors import BadRequest, RouterError
from router.workers import Worker

CHARS_PER_TOKEN = 4  # prompt-length estimate for text prompts (typical of English BPE vocabularies)
# Cache-aware routing matches prompt prefixes on at most this much of a prompt: its cost on the event
# loop grows with the key (a 20 MB prompt cost 150 ms of hashing), and two prompts that agree on their
# first million characters (64 Ki token ids) are the same prefix for routing.
KEY_CHARS = 1 << 20
KEY_IDS = 1 << 16
_ID_SLICE = 1 << 16  # ids checked per C call: between slices a parsing thread lets the event loop run
_PD_FIELDS = frozenset((BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM))


class Kind(str, enum.Enum):
    CHAT = "/v1/chat/completions"
    COMPLETION = "/v1/completions"
    GENERATE = "/generate"
    RESPONSES = "/v1/responses"


@dataclass(slots=True)
class InboundRequest:
    """A validated client request. `prompt_key` is what cache-aware routing matches prefixes on."""

    kind: Kind
    raw: bytes
    doc: dict[str, Any]
    stream: bool
    prompt_key: str | bytes
    prompt_tokens: int  # len(ids) for token ids, else ceil(chars / CHARS_PER_TOKEN)
    batch_size: int | None  # /generate with a list of prompts
    body_rid: str | list[str] | None  # `rid` the client put in the body, if any
    colocated: bool = False  # must run where its prompt runs and is answered: decode alone (prompt logprobs)


_INT = ((int,), "an integer")
# Top-level fields whose type the router checks (the worker checks the rest): name -> (types, words).
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "stream": ((bool,), "a boolean"),
    "model": ((str,), "a string"),
    "stream_options": ((dict,), "an object"),
    "max_tokens": _INT,
    "max_completion_tokens": _INT,
    "n": _INT,
    "max_new_tokens": _INT,
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "rid": ((str, list), "a string or a list of strings"),
    "sampling_params": ((dict, list), "an object"),
}
_NON_NEGATIVE = frozenset(("max_tokens", "max_completion_tokens", "n", "max_new_tokens"))


def _check_type(doc: dict[str, Any], name: str) -> None:
    value = doc[name]
    if value is None:
        return
    types, what = _FIELD_TYPES[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise BadRequest(f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    if name in _NON_NEGATIVE and value < 0:
        raise BadRequest(f"'{name}' must be >= 0", param=name)


def _check_common(doc: dict[str, Any]) -> None:
    for name in _FIELD_TYPES.keys() & doc.keys():
        _check_type(doc, name)


def _ids_key(ids: list[Any], name: str) -> bytes:
    """The routing key of a token-id prompt (its first KEY_IDS ids); every id is checked to be an int32."""
    try:
        key = array("i", ids[:KEY_IDS]).tobytes()
        for start in range(KEY_IDS, len(ids), _ID_SLICE):
            array("i", ids[start : start + _ID_SLICE])
    except (TypeError, OverflowError) as exc:
        raise BadRequest(f"'{name}' must be a list of token ids (integers)", param=name) from exc
    return key


def _text_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _chat_prompt(doc: dict[str, Any]) -> tuple[str, int]:
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    parts: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, str):
            parts.append(f"{m['role']}:{content}")
        elif isinstance(content, list):
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            parts.append(f"{m['role']}:" + "".join(t for t in texts if isinstance(t, str)))
        elif content is not None:
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts", param="messages")
        else:
            parts.append(f"{m['role']}:")
    key = "\n".join(parts)
    return key[:KEY_CHARS], _text_tokens(key)


def _responses_prompt(doc: dict[str, Any]) -> tuple[str, int]:
    """OpenAI Responses' `input` (a string or message items) with its `instructions`, as a routing key."""
    given = doc.get("input")
    if isinstance(given, str):
        key = given
    elif isinstance(given, list) and given:
        key = "\n".join(str(item.get("content")) if isinstance(item, dict) else "" for item in given)
    else:
        raise BadRequest("'input' must be a string or a non-empty list of message items", param="input")
    instructions = doc.get("instructions")
    if isinstance(instructions, str):
        key = instructions + "\n" + key
    return key[:KEY_CHARS], _text_tokens(key)


def _completion_prompt(doc: dict[str, Any]) -> tuple[str | bytes, int, int | None]:
    """(routing key, estimated prompt tokens, prompts in a list prompt or None for one prompt)."""
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        return prompt[:KEY_CHARS], _text_tokens(prompt), None
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            if not all(isinstance(p, str) for p in prompt):
                raise BadRequest("'prompt' list must hold only strings or only token ids", param="prompt")
            return first[:KEY_CHARS], sum(_text_tokens(p) for p in prompt), len(prompt)
        if isinstance(first, list):
            keys = [_ids_key(p, "prompt") if isinstance(p, list) else b"" for p in prompt]
            if not all(isinstance(p, list) for p in prompt):
                raise BadRequest("'prompt' must be a list of token-id lists", param="prompt")
            return keys[0], sum(len(p) for p in prompt), len(prompt)
        return _ids_key(prompt, "prompt"), len(prompt), None
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids", param="prompt")


MAX_N = 128  # choices per request, as OpenAI allows (the workers enforce the same limit)


def _choices_per_prompt(doc: dict[str, Any], kind: Kind) -> int:
    """OpenAI's `n` (SGLang's `sampling_params.n` on /generate): each choice is its own worker request."""
    params = doc.get("sampling_params")
    n = params.get("n") if kind is Kind.GENERATE and isinstance(params, dict) else doc.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise BadRequest(f"'n' must be an integer between 1 and {MAX_N}", param="n")
    return n


_JSON_TYPES = (b"application/json", b"")


def check_media_type(content_type: bytes | None) -> None:
    """A body labelled as something other than JSON (an HTML form's `application/x-www-form-urlencoded`) is a
    415, as the workers answer it; an unlabelled one is read as JSON."""
    if content_type is None:
        return
    media = content_type.split(b";", 1)[0].strip().lower()
    if media not in _JSON_TYPES and not media.endswith(b"+json"):
        raise RouterError(415, f"the request body must be application/json, not {media.decode('latin-1')}",
                          code="unsupported_media_type")


def _generate_prompt(doc: dict[str, Any]) -> tuple[str | bytes, int, int | None]:
    text, ids = doc.get("text"), doc.get("input_ids")
    if text is not None:
        if isinstance(text, str):
            return text[:KEY_CHARS], _text_tokens(text), None
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return text[0][:KEY_CHARS], sum(_text_tokens(t) for t in text), len(text)
        raise BadRequest("'text' must be a string or a non-empty list of strings", param="text")
    if ids is not None:
        if isinstance(ids, list) and ids:
            if isinstance(ids[0], list):
                if not all(isinstance(p, list) for p in ids):
                    raise BadRequest("'input_ids' must be a list of token-id lists", param="input_ids")
                keys = [_ids_key(p, "input_ids") for p in ids]
                return keys[0], sum(len(p) for p in ids), len(ids)
            return _ids_key(ids, "input_ids"), len(ids), None
        raise BadRequest("'input_ids' must be a non-empty list of token ids", param="input_ids")
    raise BadRequest("one of 'text' or 'input_ids' is required", param="text")


def parse_inbound(raw: bytes, kind: Kind) -> InboundRequest:
    """Validate a client body; raises BadRequest with an OpenAI-style message."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    _check_common(doc)
    batch: int | None = None
    if kind is Kind.CHAT:
        key, tokens = _chat_prompt(doc)
    elif kind is Kind.RESPONSES:
        key, tokens = _responses_prompt(doc)
    elif kind is Kind.COMPLETION:
        key, tokens, batch = _completion_prompt(doc)
    else:
        key, tokens, batch = _generate_prompt(doc)
    n = _choices_per_prompt(doc, kind)
    if n > 1:  # one worker request per choice: a batch of prompts x n, prompt-major, as the workers number it
        batch = (batch or 1) * n
    rid = doc.get("rid")
    if isinstance(rid, list):
        if batch is None:
            raise BadRequest("'rid' must be a string for a single prompt", param="rid")
        if len(rid) != batch or not all(isinstance(r, str) for r in rid):
            raise BadRequest(f"'rid' must be a list of {batch} strings, one per prompt", param="rid")
    return InboundRequest(kind, raw, doc, bool(doc.get("stream")), key, tokens, batch, rid, _wants_prompt_logprobs(doc))


def _wants_prompt_logprobs(doc: dict[str, Any]) -> bool:
    """Prompt log-probabilities are computed where the prompt runs and must reach the answer: such a request
    runs on a decode instance alone (its prompt there too), like a short prompt. vLLM's `prompt_logprobs`,
    OpenAI's `echo` with `logprobs`, SGLang's `logprob_start_len` >= 0 with `return_logprob`."""
    start = doc.get("logprob_start_len")
    return (doc.get("prompt_logprobs") is not None
            or (bool(doc.get("echo")) and doc.get("logprobs") not in (None, False))
            or (bool(doc.get("return_logprob")) and isinstance(start, int) and start >= 0))


def abort_rids(inbound: InboundRequest, rid: str) -> list[str]:
    """The request ids the workers know this request by (what `/abort_request` must name): the
    router's own `rid`, one per prompt of a batch."""
    return [rid] if inbound.batch_size is None else [f"{rid}-{i}" for i in range(inbound.batch_size)]


def client_ids(inbound: InboundRequest, echo: str) -> tuple[str, list[str] | None]:
    """The ids the client knows this request by: its body `rid` if it sent one, else `echo` (its
    X-Request-ID or one the router made up); per prompt for a batch (`<id>-<i>` as SGLang names them)."""
    body_rid = inbound.body_rid
    single = body_rid if isinstance(body_rid, str) else echo
    if inbound.batch_size is None:
        return single, None
    if isinstance(body_rid, list):
        return single, list(body_rid)
    return single, [f"{single}-{i}" for i in range(inbound.batch_size)]


def _splice(raw: bytes, empty: bool, fields: bytes) -> bytes:
    body = raw.rstrip()
    # parse_inbound proved it is one JSON object, so it ends with '}'.
    return body[:-1] + (fields if empty else b"," + fields) + b"}"


def worker_body(inbound: InboundRequest, rid: str, prefill: Worker | None, room: int | list[int] | None,
                decode_group: int | None = None, prefill_group: int | None = None) -> bytes:
    """The body both workers get: the client's with `rid` set to the router's `rid` (whatever rid the
    client sent: `router.answers` says why), for a PD pair the bootstrap fields naming `prefill` and
    `room` (a list of rooms for a batch), and the attention-DP groups the router picked (`router.dp_routing`:
    `data_parallel_rank` for decode, `disagg_prefill_dp_rank` for prefill) unless the client named them."""
    doc = inbound.doc
    groups = {}
    if decode_group is not None and DATA_PARALLEL_RANK not in doc and ROUTED_DP_RANK not in doc:
        groups[DATA_PARALLEL_RANK] = decode_group
    if prefill is not None and prefill_group is not None and DISAGG_PREFILL_DP_RANK not in doc:
        groups[DISAGG_PREFILL_DP_RANK] = prefill_group
    if (inbound.batch_size is None and "rid" not in doc
            and not (prefill is not None and not _PD_FIELDS.isdisjoint(doc))):
        fields = b'"rid":' + orjson.dumps(rid)
        if prefill is not None:
            fields = fields + b"," + prefill.pd_fields_prefix + str(room).encode()
        for name, group in groups.items():
            fields += b',"' + name.encode() + b'":' + str(group).encode()
        return _splice(inbound.raw, not doc, fields)
    out = dict(doc)
    out.update(groups)
    out["rid"] = rid if inbound.batch_size is None else abort_rids(inbound, rid)
    if prefill is not None:
        host = prefill.bootstrap_host
        if inbound.batch_size is None:
            out.update({BOOTSTRAP_HOST: host, BOOTSTRAP_PORT: prefill.bootstrap_port, BOOTSTRAP_ROOM: room})
        else:
            n = inbound.batch_size
            out.update({BOOTSTRAP_HOST: [host] * n, BOOTSTRAP_PORT: [prefill.bootstrap_port] * n,
                        BOOTSTRAP_ROOM: room})
    return orjson.dumps(out)
