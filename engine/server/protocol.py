"""Request parsing and reply formatting for the worker API (OpenAI-compatible + SGLang's /generate).

Parsing validates every field and raises `RequestError` (a 400 with an OpenAI-style body); the
bootstrap fields that the router adds (`kvtransfer.protocol`) are read here and nowhere else.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from kvtransfer import protocol as pd
from kvtransfer.auxdata import MAX_TOP_LOGPROBS  # a PD request's aux slot carries the first token's
from kvtransfer.http_errors import error_body as error_body  # the one writer of error bodies

from ..chat_template import ChatTemplate, ChatTemplateError
from .messages import BootstrapInfo, GenerateRequest, SamplingSpec


class TextCodec(Protocol):
    """What the API needs of a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class RequestError(ValueError):
    """A client error: becomes a 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param  # OpenAI's `param`: the request field at fault, where one is


@dataclass
class ParsedRequest:
    """A validated request: what to run plus how to shape the reply."""

    request: GenerateRequest
    kind: str  # "completion" | "chat" | "generate"
    stream: bool
    include_usage: bool
    model: str
    echo_prompt: str = ""
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one (engine.server.detokenize)
    text_in_logprobs: bool = False  # SGLang's return_text_in_logprobs: each logprob entry carries its text


def _get(body: dict, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a valid count or probability here.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"'{name}' must be {_type_names(types)}, got a boolean", param=name)
    if not isinstance(value, types):
        raise RequestError(f"'{name}' must be {_type_names(types)}, got {type(value).__name__}", param=name)
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # what crosses to the ranks is int64
        raise RequestError(f"'{name}' is out of range: {value}", param=name)
    if isinstance(value, float) and not math.isfinite(value):  # JSON parsers may take NaN and Infinity
        raise RequestError(f"'{name}' must be a finite number, got {value}", param=name)
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in seq)


# Output length when a request names none: OpenAI's 16 for completions, SGLang's 128 for /generate, and for
# chat the rest of the context up to CHAT_DEFAULT_MAX_TOKENS (OpenAI's chat has no fixed default; pages for
# a request's whole length are reserved when it is admitted, so the cap keeps one request from holding a
# whole context's worth of them).
DEFAULT_MAX_TOKENS = {"completion": 16, "generate": 128}
CHAT_DEFAULT_MAX_TOKENS = 4096


def _parse_logit_bias(value: Any) -> list[tuple[int, float]]:
    """OpenAI's `logit_bias`: {"token id": bias in [-100, 100]} (ids as strings, as JSON keys are)."""
    if value is None or value == {}:
        return []
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to biases")
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"'logit_bias' keys must be token ids, got {key!r}") from None
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise RequestError(f"'logit_bias' values must be numbers in [-100, 100], got {bias!r}")
        if not 0 <= token < 2**63:
            raise RequestError(f"'logit_bias' token id {token} is out of range")
        out.append((token, float(bias)))
    return out


def parse_sampling(body: dict, params: dict | None = None, default_max_tokens: int = 16) -> SamplingSpec:
    """OpenAI fields (`max_tokens`, `temperature`, ...) or SGLang's `sampling_params` dict. Temperature
    defaults to 1.0 in both, as in OpenAI's API and SGLang's."""
    src = params if params is not None else body
    max_new = _get(src, "max_new_tokens", int, None)
    if max_new is None:
        max_new = _get(src, "max_completion_tokens", int, None)
    if max_new is None:
        max_new = _get(src, "max_tokens", int, default_max_tokens)
    temperature = float(_get(src, "temperature", (int, float), 1.0))
    top_p = float(_get(src, "top_p", (int, float), 1.0))
    top_k = _get(src, "top_k", int, -1)
    seed = _get(src, "seed", int, None)
    presence = float(_get(src, "presence_penalty", (int, float), 0.0))
    frequency = float(_get(src, "frequency_penalty", (int, float), 0.0))
    repetition = float(_get(src, "repetition_penalty", (int, float), 1.0))
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -2.0 <= value <= 2.0:
            raise RequestError(f"'{name}' must be in [-2, 2], got {value}")
    if not 0 < repetition <= 10:
        raise RequestError(f"'repetition_penalty' must be in (0, 10], got {repetition}")
    logit_bias = _parse_logit_bias(src.get("logit_bias"))
    min_new = _get(src, "min_new_tokens", int, None)
    if min_new is None:
        min_new = _get(src, "min_tokens", int, 0)  # vLLM's name
    if not 0 <= min_new <= max_new:
        raise RequestError(f"min tokens must be between 0 and the max tokens ({max_new}), got {min_new}")
    stop_ids = _get(src, "stop_token_ids", list, [])
    if max_new < 1:
        raise RequestError(f"max tokens must be at least 1, got {max_new}")
    if temperature < 0:
        raise RequestError(f"'temperature' must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise RequestError(f"'top_k' must be -1 (off) or >= 1, got {top_k}")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in stop_ids):
        raise RequestError("'stop_token_ids' must be a list of non-negative integers (token ids)")
    return SamplingSpec(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        max_new_tokens=max_new,
        stop_token_ids=list(stop_ids),
        ignore_eos=bool(_get(src, "ignore_eos", bool, False)),
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        logit_bias=logit_bias,
        min_new_tokens=min_new,
    )


def parse_bootstrap(body: dict) -> BootstrapInfo | None:
    host = body.get(pd.BOOTSTRAP_HOST)
    if host is None:
        return None
    port = _get(body, pd.BOOTSTRAP_PORT, int, None)
    room = _get(body, pd.BOOTSTRAP_ROOM, int, None)
    if not isinstance(host, str) or port is None or room is None:
        raise RequestError(
            f"a disaggregated request needs '{pd.BOOTSTRAP_HOST}' (str), '{pd.BOOTSTRAP_PORT}' and "
            f"'{pd.BOOTSTRAP_ROOM}' (int)"
        )
    if not 0 <= room < 2**pd.ROOM_BITS:
        raise RequestError(f"'{pd.BOOTSTRAP_ROOM}' must be in [0, 2^{pd.ROOM_BITS}), got {room}")
    dp_rank = _get(body, pd.DATA_PARALLEL_RANK, int, None)
    return BootstrapInfo(host=host, port=port, room=room, data_parallel_rank=dp_rank)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI `messages`, checked and reduced to {role, content} strings (text content parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'")
        content = msg.get("content", "")
        if content is None:  # an assistant turn that only called tools
            content = ""
        if isinstance(content, list):  # OpenAI content parts: text only
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(
                    part.get("text"), str
                ):
                    raise RequestError(f"messages[{i}].content[{j}] must be a text part "
                                       "({'type': 'text', 'text': str}); other kinds are not supported")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts")
        if msg["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role {msg['role']!r} is not one of system, user, assistant")
        out.append({"role": msg["role"], "content": content})
    return out


def render_chat(messages: Any, template: ChatTemplate | None = None) -> str:
    """The prompt text of a conversation: the checkpoint's chat template, or DeepSeek-V3's layout."""
    checked = chat_messages(messages)
    try:
        return (template or ChatTemplate(None)).render(checked)
    except ChatTemplateError as exc:
        raise RequestError(str(exc)) from None


def _input_ids(body: dict, codec: TextCodec, vocab_size: int, kind: str,
               template: ChatTemplate | None = None) -> tuple[list[int], str]:
    if kind == "chat":
        text = render_chat(body.get("messages"), template)
        # A checkpoint's template writes its own special tokens (BOS ...): do not add them twice.
        add_special = template is None or not template.from_checkpoint
        return codec.encode(text, add_special_tokens=add_special), text
    key = "prompt" if kind == "completion" else "text"
    ids = body.get("input_ids") if kind == "generate" else None
    prompt = body.get(key)
    if ids is None and isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = prompt  # OpenAI allows a prompt given as token ids
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("token ids must be a list of integers")
        text = ""
    elif isinstance(prompt, str):
        ids, text = codec.encode(prompt), prompt
    elif prompt is None:
        raise RequestError(f"'{key}' is required")
    else:
        raise RequestError(f"'{key}' must be a string or a list of token ids (batches are not supported)")
    if not ids:
        raise RequestError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids, text


def _logprob_request(body: dict, kind: str) -> tuple[bool, int]:
    """(return each output token's log-probability, how many top alternatives per position). OpenAI chat:
    `logprobs: true` + `top_logprobs: k`; completions: `logprobs: k` (0: the chosen token's only); SGLang
    /generate: `return_logprob` + `top_logprobs_num`. Prompt logprobs (`echo` with `logprobs`) are refused
    rather than answered with output logprobs only."""
    if kind == "generate":
        wanted = bool(_get(body, "return_logprob", bool, False))
        top = _get(body, "top_logprobs_num", int, 0)
    elif kind == "chat":
        wanted = bool(_get(body, "logprobs", bool, False))
        top = _get(body, "top_logprobs", int, 0)
        if top and not wanted:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
    else:
        value = _get(body, "logprobs", int, None)
        wanted, top = value is not None, value or 0
        if wanted and body.get("echo"):
            raise RequestError("'echo' with 'logprobs' (log-probabilities of the prompt) is not supported",
                               code="unsupported")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top log-probabilities must be between 0 and {MAX_TOP_LOGPROBS}, got {top}")
    return wanted, top


def openai_logprobs(parsed: ParsedRequest, codec: TextCodec, ids: list[int], logprobs: list[float],
                    text_start: int = 0, tops: list[list[tuple[int, float]]] | None = None) -> dict | None:
    """The `logprobs` of an OpenAI choice (or chunk) for output tokens `ids`; None unless asked for.
    Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`; completions:
    `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}` with offsets from
    `text_start` in the choice's text. A token is its own decoded text (a piece of a multi-byte character
    decodes to U+FFFD; `bytes` are that text's UTF-8)."""
    if not parsed.request.return_logprob:
        return None
    tokens = [codec.decode([t]) for t in ids]
    k = parsed.request.top_logprobs
    alternatives = [[(codec.decode([t]), lp) for t, lp in top] for top in (tops or [])] if k else []
    if parsed.kind == "chat":
        content = []
        for i, (tok, lp) in enumerate(zip(tokens, logprobs, strict=False)):
            top = alternatives[i] if i < len(alternatives) else []
            content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]})
        return {"content": content}
    offsets, at = [], text_start
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    top_dicts = [dict(alt) for alt in alternatives[: len(tokens)]] if k else None
    return {"tokens": tokens, "token_logprobs": logprobs[: len(tokens)], "top_logprobs": top_dicts,
            "text_offset": offsets}  # fmt: skip


MAX_STOP_STRINGS = 16
# OpenAI / SGLang fields this server does not implement, with the value that asks for nothing: any other
# value is refused (400) rather than quietly ignored.
UNSUPPORTED = {
    "n": 1, "best_of": 1, "suffix": None, "regex": None,
    "json_schema": None, "response_format": None, "tools": None, "logprob_start_len": -1, "no_stop_trim": False,
    "include_stop_str_in_output": False,
}  # fmt: skip


def _check_unsupported(src: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = src.get(name)
        if value is None or value == neutral or (neutral is None and value in ({}, [], "")):
            continue
        if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        raise RequestError(f"'{name}' is not supported (got {value!r})", code="unsupported")


def parse_stop(src: dict) -> tuple[str, ...]:
    """OpenAI's `stop` (a string or a list of strings; SGLang's `sampling_params.stop` alike)."""
    stop = src.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    return tuple(dict.fromkeys(stops))


def parse_request(
    body: Any, kind: str, codec: TextCodec, vocab_size: int, served_model: str, max_context: int,
    chat_template: ChatTemplate | None = None,
) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    ids, text = _input_ids(body, codec, vocab_size, kind, chat_template)
    params_src = body.get("sampling_params") if kind == "generate" else None
    if params_src is not None and not isinstance(params_src, dict):
        raise RequestError("'sampling_params' must be an object")
    options_src = params_src if params_src is not None else body
    _check_unsupported(body)
    if options_src is not body:
        _check_unsupported(options_src)
    if kind == "chat":
        default_max = max(1, min(CHAT_DEFAULT_MAX_TOKENS, max_context - len(ids)))
    else:
        default_max = DEFAULT_MAX_TOKENS[kind]
    sampling = parse_sampling(body, params_src, default_max)
    biased = [t for t, _ in sampling.logit_bias if t >= vocab_size]
    if biased:
        raise RequestError(f"'logit_bias' token id {biased[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) + sampling.max_new_tokens > max_context:
        raise RequestError(
            f"prompt ({len(ids)} tokens) + max tokens ({sampling.max_new_tokens}) exceeds the context "
            f"limit of {max_context}"
        )
    stream = bool(_get(body, "stream", bool, False))
    options = _get(body, "stream_options", dict, {})
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("'rid' must be a string")
    wants_logprobs, top_logprobs = _logprob_request(body, kind)
    request = GenerateRequest(
        rid=rid or uuid.uuid4().hex,
        input_ids=ids,
        sampling=sampling,
        bootstrap=parse_bootstrap(body),
        return_logprob=wants_logprobs,
        top_logprobs=top_logprobs,
    )
    return ParsedRequest(
        request=request,
        kind=kind,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        model=_get(body, "model", str, served_model),
        echo_prompt=text if body.get("echo") else "",
        stop=parse_stop(options_src),
        text_in_logprobs=bool(_get(body, "return_text_in_logprobs", bool, False)),
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens` (prefix-cache hits) where this worker knows it."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def openai_chunk(parsed: ParsedRequest, text: str, finish_reason: str | None, created: int,
                 first: bool = False, logprobs: dict | None = None) -> dict:
    """One streamed chunk of a completion or chat completion (the role goes in the first delta only)."""
    rid = parsed.request.rid
    if parsed.kind == "chat":
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": parsed.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
        }
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": parsed.model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
    }


def openai_response(
    parsed: ParsedRequest, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int,
    logprobs: dict | None = None, cached_tokens: int | None = None,
) -> dict:
    rid, created = parsed.request.rid, int(time.time())
    if parsed.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": logprobs,
        }
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": parsed.echo_prompt + text, "finish_reason": finish_reason,
                  "logprobs": logprobs}
        obj, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + rid,
        "object": obj,
        "created": created,
        "model": parsed.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def generate_response(parsed: ParsedRequest, text: str, ids: list[int], finish_reason: str | None,
                      prompt_tokens: int, logprobs: list[float],
                      tops: list[list[tuple[int, float]]] | None = None, codec: TextCodec | None = None,
                      cached_tokens: int | None = None) -> dict:
    """SGLang's /generate reply shape. Logprob entries are SGLang's triples [logprob, token id, text], the
    text None unless `return_text_in_logprobs` (and a codec) asks for it."""

    def entry(logprob: float, token: int) -> list[Any]:
        return [logprob, token, codec.decode([token]) if parsed.text_in_logprobs and codec else None]

    meta: dict[str, Any] = {
        "id": parsed.request.rid,
        "finish_reason": {"type": finish_reason} if finish_reason else None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(ids),
    }
    if cached_tokens is not None:
        meta["cached_tokens"] = cached_tokens  # SGLang's field: prompt tokens served by the prefix cache
    if parsed.request.return_logprob:
        meta["output_token_logprobs"] = [entry(lp, t) for lp, t in zip(logprobs, ids, strict=False)]
    if parsed.request.top_logprobs:
        meta["output_top_logprobs"] = [[entry(lp, t) for t, lp in top] for top in (tops or [])]
    return {"text": text, "output_ids": ids, "meta_info": meta}
