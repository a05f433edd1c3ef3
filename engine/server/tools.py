"""Tool calls in DeepSeek-V3's token format (`--tool-call-parser deepseekv3`, SGLang's name).

The model writes calls as
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]...<｜tool▁calls▁end｜>
(V3's chat template renders past calls the same way). Here:
- `parse_tools`: OpenAI's `tools` / `tool_choice` / `parallel_tool_calls`, checked;
- `tools_system_prompt`: the tools' descriptions for the prompt (V3's template has no tools section of its
  own);
- `required_grammar`: for `tool_choice` "required" or a named function, the grammar (engine.grammar) that
  forces a well-formed call whose arguments follow the function's JSON schema, so it always parses;
- `split_tool_calls`: the answer's text into content and OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..grammar import GrammarSpec, json_schema_grammar
from .errors import RequestError

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(SEP) + r"(.*?)\n```json\n(.*?)\n```"
                   + re.escape(CALL_END), re.DOTALL)
PARSERS = ("deepseekv3",)
MAX_PARALLEL_CALLS = 4  # calls one forced answer may hold when parallel calls are allowed


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict[str, Any], ...]  # OpenAI function definitions: {name, description?, parameters?}
    choice: str  # "auto" | "required" | "named"
    name: str | None = None  # the function `tool_choice` names
    parallel: bool = True


def parse_tools(body: dict[str, Any], parser: str | None) -> ToolRequest | None:
    """The request's tools, or None (no tools, or `tool_choice` "none": the model answers in text)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' needs 'tools'", param="tool_choice")
        if body.get("parallel_tool_calls") is not None:  # OpenAI refuses it too: there is nothing to call
            raise RequestError("'parallel_tool_calls' is only allowed when 'tools' are given",
                               param="parallel_tool_calls")
        return None
    if parser is None:
        raise RequestError("tools need a tool-call parser: start the worker with --tool-call-parser deepseekv3",
                           code="unsupported", param="tools")
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        name, params = fn.get("name"), fn.get("parameters")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'",
                               param="tools")
        if params is not None and not isinstance(params, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        functions.append({"name": name, "description": fn.get("description") or "",
                          "parameters": params or {"type": "object", "properties": {}}})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise RequestError("tool names must be unique", param="tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if choice is None or choice == "auto":
        return ToolRequest(tuple(functions), "auto", parallel=parallel is not False)
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(tuple(functions), "required", parallel=parallel is not False)
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError("'tool_choice' must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if fn["name"] not in names:
        raise RequestError(f"'tool_choice' names {fn['name']!r}, which is not in 'tools'", param="tool_choice")
    return ToolRequest(tuple(functions), "named", fn["name"], parallel=False)


def tools_system_prompt(request: ToolRequest) -> str:
    """The tools' names, descriptions and parameter schemas, compact (every byte is a prompt token to pay for).
    The call format is not spelled out: V3 and R1 are trained on their own tool-call tokens, and a forced
    call ("required", a named function) is held to it by the grammar anyway."""
    lines = ["## Tools", "You may call these tools:"]
    for fn in request.tools:
        lines += [f"### {fn['name']}"] + ([fn["description"]] if fn["description"] else [])
        lines.append(f"Parameters: {json.dumps(fn['parameters'], separators=(',', ':'))}")
    return "\n".join(lines)


def _literal(text: str) -> Any:
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text))


def required_grammar(request: ToolRequest) -> GrammarSpec:
    """A grammar for 1 call (a named function, or no parallel calls) or up to MAX_PARALLEL_CALLS calls of
    any of the tools, each in V3's format with arguments valid by the function's schema."""
    import xgrammar as xgr

    calls = []
    for fn in request.tools:
        if request.name is not None and fn["name"] != request.name:
            continue
        args = json_schema_grammar(json.dumps(fn["parameters"]))
        calls.append(xgr.Grammar.concat(_literal(f"{CALL_BEGIN}function{SEP}{fn['name']}\n```json\n"), args,
                                        _literal(f"\n```{CALL_END}")))
    one = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    sequences = []
    for count in range(1, (MAX_PARALLEL_CALLS if request.parallel else 1) + 1):
        parts = [_literal(CALLS_BEGIN), one]
        for _ in range(count - 1):
            parts += [_literal("\n"), one]
        sequences.append(xgr.Grammar.concat(*parts, _literal(CALLS_END)))
    grammar = sequences[0] if len(sequences) == 1 else xgr.Grammar.union(*sequences)
    return GrammarSpec("ebnf", str(grammar))


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content before the calls, OpenAI tool_calls) of an answer; no calls: (text, [])."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return text, []
    calls = []
    for kind, name, args in _CALL.findall(text[start:]):
        try:
            arguments = json.dumps(json.loads(args), ensure_ascii=False)
        except json.JSONDecodeError:
            arguments = args  # OpenAI's arguments are a string the client parses; pass what the model wrote
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": kind.strip() or "function",
                      "function": {"name": name.strip(), "arguments": arguments}})
    if not calls:
        return text, []
    return text[:start], calls


def render_tool_call(call: dict[str, Any]) -> str:
    """A past assistant call, as V3's template writes it into the prompt."""
    fn = call.get("function") or {}
    arguments = fn.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return f"{CALL_BEGIN}{call.get('type', 'function')}{SEP}{fn.get('name', '')}\n```json\n{arguments}\n```{CALL_END}"
