"""Request parsing and reply formatting for the worker API (OpenAI-compatible + SGLang's /generate).

Parsing validates every field and raises `RequestError` (a 400 with an OpenAI-style body); the
bootstrap fields that the router adds (`kvtransfer.protocol`) are read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtransfer import protocol as pd
from kvtransfer.auxdata import MAX_TOP_LOGPROBS  # a PD request's aux slot carries the first token's
from kvtransfer.protocol import error_document as error_document  # the one writer of error bodies

from ..chat_template import ChatTemplate, ChatTemplateError
from .errors import RequestError as RequestError
from .fields import check_fields, check_stream_options
from .messages import BootstrapInfo, GenerateRequest, SamplingSpec
from .structured import OPENAI_FIELDS, SAMPLING_PARAMS_FIELDS, parse_grammar
from .tools import ToolRequest, parse_tools, required_grammar, tools_system_prompt


class TextCodec(Protocol):
    """What the API needs of a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class ParsedRequest:
    """A validated request: what to run plus how to shape the reply.

    `requests` holds one engine request per choice: every prompt of a list, `n` times each, prompt-major
    (choice `index` i is prompt i // n, sample i % n), as OpenAI and vLLM number them."""

    requests: list[GenerateRequest]
    kind: str  # "completion" | "chat" | "generate"
    stream: bool
    include_usage: bool
    model: str
    response_id: str = ""  # the id of the whole answer (`cmpl-<id>`); one per request even for n > 1
    echo_prompts: list[str] = field(default_factory=list)  # per choice: text echoed before its output
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one (engine.server.detokenize)
    text_in_logprobs: bool = False  # SGLang's return_text_in_logprobs: each logprob entry carries its text
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage in every chunk
    batch: bool = False  # the body held a list of prompts (/generate answers with a list then)
    n: int = 1
    tools: ToolRequest | None = None  # chat: parse the answer for DeepSeek-V3 tool calls (engine.server.tools)
    reasoning: bool = False  # chat: the answer starts in R1's reasoning (engine.server.chat_output)
    include_reasoning: bool = True  # vLLM's include_reasoning: False drops the reasoning part
    stream_reasoning: bool = True  # SGLang's stream_reasoning: False sends the reasoning in one piece
    prompt_logprob_start: int = 0  # SGLang's logprob_start_len: prompt logprobs reported from this position
    echo_logprobs: bool = False  # completions' echo with logprobs: the prompt's tokens lead the choice's logprobs
    include_stop: bool = False  # the text keeps the stop string that ended it (vLLM's and SGLang's flags)
    responses: bool = False  # a /v1/responses request served as chat: answered in the Responses shape

    @property
    def request(self) -> GenerateRequest:
        return self.requests[0]

    @property
    def echo_prompt(self) -> str:
        return self.echo_prompts[0] if self.echo_prompts else ""


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
        raise RequestError("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise RequestError(f"'logit_bias' values must be numbers in [-100, 100], got {bias!r}",
                               param="logit_bias")
        if not 0 <= token < 2**63:
            raise RequestError(f"'logit_bias' token id {token} is out of range", param="logit_bias")
        out.append((token, float(bias)))
    return out


def _first_of(src: dict, names: tuple[str, ...], types: type | tuple[type, ...], default: Any) -> tuple[Any, str]:
    """The value of the first of `names` that `src` sets (aliases: OpenAI's, vLLM's, SGLang's), and its name."""
    for name in names:
        value = _get(src, name, types, None)
        if value is not None:
            return value, name
    return default, names[-1]


def parse_sampling(body: dict, params: dict | None = None, default_max_tokens: int = 16) -> SamplingSpec:
    """OpenAI fields (`max_tokens`, `temperature`, ...) or SGLang's `sampling_params` dict. Temperature
    defaults to 1.0 in both, as in OpenAI's API and SGLang's."""
    src = params if params is not None else body
    max_new, max_name = _first_of(src, ("max_new_tokens", "max_completion_tokens", "max_tokens"), int,
                                  default_max_tokens)
    temperature = float(_get(src, "temperature", (int, float), 1.0))
    top_p = float(_get(src, "top_p", (int, float), 1.0))
    top_k = _get(src, "top_k", int, -1)
    min_p = float(_get(src, "min_p", (int, float), 0.0))
    seed, _ = _first_of(src, ("sampling_seed", "seed"), int, None)  # SGLang's name, then OpenAI's
    presence = float(_get(src, "presence_penalty", (int, float), 0.0))
    frequency = float(_get(src, "frequency_penalty", (int, float), 0.0))
    repetition = float(_get(src, "repetition_penalty", (int, float), 1.0))
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -2.0 <= value <= 2.0:
            raise RequestError(f"'{name}' must be in [-2, 2], got {value}", param=name)
    if not 0 < repetition <= 10:
        raise RequestError(f"'repetition_penalty' must be in (0, 10], got {repetition}", param="repetition_penalty")
    logit_bias = _parse_logit_bias(src.get("logit_bias"))
    min_new, min_name = _first_of(src, ("min_new_tokens", "min_tokens"), int, 0)
    stop_ids = _get(src, "stop_token_ids", list, [])
    if max_new < 1:
        raise RequestError(f"max tokens must be at least 1, got {max_new}", param=max_name)
    if not 0 <= min_new <= max_new:
        raise RequestError(f"min tokens must be between 0 and the max tokens ({max_new}), got {min_new}",
                           param=min_name)
    if temperature < 0:
        raise RequestError(f"'temperature' must be >= 0, got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    if top_k == 0 or top_k < -1:
        raise RequestError(f"'top_k' must be -1 (off) or >= 1, got {top_k}", param="top_k")
    if not 0 <= min_p <= 1:
        raise RequestError(f"'min_p' must be in [0, 1], got {min_p}", param="min_p")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in stop_ids):
        raise RequestError("'stop_token_ids' must be a list of non-negative integers (token ids)",
                           param="stop_token_ids")
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
        min_p=min_p,
    )


def _one_or_list(body: dict, name: str, types: type | tuple[type, ...], count: int) -> list[Any]:
    """`count` values of a field that is one value (count 1) or a list of `count` (a batch, SGLang's rule)."""
    value = body.get(name)
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"'{name}' must be a list of {count} values, one per choice, got {len(value)}",
                               param=name)
        return [_get({name: v}, name, types, None) for v in value]
    if count > 1 and name != pd.BOOTSTRAP_HOST and name != pd.BOOTSTRAP_PORT and value is not None:
        raise RequestError(f"'{name}' must be a list of {count} values, one per choice (each choice is its "
                           "own disaggregated request)", param=name)
    return [_get(body, name, types, None)] * count


def parse_bootstrap(body: dict, count: int = 1) -> list[BootstrapInfo | None]:
    """SGLang's bootstrap fields, one set per choice: scalars for one, lists (or a shared host and port)
    for a batch."""
    if body.get(pd.BOOTSTRAP_HOST) is None:
        given = [name for name in (pd.BOOTSTRAP_PORT, pd.BOOTSTRAP_ROOM, pd.DISAGG_PREFILL_DP_RANK)
                 if body.get(name) is not None]
        if given:  # the rest of a PD request's fields without its host: nothing could use them
            raise RequestError(f"'{given[0]}' needs '{pd.BOOTSTRAP_HOST}' (a disaggregated request)",
                               param=given[0])
        return [None] * count
    hosts = _one_or_list(body, pd.BOOTSTRAP_HOST, str, count)
    ports = _one_or_list(body, pd.BOOTSTRAP_PORT, int, count)
    rooms = _one_or_list(body, pd.BOOTSTRAP_ROOM, int, count)
    prefill_dp_rank = _get(body, pd.DISAGG_PREFILL_DP_RANK, int, None)
    if prefill_dp_rank is not None and prefill_dp_rank < 0:
        raise RequestError(f"'{pd.DISAGG_PREFILL_DP_RANK}' must be >= 0, got {prefill_dp_rank}",
                           param=pd.DISAGG_PREFILL_DP_RANK)
    out: list[BootstrapInfo | None] = []
    for host, port, room in zip(hosts, ports, rooms, strict=True):
        if host is None or port is None or room is None:
            raise RequestError(
                f"a disaggregated request needs '{pd.BOOTSTRAP_HOST}' (str), '{pd.BOOTSTRAP_PORT}' and "
                f"'{pd.BOOTSTRAP_ROOM}' (int)", param=pd.BOOTSTRAP_ROOM if host is not None else pd.BOOTSTRAP_HOST
            )
        if not 0 <= room < 2**pd.ROOM_BITS:
            raise RequestError(f"'{pd.BOOTSTRAP_ROOM}' must be in [0, 2^{pd.ROOM_BITS}), got {room}",
                               param=pd.BOOTSTRAP_ROOM)
        out.append(BootstrapInfo(host=host, port=port, room=room, prefill_dp_rank=prefill_dp_rank))
    return out


def parse_dp_rank(body: dict, dp_size: int | None) -> int | None:
    """The attention-DP group a request names for the instance that answers it: `data_parallel_rank` (SGLang
    and vLLM) or SGLang's newer `routed_dp_rank` (the same field; both given must agree). Checked against
    `dp_size` when given (None: a prefill instance, for which the field names the decode instance's group)."""
    values = {name: _get(body, name, int, None) for name in (pd.DATA_PARALLEL_RANK, pd.ROUTED_DP_RANK)}
    given = {name: value for name, value in values.items() if value is not None}
    if len(set(given.values())) > 1:
        raise RequestError(f"'{pd.DATA_PARALLEL_RANK}' and '{pd.ROUTED_DP_RANK}' name the same group and differ: "
                           f"{given[pd.DATA_PARALLEL_RANK]} vs {given[pd.ROUTED_DP_RANK]}", param=pd.DATA_PARALLEL_RANK)
    if not given:
        return None
    name, value = next(iter(given.items()))
    upper = dp_size if dp_size is not None else 2**31
    if not 0 <= value < upper:
        raise RequestError(f"'{name}' {value} is out of range: this instance has {dp_size} attention-DP "
                           f"group{'s' if dp_size != 1 else ''} (0 to {upper - 1})" if dp_size is not None
                           else f"'{name}' must be >= 0, got {value}", param=name)
    return value


# OpenAI's `developer` role is the system role of newer models; chat templates know only `system`.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI `messages`, checked and reduced to {role, content} strings (text content parts joined), plus an
    assistant turn's `tool_calls` (OpenAI's shape, as chat templates read them)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = msg.get("content", "")
        if content is None:  # an assistant turn that only called tools
            content = ""
        if isinstance(content, list):  # OpenAI content parts: text only
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(
                    part.get("text"), str
                ):
                    raise RequestError(f"messages[{i}].content[{j}] must be a text part "
                                       "({'type': 'text', 'text': str}); other kinds are not supported",
                                       param="messages")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        role = _ROLES.get(msg["role"])
        if role is None:
            raise RequestError(f"messages[{i}].role {msg['role']!r} is not one of {', '.join(_ROLES)}",
                               param="messages")
        entry: dict[str, Any] = {"role": role, "content": content}
        calls = msg.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls
            ):
                raise RequestError(f"messages[{i}].tool_calls must be a list of OpenAI tool calls", param="messages")
            entry["tool_calls"] = [{"id": c.get("id"), "type": c.get("type", "function"),
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": c["function"].get("arguments") or "{}"}}
                                   for c in calls]
        out.append(entry)
    return out


def render_chat(messages: Any, template: ChatTemplate | None = None, tools: ToolRequest | None = None) -> str:
    """The prompt text of a conversation: the checkpoint's chat template, or DeepSeek-V3's layout; with
    tools, their descriptions lead the system prompt."""
    checked = chat_messages(messages)
    if tools is not None:
        prompt = tools_system_prompt(tools)
        if checked[0]["role"] == "system":
            checked[0] = {**checked[0], "content": checked[0]["content"] + "\n\n" + prompt}
        else:
            checked.insert(0, {"role": "system", "content": prompt})
    try:
        return (template or ChatTemplate(None)).render(checked)
    except ChatTemplateError as exc:
        raise RequestError(str(exc), param="messages") from None


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _prompts(body: dict, kind: str) -> tuple[list[str | list[int]], str, bool]:
    """The prompts of a completion or /generate body (text or token ids), the field they came from, and
    whether the body held a list of them (a batch)."""
    key = "prompt" if kind == "completion" else "text"
    ids = body.get("input_ids") if kind == "generate" else None
    if ids is not None:
        if kind == "generate" and body.get("text") is not None:
            raise RequestError("give 'text' or 'input_ids', not both", param="input_ids")
        key, prompt = "input_ids", ids
    else:
        prompt = body.get(key)
    if prompt is None:
        raise RequestError(f"'{key}' is required", param=key)
    if isinstance(prompt, str) and key != "input_ids":
        return [prompt], key, False
    if _is_ids(prompt):  # OpenAI allows a prompt given as token ids
        return [prompt], key, False
    if isinstance(prompt, list) and prompt:
        if key != "input_ids" and all(isinstance(p, str) for p in prompt):
            return list(prompt), key, True
        if all(_is_ids(p) for p in prompt):
            return list(prompt), key, True
    if isinstance(prompt, list) and not prompt:
        raise RequestError("the prompt is empty", param=key)
    raise RequestError(f"'{key}' must be a string, a list of token ids, or a non-empty list of either",
                       param=key)


def _encode(prompt: str | list[int], key: str, codec: TextCodec, vocab_size: int, add_special: bool,
            truncate: int | None) -> tuple[list[int], str]:
    """Token ids and text of one prompt; ids checked against the vocabulary, cut to the last `truncate`."""
    if isinstance(prompt, str):
        ids = codec.encode(prompt, add_special_tokens=add_special)
        text = prompt
    else:
        ids, text = list(prompt), ""
    if not ids:
        raise RequestError("the prompt is empty", param=key)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param=key)
    if truncate is not None and len(ids) > truncate:
        # vLLM's rule: keep the last `truncate` tokens (the end of a prompt is what the answer continues).
        ids = ids[-truncate:]
        text = codec.decode(ids)
    elif not text:
        text = codec.decode(ids)
    return ids, text


def _input_ids(body: dict, codec: TextCodec, vocab_size: int, kind: str, template: ChatTemplate | None,
               tools: ToolRequest | None = None) -> tuple[list[list[int]], list[str], bool]:
    """Every prompt's token ids and text, and whether the body was a batch."""
    truncate = _get(body, "truncate_prompt_tokens", int, None)
    if truncate is not None and truncate < 1:
        raise RequestError(f"'truncate_prompt_tokens' must be >= 1, got {truncate}", param="truncate_prompt_tokens")
    add_special = _get(body, "add_special_tokens", bool, None)
    if kind == "chat":
        text = render_chat(body.get("messages"), template, tools)
        if add_special is None:
            # A checkpoint's template writes its own special tokens (BOS ...): do not add them twice.
            add_special = template is None or not template.from_checkpoint
        ids, _ = _encode(text, "messages", codec, vocab_size, add_special, truncate)
        return [ids], [text], False
    prompts, key, batch = _prompts(body, kind)
    encoded = [_encode(p, key, codec, vocab_size, True if add_special is None else add_special, truncate)
               for p in prompts]
    return [ids for ids, _ in encoded], [text for _, text in encoded], batch


def _logprob_request(body: dict, kind: str) -> tuple[bool, int]:
    """(return each output token's log-probability, how many top alternatives per position). OpenAI chat:
    `logprobs: true` + `top_logprobs: k`; completions: `logprobs: k` (0: the chosen token's only); SGLang
    /generate: `return_logprob` + `top_logprobs_num`. Prompt logprobs (`echo` with `logprobs`) are refused
    rather than answered with output logprobs only."""
    if kind == "generate":
        wanted = bool(_get(body, "return_logprob", bool, False))
        top, name = _get(body, "top_logprobs_num", int, 0), "top_logprobs_num"
    elif kind == "chat":
        wanted = bool(_get(body, "logprobs", bool, False))
        top, name = _get(body, "top_logprobs", int, 0), "top_logprobs"
        if top and not wanted:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        value = _get(body, "logprobs", int, None)
        wanted, top, name = value is not None, value or 0, "logprobs"
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top log-probabilities must be between 0 and {MAX_TOP_LOGPROBS}, got {top}", param=name)
    return wanted, top


def _prompt_logprob_request(body: dict, kind: str, stream: bool, disaggregated: bool) -> tuple[int, int]:
    """(k, first position): prompt log-probabilities with k alternatives each from that prompt position, or
    (-1, 0) for none. vLLM's `prompt_logprobs: k` (completions and chat), OpenAI's `echo` with `logprobs: k`
    (completions), SGLang's `logprob_start_len` >= 0 with `return_logprob` (/generate, `top_logprobs_num`
    alternatives)."""
    if kind == "generate":
        start = _get(body, "logprob_start_len", int, -1)
        if start < -1:
            raise RequestError(f"'logprob_start_len' must be >= -1, got {start}", param="logprob_start_len")
        if start == -1 or not body.get("return_logprob"):
            return -1, 0
        k, name = _get(body, "top_logprobs_num", int, 0), "logprob_start_len"
    else:
        k, name = _get(body, "prompt_logprobs", int, None), "prompt_logprobs"
        if k is None and kind == "completion" and body.get("echo") and body.get("logprobs") is not None:
            k, name = _get(body, "logprobs", int, 0), "echo"
        if k is None:
            return -1, 0
        start = 0
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise RequestError(f"prompt log-probabilities take 0 to {MAX_TOP_LOGPROBS} alternatives, got {k}", param=name)
    if stream:  # vLLM refuses them streamed too: they would all come before the first output token anyway
        raise RequestError("prompt log-probabilities are not available when streaming", param=name)
    if disaggregated:
        raise RequestError("prompt log-probabilities are computed where the prompt runs: the router serves such "
                           "requests on a decode instance alone, without bootstrap fields", param=name)
    return k, start


MAX_STOP_STRINGS = 16
MAX_N = 128  # choices per request (OpenAI allows 128)


def parse_stop(src: dict) -> tuple[str, ...]:
    """OpenAI's `stop` (a string or a list of strings; SGLang's `sampling_params.stop` alike)."""
    stop = src.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return tuple(dict.fromkeys(stops))


def _choice_count(src: dict, body: dict) -> int:
    n = _get(src, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise RequestError(f"'n' must be between 1 and {MAX_N}, got {n}", param="n")
    best_of = _get(body, "best_of", int, None)
    if best_of is not None and best_of != n and best_of != 1:
        # OpenAI's best_of ranks best_of samples and returns n; tandem samples exactly n.
        raise RequestError(f"'best_of' other than 'n' is not supported (got {best_of}, n {n})", code="unsupported",
                           param="best_of")
    return n


def _rids(body: dict, header_rid: str | None, count: int) -> tuple[str, list[str]]:
    """(the answer's id, one engine rid per choice). A body `rid` list names every choice (SGLang's batch
    rule, what the router sends); one id names the answer and its choices are `<id>-<i>`."""
    rid = body.get("rid")
    if isinstance(rid, list):
        if len(rid) != count or not all(isinstance(r, str) and r for r in rid):
            raise RequestError(f"'rid' must be a string or a list of {count} strings, one per choice", param="rid")
        if len(set(rid)) != count:
            raise RequestError("'rid' must not repeat an id", param="rid")
        return header_rid or uuid.uuid4().hex, list(rid)
    if rid is not None and not isinstance(rid, str):
        raise RequestError("'rid' must be a string", param="rid")
    base = rid or header_rid or uuid.uuid4().hex
    return base, [base] if count == 1 else [f"{base}-{i}" for i in range(count)]


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: vLLM's rule for n > 1 (seed + index), so choice i equals a single request
    with that seed. Unseeded choices stay unseeded (each draws its own)."""
    return None if seed is None else seed + index


def parse_request(
    body: Any, kind: str, codec: TextCodec, vocab_size: int, served_model: str, max_context: int,
    chat_template: ChatTemplate | None = None, header_rid: str | None = None,
    tool_call_parser: str | None = None, reasoning_parser: str | None = None, dp_size: int | None = 1,
) -> ParsedRequest:
    """A validated request. `tool_call_parser` ("deepseekv3") and `reasoning_parser` ("deepseek-r1") are the
    worker's flags: without them chat `tools` are refused and answers are not split."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_fields(body, kind)
    model = _get(body, "model", str, served_model)
    if model != served_model:
        raise RequestError(f"The model `{model}` does not exist.", status=404, code="model_not_found", param="model")
    tools = parse_tools(body, tool_call_parser) if kind == "chat" else None
    ids_list, texts, batch = _input_ids(body, codec, vocab_size, kind, chat_template, tools)
    params_src = body.get("sampling_params") if kind == "generate" else None
    if params_src is not None and not isinstance(params_src, dict):
        raise RequestError("'sampling_params' must be an object", param="sampling_params")
    options_src = params_src if params_src is not None else body
    longest = max(len(ids) for ids in ids_list)
    if kind == "chat":
        default_max = max(1, min(CHAT_DEFAULT_MAX_TOKENS, max_context - longest))
    else:
        default_max = DEFAULT_MAX_TOKENS[kind]
    sampling = parse_sampling(body, params_src, default_max)
    biased = [t for t, _ in sampling.logit_bias if t >= vocab_size]
    if biased:
        raise RequestError(f"'logit_bias' token id {biased[0]} is outside the vocabulary [0, {vocab_size})",
                           param="logit_bias")
    outside = [t for t in sampling.stop_token_ids if t >= vocab_size]
    if outside:
        raise RequestError(f"'stop_token_ids' id {outside[0]} is outside the vocabulary [0, {vocab_size})",
                           param="stop_token_ids")
    if longest + sampling.max_new_tokens > max_context:
        raise RequestError(
            f"prompt ({longest} tokens) + max tokens ({sampling.max_new_tokens}) exceeds the context "
            f"limit of {max_context}", param="max_tokens" if kind != "generate" else "max_new_tokens"
        )
    if kind == "generate":
        grammar = parse_grammar(options_src, SAMPLING_PARAMS_FIELDS, "sampling_params." if params_src else "")
    else:
        grammar = parse_grammar(body, OPENAI_FIELDS)
    if tools is not None and tools.choice != "auto":  # "required" and a named function: forced to parse
        if grammar is not None:
            raise RequestError("'tool_choice' forcing a call cannot be combined with structured output",
                               param="tool_choice")
        grammar = required_grammar(tools)
    if grammar is not None:
        sampling.grammar_kind, sampling.grammar = grammar.kind, grammar.text
    stream = bool(_get(body, "stream", bool, False))
    options = check_stream_options(body)
    n = _choice_count(options_src, body)
    count = len(ids_list) * n
    response_id, rids = _rids(body, header_rid, count)
    boots = parse_bootstrap(body, count)
    dp_rank = parse_dp_rank(body, dp_size)
    wants_logprobs, top_logprobs = _logprob_request(body, kind)
    prompt_k, prompt_start = _prompt_logprob_request(body, kind, stream, boots[0] is not None)
    echo = kind == "completion" and bool(_get(body, "echo", bool, False))
    requests, echoes = [], []
    for i in range(count):
        spec = dataclasses.replace(sampling, seed=_choice_seed(sampling.seed, i % n),
                                   stop_token_ids=list(sampling.stop_token_ids),
                                   logit_bias=list(sampling.logit_bias))
        requests.append(GenerateRequest(rid=rids[i], input_ids=list(ids_list[i // n]), sampling=spec,
                                        bootstrap=boots[i], data_parallel_rank=dp_rank,
                                        return_logprob=wants_logprobs,
                                        top_logprobs=top_logprobs, prompt_logprobs=prompt_k))
        echoes.append(texts[i // n] if echo else "")
    return ParsedRequest(
        requests=requests,
        kind=kind,
        stream=stream,
        include_usage=options.get("include_usage", False) or options.get("continuous_usage_stats", False),
        model=model,
        response_id=response_id,
        echo_prompts=echoes,
        stop=parse_stop(options_src),
        text_in_logprobs=bool(_get(body, "return_text_in_logprobs", bool, False)),
        continuous_usage=options.get("continuous_usage_stats", False),
        batch=batch,
        n=n,
        tools=tools,
        # A forced call is the whole answer (its grammar starts at the first token): no reasoning part.
        reasoning=(kind == "chat" and reasoning_parser is not None and _get(body, "separate_reasoning", bool, True)
                   and (tools is None or tools.choice == "auto")),
        include_reasoning=_get(body, "include_reasoning", bool, True),
        stream_reasoning=_get(body, "stream_reasoning", bool, True),
        prompt_logprob_start=prompt_start,
        echo_logprobs=echo and wants_logprobs,
        include_stop=bool(_get(body, "include_stop_str_in_output", bool, False)
                          or _get(options_src, "no_stop_trim", bool, False)),
    )
