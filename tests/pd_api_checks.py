"""Checks of issue 21's API features through a served PD system (router + prefill + decode), shared by the
PD test modules: each answer equals colocated generation in this process (`engine.llm.LLM`) and the pools
go back to idle."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from pd_system import PDSystem, http, wait_idle

from engine.chat_template import ChatTemplate
from engine.grammar import GrammarSpec
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.server.chat_output import ChatOutputSplitter, whole_message
from engine.server.protocol import parse_request


def _choices(raw: bytes, stream: bool) -> dict[int, str]:
    """Each choice's whole text, from an answer or from a stream's chunks (choices interleaved)."""
    if not stream:
        return {c["index"]: c["text"] for c in json.loads(raw)["choices"]}
    texts: dict[int, str] = {}
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            assert "error" not in event, event
            for c in event["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    return texts


def check_n_and_list_prompts(system: PDSystem, reference: LLM) -> None:
    """`n` = 4 over two prompts (a list), seeded, temperature 1: choice 4p + j equals a single request for
    prompt p with seed + j (vLLM's derivation), both through the router, and equals colocated sampling with
    that seed; streamed and not. Then both workers are idle."""
    prompts = [[*range(30, 70)], [*range(100, 123)]]
    seed, n, new = 41, 4, 6
    expected = [reference.generate([p], SamplingParams(temperature=1.0, seed=seed + j, max_new_tokens=new,
                                                       ignore_eos=True))[0].text
                for p in prompts for j in range(n)]
    assert len(set(expected)) > 1  # the derived seeds draw different samples: the check can tell them apart
    for stream in (False, True):
        body: dict[str, Any] = {"prompt": prompts, "n": n, "seed": seed, "temperature": 1.0, "max_tokens": new,
                                "ignore_eos": True, "stream": stream}
        status, raw = http("POST", system.router.url + "/v1/completions", body)
        assert status == 200, raw
        got = _choices(raw, stream)
        assert [got[i] for i in range(len(expected))] == expected, stream
    for i, prompt in enumerate(prompts):
        single = {"prompt": prompt, "seed": seed + 2, "temperature": 1.0, "max_tokens": new, "ignore_eos": True}
        status, raw = http("POST", system.router.url + "/v1/completions", single)
        assert status == 200 and _choices(raw, False) == {0: expected[i * n + 2]}, raw
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)


# --- structured output ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StructuredCase:
    """One constrained request: its prompt, the grammar the server must build from `fields`, and a check of
    the answer that does not use xgrammar (jsonschema, `re`, membership)."""

    prompt: list[int]
    endpoint: str  # "/v1/completions" | "/generate"
    fields: dict[str, Any]  # the request's structured-output fields, in one peer's spelling
    spec: GrammarSpec
    seed: int
    stream: bool

    def valid(self, text: str) -> bool:
        if self.spec.kind == "json":
            try:
                jsonschema.validate(json.loads(text), json.loads(self.spec.text))
            except (ValueError, jsonschema.ValidationError):
                return False
            return True
        if self.spec.kind == "regex":
            return re.fullmatch(self.spec.text, text) is not None
        return text in json.loads(self.spec.text)


def _leaf(rng: random.Random) -> dict[str, Any]:
    roll = rng.randrange(5)
    if roll == 0:
        low = rng.randrange(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randrange(0, 500)}
    if roll == 1:
        return {"type": "string", "minLength": rng.randrange(0, 2), "maxLength": rng.randrange(2, 7)}
    if roll == 2:
        return {"type": "boolean"}
    if roll == 3:
        return {"enum": rng.sample(["red", "green", "blue", 7, "x y", True], rng.randrange(1, 4))}
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": rng.randrange(1, 4)}


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A small random object schema: bounded leaves (so a sampled answer ends well within its tokens),
    nested objects, optional and required properties."""
    names = rng.sample(["id", "name", "ok", "tags", "size", "kind", "meta"], rng.randrange(1, 4))
    props = {n: (random_schema(rng, depth + 1) if depth < 1 and rng.random() < 0.25 else _leaf(rng)) for n in names}
    return {"type": "object", "properties": props, "required": rng.sample(names, rng.randrange(1, len(names) + 1)),
            "additionalProperties": False}


REGEXES = [r"[a-z]{1,6}", r"\d{3}-\d{2}", r"(yes|no|maybe)!?", r"[A-F0-9]{2}(:[A-F0-9]{2}){0,3}", r"ab*c?d+"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]


def structured_cases(count: int, seed: int) -> list[StructuredCase]:
    """`count` cases: JSON schemas (most), regexes and choices, in every peer's spelling, streamed and not."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 40))]
        kind = ("json", "json", "regex", "choice")[i % 4]
        if kind == "json":
            schema = random_schema(rng)
            spec = GrammarSpec("json", json.dumps(schema))
            spellings: list[tuple[str, dict[str, Any]]] = [
                ("/v1/completions", {"guided_json": schema}),
                ("/v1/completions", {"response_format": {"type": "json_schema",
                                                         "json_schema": {"name": "s", "schema": schema}}}),
                ("/v1/completions", {"structured_outputs": {"json": schema}}),
                ("/generate", {"json_schema": json.dumps(schema)}),
            ]
        elif kind == "regex":
            pattern = rng.choice(REGEXES)
            spec = GrammarSpec("regex", pattern)
            spellings = [("/v1/completions", {"guided_regex": pattern}), ("/v1/completions", {"regex": pattern}),
                         ("/generate", {"regex": pattern})]
        else:
            words = rng.sample(WORDS, rng.randrange(2, 5))
            spec = GrammarSpec("choice", json.dumps(words))
            spellings = [("/v1/completions", {"guided_choice": words}),
                         ("/v1/completions", {"structured_outputs": {"choice": words}})]
        endpoint, fields = spellings[(i // 4) % len(spellings)]
        cases.append(StructuredCase(prompt, endpoint, fields, spec, seed=1000 + i, stream=i % 2 == 1))
    return cases


STRUCTURED_MAX_TOKENS = 320


def structured_expected(reference: LLM, cases: list[StructuredCase]) -> list[str]:
    """Colocated generation of every case in this process, batched: the text each answer must equal."""
    params = [SamplingParams(temperature=1.0, seed=c.seed, max_new_tokens=STRUCTURED_MAX_TOKENS, grammar=c.spec)
              for c in cases]
    return [o.text for o in reference.generate([c.prompt for c in cases], params)]


def _structured_answer(base_url: str, case: StructuredCase) -> tuple[str, str | None]:
    """(text, finish reason) of one constrained request."""
    if case.endpoint == "/generate":
        body: dict[str, Any] = {"input_ids": case.prompt, "stream": case.stream, "sampling_params": {
            "temperature": 1.0, "sampling_seed": case.seed, "max_new_tokens": STRUCTURED_MAX_TOKENS, **case.fields}}
    else:
        body = {"prompt": case.prompt, "temperature": 1.0, "seed": case.seed, "max_tokens": STRUCTURED_MAX_TOKENS,
                "stream": case.stream, **case.fields}
    status, raw = http("POST", base_url + case.endpoint, body, timeout_s=300)
    assert status == 200, raw[:500]
    if case.endpoint == "/generate":
        events = ([json.loads(raw)] if not case.stream else
                  [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")])
        reason = events[-1]["meta_info"]["finish_reason"]
        return events[-1]["text"], reason["type"] if reason else None
    if not case.stream:
        choice = json.loads(raw)["choices"][0]
        return choice["text"], choice["finish_reason"]
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def check_structured_output(system: PDSystem, cases: list[StructuredCase], expected: list[str]) -> None:
    """Every case through the router (prefill masks and draws token 0, decode replays it and masks the
    rest), sent at once: each answer is valid by its schema, regex or choice, ended by its grammar (not by
    running out of tokens), and equals colocated generation with the same seed. Then the pools are idle."""
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: _structured_answer(system.router.url, c), cases))
    for i, (case, (text, reason), want) in enumerate(zip(cases, answers, expected, strict=True)):
        where = (i, case.endpoint, case.fields, case.stream)
        assert reason == "stop", (where, text, reason)
        assert case.valid(text), (where, text)
        assert text == want, (where, text, want)
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)


# --- tool calls and reasoning ----------------------------------------------------------------------------
API_FLAGS = ["--tool-call-parser", "deepseekv3", "--reasoning-parser", "deepseek-r1"]
TOOLS = [  # small: the tiny model's context is 512 tokens, one per byte
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"enum": [1, 2, 3]}, "b": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "city", "parameters": {
        "type": "object", "properties": {"n": {"type": "string", "maxLength": 5}}, "required": ["n"]}}},
]
CONVERSATION = [  # R1-style: a system turn, a past exchange, and the question
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+4?"},
]


def _chat(system: PDSystem, body: dict[str, Any]) -> dict[str, Any]:
    """The whole message of a chat answer through the router (streamed deltas joined when `stream`)."""
    status, raw = http("POST", system.router.url + "/v1/chat/completions", body, timeout_s=300)
    assert status == 200, raw[:500]
    if not body.get("stream"):
        choice = json.loads(raw)["choices"][0]
        return {**choice["message"], "finish_reason": choice["finish_reason"]}
    message: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": []}
    for line in raw.decode().splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line[6:])["choices"]:
            delta = choice["delta"]
            message["content"] += delta.get("content") or ""
            message["reasoning_content"] += delta.get("reasoning_content") or ""
            message["tool_calls"] += delta.get("tool_calls") or []
            message["finish_reason"] = choice["finish_reason"] or message.get("finish_reason")
    return message


def _colocated_chat(reference: LLM, model_dir: Path, body: dict[str, Any]) -> str:
    """The answer text colocated generation gives the same request (prompt and grammar as a worker builds
    them, the same seed)."""
    parsed = parse_request(body, "chat", reference.tokenizer, reference.config.vocab_size, "x", 100_000,
                           ChatTemplate.from_model_dir(model_dir), tool_call_parser="deepseekv3",
                           reasoning_parser="deepseek-r1")
    spec = parsed.request.sampling
    grammar = GrammarSpec(spec.grammar_kind, spec.grammar) if spec.grammar_kind else None
    params = SamplingParams(temperature=1.0, seed=body["seed"], max_new_tokens=spec.max_new_tokens, grammar=grammar)
    return reference.generate([parsed.request.input_ids], params)[0].text


def check_tool_calls_and_reasoning(system: PDSystem, reference: LLM, model_dir: Path, count: int = 4) -> None:
    """`tool_choice` "required" and a named function at temperature 1: every answer's tool_calls parse,
    name a given tool (the named one) and carry arguments valid by its schema, streamed and not, and equal
    colocated generation. A reasoning answer (its shape forced by a regex) comes apart at R1's </think>
    into reasoning_content and content. Then the pools are idle."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for i in range(count):
        named = i % 2 == 1
        body: dict[str, Any] = {
            "messages": CONVERSATION[-1:], "tools": TOOLS, "temperature": 1.0, "seed": 500 + i, "max_tokens": 180,
            "stream": i % 4 >= 2, "parallel_tool_calls": False,
            "tool_choice": {"type": "function", "function": {"name": "add"}} if named else "required"}
        message = _chat(system, body)
        assert message["finish_reason"] == "tool_calls", message
        calls = message["tool_calls"]
        assert calls and (len(calls) == 1 or not named), message
        for call in calls:
            name = call["function"]["name"]
            assert name in schemas and (name == "add" or not named), call
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])
        expected = whole_message(_split_all(_colocated_chat(reference, model_dir, body)))
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in expected["tool_calls"]] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls]
    for stream in (False, True):
        body = {"messages": CONVERSATION, "temperature": 1.0, "seed": 77, "max_tokens": 100, "stream": stream,
                "guided_regex": "[a-z]{1,8} [a-z]{1,8}</think>[a-z]{1,8}"}
        message = _chat(system, body)
        text = _colocated_chat(reference, model_dir, body)
        thought, answer = text.split("</think>")
        assert (message["reasoning_content"], message["content"]) == (thought, answer), (message, text)
        assert message["finish_reason"] == "stop"
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)


def _split_all(text: str) -> list[dict[str, Any]]:
    splitter = ChatOutputSplitter(reasoning=False, tools=True)  # a forced call has no reasoning part
    return splitter.feed(text) + splitter.finish()


# --- prompt log-probabilities ----------------------------------------------------------------------------
def check_prompt_logprobs(system: PDSystem, reference: LLM) -> None:
    """Prompt logprobs in every peer's spelling through the router equal colocated generation's (the engine's
    own, which tests/test_engine_hf_parity.py holds to transformers within 1e-4): OpenAI's echo + logprobs,
    vLLM's prompt_logprobs (completions and chat), SGLang's logprob_start_len. The router serves them on
    decode alone (the prefill instance sees none of them); with bootstrap fields they are a 400."""
    prompt = [*range(40, 100)]
    ref = reference.generate([prompt], SamplingParams(max_new_tokens=3), prompt_logprobs=2)[0]
    assert ref.prompt_logprobs is not None and ref.prompt_top_logprobs is not None

    def close(got: list[float | None], want: list[float | None]) -> bool:
        return len(got) == len(want) and all((g is None and w is None) or (g is not None and w is not None
                                                                          and abs(g - w) < 1e-4)
                                              for g, w in zip(got, want, strict=True))

    before = json.loads(http("GET", system.prefill.url + "/server_info")[1])["num_requests"]
    base = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
    status, raw = http("POST", system.router.url + "/v1/completions", {**base, "echo": True, "logprobs": 2})
    assert status == 200, raw
    lp = json.loads(raw)["choices"][0]["logprobs"]
    assert close(lp["token_logprobs"][: len(prompt)], ref.prompt_logprobs)
    assert lp["top_logprobs"][0] is None and len(lp["top_logprobs"][1]) == 2
    status, raw = http("POST", system.router.url + "/v1/completions", {**base, "prompt_logprobs": 0})
    assert status == 200, raw
    vllm = json.loads(raw)["choices"][0]["prompt_logprobs"]
    assert close([None if e is None else e[str(t)]["logprob"] for t, e in zip(prompt, vllm, strict=True)],
                 ref.prompt_logprobs)
    gen = {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 10, "top_logprobs_num": 2,
           "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    status, raw = http("POST", system.router.url + "/generate", gen)
    assert status == 200, raw
    meta = json.loads(raw)["meta_info"]
    assert close([e[0] for e in meta["input_token_logprobs"]], ref.prompt_logprobs[10:])
    assert [[t for _, t, _ in top] for top in meta["input_top_logprobs"]] == [
        [t for t, _ in top] for top in ref.prompt_top_logprobs[10:]]
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "prompt_logprobs": 1}
    status, raw = http("POST", system.router.url + "/v1/chat/completions", chat)
    assert status == 200 and json.loads(raw)["prompt_logprobs"][0] is None, raw
    assert json.loads(http("GET", system.prefill.url + "/server_info")[1])["num_requests"] == before
    boot = {**base, "prompt_logprobs": 0, "bootstrap_host": "127.0.0.1", "bootstrap_port": system.bootstrap_port,
            "bootstrap_room": 12345}
    status, raw = http("POST", system.decode.url + "/v1/completions", boot)
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt_logprobs", raw
    wait_idle(system.decode.url)


def check_responses_api(system: PDSystem) -> None:
    """`/v1/responses` through the router (disaggregated like chat) answers what the same chat request does,
    whole and as events, with `text.format` as structured output."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    common = {"temperature": 0}  # the Responses API takes no seed: greedy answers compare
    chat = {"messages": [{"role": "system", "content": "Reply."}, {"role": "user", "content": "ready?"}],
            "max_tokens": 40, "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
            "separate_reasoning": False, **common}  # the system runs a reasoning parser: keep the text whole
    status, raw = http("POST", system.router.url + "/v1/chat/completions", chat)
    assert status == 200, raw
    expected = json.loads(raw)["choices"][0]["message"]["content"]
    assert isinstance(json.loads(expected)["ok"], bool)
    body = {"instructions": "Reply.", "input": "ready?", "max_output_tokens": 40,
            "text": {"format": {"type": "json_schema", "name": "r", "schema": schema}}, **common}
    status, raw = http("POST", system.router.url + "/v1/responses", body)
    assert status == 200, raw
    doc = json.loads(raw)
    assert doc["status"] == "completed" and doc["output"][0]["content"][0]["text"] == expected
    status, raw = http("POST", system.router.url + "/v1/responses", {**body, "stream": True})
    assert status == 200, raw
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == expected
    assert events[-1]["type"] == "response.completed"
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)
