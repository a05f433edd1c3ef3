"""A basic OpenAI Responses API (`POST /v1/responses`): text in, text out, streamed as its events.

A request is translated into a chat request (`instructions` as the system turn, `input` as the
conversation, `text.format` as `response_format`) and served by the same path; nothing is kept on the
server, so `previous_response_id`, `store: true` and `background` are refused, as are tools. Fields follow
the same three classes as `engine.server.fields` (honoured, neutral-only, no effect; unknown refused).
"""

from __future__ import annotations

import time
from typing import Any

from kvtransfer import protocol as pd

from .errors import RequestError
from .fields import NO_EFFECT

HONOURED = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                      "text", "rid", pd.BOOTSTRAP_HOST, pd.BOOTSTRAP_PORT, pd.BOOTSTRAP_ROOM,
                      pd.DATA_PARALLEL_RANK})  # fmt: skip
# name -> the values that ask for nothing (None is always neutral): no server-side state, no tools.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "store": (False,), "previous_response_id": (), "background": (False,), "tools": ([],),
    "tool_choice": ("auto", "none"), "parallel_tool_calls": (True, False), "truncation": ("disabled",),
    "reasoning": (), "include": ([],), "top_logprobs": (0,), "service_tier": ("auto", "default"), "prompt": (),
    "max_tool_calls": (), "conversation": (),
}  # fmt: skip


def _check(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in HONOURED or name in NO_EFFECT:
            continue
        if name not in NEUTRAL:
            raise RequestError(f"Unrecognized request argument supplied: '{name}'", code="unrecognized_argument",
                               param=name)
        if value is not None and not any(type(value) is type(ok) and value == ok for ok in NEUTRAL[name]):
            raise RequestError(f"'{name}' is not supported by this server (no stored state, no tools)",
                               code="unsupported", param=name)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise RequestError(f"'{where}' must be text or a list of input_text parts", param="input")


def to_chat_body(body: Any) -> dict[str, Any]:
    """The chat request a Responses request means; RequestError (400, `param` set) for what it cannot."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check(body)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        for i, item in enumerate(given):
            if not isinstance(item, dict) or item.get("type", "message") != "message" or not isinstance(
                    item.get("role"), str):
                raise RequestError(f"input[{i}] must be a message item ({{'role', 'content'}})", param="input")
            messages.append({"role": item["role"], "content": _content(item.get("content"), f"input[{i}].content")})
    else:
        raise RequestError("'input' must be a string or a non-empty list of message items", param="input")
    chat: dict[str, Any] = {"messages": messages}
    for src, dst in (("model", "model"), ("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                     ("top_p", "top_p"), ("stream", "stream"), ("rid", "rid"), (pd.BOOTSTRAP_HOST, pd.BOOTSTRAP_HOST),
                     (pd.BOOTSTRAP_PORT, pd.BOOTSTRAP_PORT), (pd.BOOTSTRAP_ROOM, pd.BOOTSTRAP_ROOM),
                     (pd.DATA_PARALLEL_RANK, pd.DATA_PARALLEL_RANK)):
        if body.get(src) is not None:
            chat[dst] = body[src]
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else None
        if not isinstance(text, dict) or set(text) - {"format", "verbosity"} or not isinstance(fmt, dict | None):
            raise RequestError("'text' must be {'format': {...}}", param="text")
        if fmt is not None and fmt.get("type") == "json_schema":  # flat in Responses, nested in chat
            fmt = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "schema"),
                                                          "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        if fmt is not None:
            chat["response_format"] = fmt
    return chat


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens}


def response_object(response_id: str, model: str, text: str | None, finish_reason: str | None, prompt_tokens: int,
                    output_tokens: int, created: int | None = None) -> dict[str, Any]:
    """The Response: `status` completed, or incomplete when it ran out of `max_output_tokens`; `text` None
    while it is in progress (the `response.created` event)."""
    output = [] if text is None else [{
        "type": "message", "id": f"msg_{response_id}", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    status = "in_progress" if text is None else ("incomplete" if finish_reason == "length" else "completed")
    return {"id": f"resp_{response_id}", "object": "response", "created_at": created or int(time.time()),
            "status": status, "model": model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": None if text is None else _usage(prompt_tokens, output_tokens)}


def event(kind: str, sequence: int, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "sequence_number": sequence, **fields}
