"""Chat answers split into reasoning, content and DeepSeek-V3 tool calls: the splitter (streamed piece by
piece equals whole), the tool-call grammar (forced calls always parse), and the worker's OpenAI shapes."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator

import openai
import pytest
from byte_codec import ByteCodec
from threaded_app import serve_in_thread

from engine.grammar import GrammarRuntime
from engine.server.app import ServerConfig, WorkerApp
from engine.server.chat_output import ChatOutputSplitter, whole_message
from engine.server.messages import GenerateRequest, TokenOutput
from engine.server.tools import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolRequest,
    required_grammar,
)
from engine.tokenizer import ByteTokenizer

WEATHER = {"name": "get_weather", "description": "weather by city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "", "parameters": {"type": "object", "properties": {}}}


def call_text(name: str, args: dict) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{json.dumps(args)}\n```{CALL_END}"


def split(text: str, pieces: int, seed: int = 0, **kwargs: bool) -> list[dict]:
    """The splitter's parts for `text` fed in `pieces` random pieces (1: whole)."""
    options = {"reasoning": False, "tools": False, **kwargs}
    splitter = ChatOutputSplitter(**options)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces - 1, len(text) - 1))) if pieces > 1 else []
    parts: list[dict] = []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        parts += splitter.feed(text[a:b])
    return parts + splitter.finish()


ANSWER = ("<think>the user wants weather</think>Let me check. " + CALLS_BEGIN + call_text("get_weather", {"city": "Oslo", "days": 2})
          + "\n" + call_text("get_time", {}) + CALLS_END)


@pytest.mark.parametrize("pieces", [1, 2, 7, len(ANSWER)])
def test_reasoning_content_and_tool_calls_come_apart_however_the_text_is_cut(pieces: int) -> None:
    for seed in range(3):
        message = whole_message(split(ANSWER, pieces, seed, reasoning=True, tools=True))
        assert message["reasoning_content"] == "the user wants weather"
        assert message["content"] == "Let me check. "
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
            ("get_weather", {"city": "Oslo", "days": 2}), ("get_time", {})]


def test_without_parsers_or_markers_everything_is_content() -> None:
    assert whole_message(split(ANSWER, 5))["content"] == ANSWER  # no parser asked for: nothing is split
    assert whole_message(split("a </thin", 3, tools=True)) == {"role": "assistant", "content": "a </thin"}
    assert whole_message(split("all thought", 4, reasoning=True)) == {"role": "assistant", "content": "",
                                                                       "reasoning_content": "all thought"}
    bad_call = "x" + CALLS_BEGIN + "not a call"  # a marker without a well-formed call stays text
    assert whole_message(split(bad_call, 3, tools=True))["content"] == bad_call
    held = split("<think>abc</think>done", 9, reasoning=True, stream_reasoning=False)
    assert [p for p in held if "reasoning_content" in p] == [{"reasoning_content": "abc"}]  # one piece
    assert "reasoning_content" not in whole_message(split("x</think>y", 2, reasoning=True, include_reasoning=False))


@pytest.fixture(scope="module")
def grammar() -> GrammarRuntime:
    return GrammarRuntime(ByteTokenizer(), 259, (1,))


@pytest.mark.parametrize(("tools", "name", "parallel"), [((WEATHER, TIME), None, True), ((WEATHER, TIME), "get_weather", False),
                                                         ((WEATHER,), None, False)])
def test_a_forced_tool_call_always_parses_into_valid_calls(grammar: GrammarRuntime, tools: tuple, name: str | None,
                                                           parallel: bool) -> None:
    """Random walks through the grammar's masks (any allowed byte, uniformly) end in calls that parse, name
    a given tool (the named one when one is named) and carry arguments valid by its schema."""
    import jsonschema
    import torch

    from engine.grammar import advance, constrain, finished

    request = ToolRequest(tools, "named" if name else "required", name, parallel)
    spec = required_grammar(request)
    rng = torch.Generator().manual_seed(0)
    for _ in range(10):
        matcher, ids = grammar.matcher(spec), []
        while not finished(matcher):
            logits = constrain(torch.zeros(1, 259), [matcher], copied=False)
            token = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=rng))
            assert advance(matcher, token)
            ids.append(token)
        text = ByteTokenizer().decode(ids[:-1])  # the last is EOS
        message = whole_message(split(text, 1, tools=True))
        calls = message["tool_calls"]
        assert 1 <= len(calls) <= (4 if parallel else 1)
        for call in calls:
            fn = next(t for t in tools if t["name"] == call["function"]["name"])
            assert name is None or fn["name"] == name
            jsonschema.validate(json.loads(call["function"]["arguments"]), fn["parameters"])


class AnswerBackend:
    """Answers every request with `answer`'s bytes, one token each (the far side of the HTTP layer)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.submitted: list[GenerateRequest] = []

    async def submit(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        self.submitted.append(request)
        ids = list(self.answer.encode())
        for i, tok in enumerate(ids):
            last = i == len(ids) - 1
            yield TokenOutput(rid=request.rid, token_ids=[tok], finished=last, finish_reason="stop" if last else None)

    async def abort(self, rid: str) -> None:
        pass

    def info(self) -> dict:
        return {}


@pytest.fixture
def server() -> Iterator[tuple[str, AnswerBackend]]:
    backend = AnswerBackend(ANSWER)
    config = ServerConfig("tiny", vocab_size=256, max_context=4096, role="decode", tool_call_parser="deepseekv3",
                          reasoning_parser="deepseek-r1")
    app = WorkerApp(backend, ByteCodec(), config)
    with serve_in_thread(app.build()) as url:
        yield url, backend


def test_tool_calls_and_reasoning_in_openai_shapes_streamed_or_not(server: tuple[str, AnswerBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    tools = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    done = client.chat.completions.create(model="tiny", messages=messages, tools=tools)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    assert choice.message.reasoning_content == "the user wants weather"  # type: ignore[attr-defined]
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
    prompt = bytes(backend.submitted[-1].input_ids).decode()
    assert "### get_weather" in prompt and "Parameters: " in prompt  # the tools are described to the model
    assert backend.submitted[-1].sampling.grammar_kind == ""  # "auto": the model may answer in text
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=tools, stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert (reasoning, content) == ("the user wants weather", "Let me check. ")
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather"), (1, "get_time")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    client.chat.completions.create(model="tiny", messages=messages, tools=tools,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert backend.submitted[-1].sampling.grammar_kind == "ebnf"  # a named call is forced by the grammar


def test_a_conversation_with_past_calls_and_results_renders_in_v3_format(server: tuple[str, AnswerBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    client.chat.completions.create(model="tiny", messages=messages, tools=[{"type": "function", "function": WEATHER}])
    prompt = bytes(backend.submitted[-1].input_ids).decode()
    assert prompt.startswith("be brief\n\n## Tools")
    assert CALLS_BEGIN + call_text("get_weather", {"city": "Oslo"}) + CALLS_END in prompt
    assert "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>" in prompt and prompt.endswith("<｜Assistant｜>")
