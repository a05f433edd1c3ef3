"""Reply shapes of the worker API: OpenAI completions and chat (whole and streamed chunks, choices by
`index`), SGLang's /generate, and OpenAI's logprobs objects."""

from __future__ import annotations

import time
from typing import Any

from .chat_output import ChatOutputSplitter, whole_message
from .protocol import ParsedRequest, TextCodec


def token_bytes(codec: TextCodec, token: int) -> bytes:
    """The bytes of one output token: the codec's own (a piece of a multi-byte character is its bytes),
    else its text's UTF-8."""
    own = getattr(codec, "token_bytes", None)
    return own(token) if own is not None else codec.decode([token]).encode()


def openai_logprobs(parsed: ParsedRequest, codec: TextCodec, ids: list[int], logprobs: list[float],
                    text_start: int = 0, tops: list[list[tuple[int, float]]] | None = None) -> dict | None:
    """The `logprobs` of an OpenAI choice (or chunk) for output tokens `ids`; None unless asked for.
    Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`; completions:
    `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}` with offsets from
    `text_start` in the choice's text. A token is its own decoded text (a piece of a multi-byte character
    decodes to U+FFFD); chat's `bytes` are the token's real bytes, so they join back into the content."""
    if not parsed.request.return_logprob:
        return None
    tokens = [codec.decode([t]) for t in ids]
    k = parsed.request.top_logprobs
    if parsed.kind == "chat":
        content = []
        for i, (token, tok, lp) in enumerate(zip(ids, tokens, logprobs, strict=False)):
            top = tops[i] if k and tops is not None and i < len(tops) else []
            content.append({"token": tok, "logprob": lp, "bytes": list(token_bytes(codec, token)),
                            "top_logprobs": [{"token": codec.decode([t]), "logprob": v,
                                              "bytes": list(token_bytes(codec, t))} for t, v in top]})
        return {"content": content}
    offsets, at = [], text_start
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    top_dicts = [{codec.decode([t]): v for t, v in top} for top in (tops or [])[: len(tokens)]] if k else None
    return {"tokens": tokens, "token_logprobs": logprobs[: len(tokens)], "top_logprobs": top_dicts,
            "text_offset": offsets}  # fmt: skip


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


def _envelope(parsed: ParsedRequest, created: int, chunk: bool) -> dict[str, Any]:
    if parsed.kind == "chat":
        obj, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
    else:
        obj, prefix = "text_completion", "cmpl-"
    return {"id": prefix + parsed.response_id, "object": obj, "created": created, "model": parsed.model}


def splitter_for(parsed: ParsedRequest) -> ChatOutputSplitter | None:
    """The splitter of a chat answer into reasoning, content and tool calls; None when it is all content."""
    if parsed.kind != "chat" or (parsed.tools is None and not parsed.reasoning):
        return None
    return ChatOutputSplitter(parsed.reasoning, parsed.tools is not None, parsed.include_reasoning,
                              parsed.stream_reasoning)


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One chunk's delta from the splitter's parts (content and reasoning joined, tool calls listed)."""
    delta: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            delta[key] = delta[key] + value if key in delta else value
    return delta


def openai_chunk(parsed: ParsedRequest, text: str, finish_reason: str | None, created: int,
                 first: bool = False, logprobs: dict | None = None, index: int = 0,
                 parts: dict[str, Any] | None = None) -> dict:
    """One streamed chunk of choice `index` of a completion or chat completion (the role goes in each
    choice's first delta only). `parts`: a chat delta split already (reasoning, content, tool calls)."""
    doc = _envelope(parsed, created, chunk=True)
    if parsed.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if parts is not None:
            delta.update(parts)
        elif text:
            delta["content"] = text
        doc["choices"] = [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
    else:
        doc["choices"] = [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]
    return doc


def openai_choice(parsed: ParsedRequest, index: int, text: str, finish_reason: str | None,
                  logprobs: dict | None) -> dict:
    """Choice `index` of a whole answer; a completion's text starts with its echoed prompt."""
    if parsed.kind == "chat":
        splitter = splitter_for(parsed)
        if splitter is None:
            message: dict[str, Any] = {"role": "assistant", "content": text}
        else:
            message = whole_message(splitter.feed(text) + splitter.finish())
            if splitter.tool_calls:
                finish_reason = "tool_calls"
        return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}
    return {"index": index, "text": parsed.echo_prompts[index] + text if parsed.echo_prompts else text,
            "finish_reason": finish_reason, "logprobs": logprobs}


def openai_response(parsed: ParsedRequest, choices: list[dict], prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int | None = None) -> dict:
    doc = _envelope(parsed, int(time.time()), chunk=False)
    doc["choices"] = choices
    doc["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
    return doc


def generate_response(parsed: ParsedRequest, index: int, text: str, ids: list[int], finish_reason: str | None,
                      prompt_tokens: int, logprobs: list[float],
                      tops: list[list[tuple[int, float]]] | None = None, codec: TextCodec | None = None,
                      cached_tokens: int | None = None) -> dict:
    """SGLang's /generate reply shape for choice `index` (its `meta_info.id` is that choice's rid). Logprob
    entries are SGLang's triples [logprob, token id, text], the text None unless `return_text_in_logprobs`
    (and a codec) asks for it."""

    def entry(logprob: float, token: int) -> list[Any]:
        return [logprob, token, codec.decode([token]) if parsed.text_in_logprobs and codec else None]

    meta: dict[str, Any] = {
        "id": parsed.requests[index].rid,
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
    doc: dict[str, Any] = {"text": text, "output_ids": ids, "meta_info": meta}
    if len(parsed.requests) > 1:
        doc["index"] = index  # SGLang's batch answers number their items
    return doc


def vllm_prompt_logprobs(codec: TextCodec, prompt: list[int], values: list[float | None],
                         tops: list[list[tuple[int, float]]]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob, decoded_token}}
    holding the prompt's own token and the alternatives."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for pos, (token, value) in enumerate(zip(prompt, values, strict=False)):
        if value is None:
            out.append(None)
            continue
        entry = {str(token): {"logprob": value, "decoded_token": codec.decode([token])}}
        for alt, lp in tops[pos] if pos < len(tops) else ():
            entry.setdefault(str(alt), {"logprob": lp, "decoded_token": codec.decode([alt])})
        out.append(entry)
    return out


def echo_logprobs(codec: TextCodec, prompt: list[int], values: list[float | None],
                  tops: list[list[tuple[int, float]]], output: dict | None, k: int) -> dict:
    """A completion's `logprobs` with `echo`: the prompt's tokens first (the first without a logprob, as
    OpenAI and vLLM answer), then the output's."""
    tokens = [codec.decode([t]) for t in prompt]
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    top = [None if v is None else {codec.decode([t]): lp for t, lp in tops[i]} for i, v in enumerate(values)]
    out = output or {"tokens": [], "token_logprobs": [], "top_logprobs": [] if k else None, "text_offset": []}
    return {"tokens": tokens + out["tokens"], "token_logprobs": list(values) + out["token_logprobs"],
            "top_logprobs": top + (out["top_logprobs"] or []) if k else None,
            "text_offset": offsets + out["text_offset"]}


def sglang_input_logprobs(parsed: ParsedRequest, codec: TextCodec, prompt: list[int], values: list[float | None],
                          tops: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """SGLang's `input_token_logprobs` (and `input_top_logprobs`) from `logprob_start_len` on."""
    start = parsed.prompt_logprob_start

    def text(token: int) -> str | None:
        return codec.decode([token]) if parsed.text_in_logprobs else None

    meta: dict[str, Any] = {"input_token_logprobs": [[values[i], prompt[i], text(prompt[i])]
                                                     for i in range(start, len(prompt))]}
    if parsed.request.top_logprobs:
        meta["input_top_logprobs"] = [None if values[i] is None else [[lp, t, text(t)] for t, lp in tops[i]]
                                      for i in range(start, len(prompt))]
    return meta
