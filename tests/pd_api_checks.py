"""Checks of issue 21's API features through a served PD system (router + prefill + decode), shared by the
PD test modules: each answer equals colocated generation in this process (`engine.llm.LLM`) and the pools
go back to idle."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
from pd_system import PDSystem, http, wait_idle

from engine.grammar import GrammarSpec
from engine.llm import LLM
from engine.sampling import SamplingParams


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
                jsonschema.validate(json.loads(text, strict=False), json.loads(self.spec.text))
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
