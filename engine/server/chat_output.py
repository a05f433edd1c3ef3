"""A chat answer's text split into OpenAI's parts: `reasoning_content` (R1's `<think>…</think>`, with
`--reasoning-parser deepseek-r1`), `content`, and `tool_calls` (with `--tool-call-parser deepseekv3`).

One splitter serves whole and streamed answers alike (a whole answer is one feed), so both give the same
parts. While streaming, text that may still grow into a marker (`</think>`, the tool-calls marker) is held
back until it resolves; calls are sent whole, one delta each, when the answer ends (their arguments are
only known to parse then).
"""

from __future__ import annotations

from typing import Any

from .tools import CALLS_BEGIN, split_tool_calls

THINK_BEGIN, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek-r1",)


def _held(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ChatOutputSplitter:
    """`feed(delta)` -> the delta dicts it releases; `finish()` -> the rest (and the tool calls).

    Args:
        reasoning: the answer starts inside R1's reasoning (ends at `</think>`).
        include_reasoning: send the reasoning (vLLM's `include_reasoning`); False drops it.
        stream_reasoning: send reasoning as it comes (SGLang's `stream_reasoning`); False: in one piece.
        tools: look for tool calls after the reasoning.
    """

    def __init__(self, reasoning: bool, tools: bool, include_reasoning: bool = True,
                 stream_reasoning: bool = True) -> None:
        self._in_reasoning = reasoning
        self._tools = tools
        self._include = include_reasoning
        self._stream_reasoning = stream_reasoning
        self._buf = ""  # text not yet released
        self._reasoning_held = ""  # reasoning kept back when it is not streamed
        self._in_calls = False
        self._started = False
        self.tool_calls: list[dict[str, Any]] = []

    def _reasoning(self, text: str, final: bool) -> list[dict[str, Any]]:
        if not self._include or not text and not (final and self._reasoning_held):
            return []
        if not self._stream_reasoning:
            self._reasoning_held += text
            if not final:
                return []
            text, self._reasoning_held = self._reasoning_held, ""
        return [{"reasoning_content": text}] if text else []

    def feed(self, delta: str, final: bool = False) -> list[dict[str, Any]]:
        self._buf += delta
        out: list[dict[str, Any]] = []
        if self._in_reasoning:
            if not self._started:  # a model that writes its own "<think>" (the template did not)
                if THINK_BEGIN.startswith(self._buf) and not final:
                    return out
                if self._buf.startswith(THINK_BEGIN):
                    self._buf = self._buf[len(THINK_BEGIN):]
                self._started = True
            end = self._buf.find(THINK_END)
            if end < 0:
                keep = 0 if final else _held(self._buf, THINK_END)
                out += self._reasoning(self._buf[: len(self._buf) - keep], final)
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            out += self._reasoning(self._buf[:end], final=True)
            self._buf = self._buf[end + len(THINK_END) :]
            self._in_reasoning = False
        if self._in_calls:
            return out
        if self._tools:
            start = self._buf.find(CALLS_BEGIN)
            if start >= 0:
                self._in_calls = True
                text, self._buf = self._buf[:start], self._buf[start:]
                return out + ([{"content": text}] if text else [])
            keep = 0 if final else _held(self._buf, CALLS_BEGIN)
        else:
            keep = 0
        text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return out + ([{"content": text}] if text else [])

    def finish(self) -> list[dict[str, Any]]:
        out = self.feed("", final=True)
        if self._in_calls:
            content, calls = split_tool_calls(self._buf)
            if calls:
                self.tool_calls = calls
                out += [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
            else:  # a marker that did not lead to a well-formed call: the text is content after all
                out += [{"content": self._buf}] if self._buf else []
            self._buf = ""
        return out


def whole_message(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The `message` of a whole chat choice from all the deltas of its answer."""
    content = "".join(p["content"] for p in parts if "content" in p)
    reasoning = [p["reasoning_content"] for p in parts if "reasoning_content" in p]
    calls = [c for p in parts for c in p.get("tool_calls", ())]
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return message
