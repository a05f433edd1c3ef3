"""Every request field OpenAI, vLLM and SGLang document is honoured or refused with a 4xx naming it (issue 21).

The peers' field lists below are copied from their sources (vLLM `vllm/entrypoints/openai/protocol.py`
ChatCompletionRequest / CompletionRequest, plus `structured_outputs` of later versions; SGLang
`python/sglang/srt/entrypoints/openai/protocol.py` CompletionRequest / ChatCompletionRequest; OpenAI's API
reference), independently of tandem's own table (`engine.server.fields`). For each field and endpoint, a
value that asks for something is sent to the parser:
- refused: a RequestError (4xx) whose `param` names the field;
- honoured: the parse differs from the same body without the field (it reaches the engine request or the
  reply's shape);
- accepted without effect: only the fields `fields.NO_EFFECT` lists, each with its reason.
A field that is accepted and changes nothing, outside NO_EFFECT, fails the test: that is silent ignoring.
"""

from __future__ import annotations

from typing import Any

import pytest
from byte_codec import ByteCodec

from engine.server import fields
from engine.server.protocol import ParsedRequest, RequestError, parse_request

OPENAI_COMPLETION = """model prompt best_of echo frequency_penalty logit_bias logprobs max_tokens n presence_penalty
seed stop stream stream_options suffix temperature top_p user""".split()
OPENAI_CHAT = """messages model audio frequency_penalty function_call functions logit_bias logprobs
max_completion_tokens max_tokens metadata modalities n parallel_tool_calls prediction presence_penalty
prompt_cache_key reasoning_effort response_format safety_identifier seed service_tier stop store stream
stream_options temperature tool_choice tools top_logprobs top_p user verbosity web_search_options""".split()
VLLM_SAMPLING = """best_of use_beam_search top_k min_p repetition_penalty length_penalty stop_token_ids
include_stop_str_in_output ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens
truncate_prompt_tokens prompt_logprobs allowed_token_ids""".split()
VLLM_COMPLETION = OPENAI_COMPLETION + VLLM_SAMPLING + """prompt_embeds add_special_tokens response_format
guided_json guided_regex guided_choice guided_grammar guided_decoding_backend guided_whitespace_pattern
priority request_id logits_processors return_tokens_as_token_ids cache_salt kv_transfer_params vllm_xargs
structured_outputs""".split()
VLLM_CHAT = OPENAI_CHAT + VLLM_SAMPLING + """bad_words echo add_generation_prompt continue_final_message
add_special_tokens documents chat_template chat_template_kwargs mm_processor_kwargs guided_json guided_regex
guided_choice guided_grammar structural_tag guided_decoding_backend guided_whitespace_pattern priority
request_id logits_processors return_tokens_as_token_ids cache_salt kv_transfer_params vllm_xargs
include_reasoning structured_outputs""".split()
SGLANG_EXTRA = """top_k min_p min_tokens regex ebnf repetition_penalty stop_token_ids stop_regex no_stop_trim
ignore_eos skip_special_tokens lora_path session_id session_params response_format custom_params
custom_logit_processor images_config bootstrap_host bootstrap_port bootstrap_room routed_dp_rank
disagg_prefill_dp_rank data_parallel_rank rid extra_key cache_salt ngram_corpus_id priority custom_labels
return_hidden_states return_routed_experts routed_experts_start_len return_cached_tokens_details
return_token_ids""".split()
SGLANG_COMPLETION = OPENAI_COMPLETION + SGLANG_EXTRA + ["json_schema"]
SGLANG_CHAT = OPENAI_CHAT + SGLANG_EXTRA + """return_prompt_token_ids return_meta_info task continue_final_message
separate_reasoning stream_reasoning chat_template_kwargs max_dynamic_patch min_dynamic_patch
use_audio_in_video input_ids reasoning""".split()
PEERS = {"completion": sorted({*VLLM_COMPLETION, *SGLANG_COMPLETION}), "chat": sorted({*VLLM_CHAT, *SGLANG_CHAT})}

BOOT = {"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 2}
# Hand-written values that ask for something, for the fields tandem honours: (base additions, the field's
# additions). Fields not here get a generic value that asks for something and must be refused.
HONOURED_SAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "max_tokens": ({}, {"max_tokens": 7}), "max_completion_tokens": ({}, {"max_completion_tokens": 7}),
    "temperature": ({}, {"temperature": 0.5}), "top_p": ({}, {"top_p": 0.5}), "top_k": ({}, {"top_k": 5}),
    "min_p": ({}, {"min_p": 0.1}), "seed": ({}, {"seed": 3}), "presence_penalty": ({}, {"presence_penalty": 0.5}),
    "frequency_penalty": ({}, {"frequency_penalty": 0.5}), "repetition_penalty": ({}, {"repetition_penalty": 1.1}),
    "logit_bias": ({}, {"logit_bias": {"5": 1}}), "stop": ({}, {"stop": ["x"]}),
    "stop_token_ids": ({}, {"stop_token_ids": [5]}), "ignore_eos": ({}, {"ignore_eos": True}),
    "min_tokens": ({}, {"min_tokens": 2}), "n": ({}, {"n": 2}), "best_of": ({"n": 2}, {"best_of": 3}),
    "stream": ({}, {"stream": True}), "stream_options": ({"stream": True}, {"stream_options": {"include_usage": True}}),
    "truncate_prompt_tokens": ({}, {"truncate_prompt_tokens": 1}), "echo": ({}, {"echo": True}),
    "rid": ({}, {"rid": "r"}), "model": ({}, {"model": "someone-else"}),
    "bootstrap_host": ({}, BOOT), "bootstrap_port": ({}, BOOT), "bootstrap_room": ({}, BOOT),
    "data_parallel_rank": ({}, {"data_parallel_rank": 0}), "routed_dp_rank": ({}, {"routed_dp_rank": 0}),
    "disagg_prefill_dp_rank": (BOOT, {"disagg_prefill_dp_rank": 1}),
    "prompt_logprobs": ({}, {"prompt_logprobs": 1}),
}
BASE = {"completion": {"prompt": "ab"}, "chat": {"messages": [{"role": "user", "content": "ab"}]}}


class BosCodec(ByteCodec):
    """Adds a BOS (id 1) when asked to add special tokens, so `add_special_tokens` shows in the ids."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + super().encode(text)


def _parse(body: dict[str, Any], kind: str) -> ParsedRequest:
    """Parsed as a worker with every feature on (tool-call and reasoning parsers) parses it."""
    return parse_request(body, kind, BosCodec(), 256, "tiny", 4096, header_rid="fixed",
                         tool_call_parser="deepseekv3", reasoning_parser="deepseek-r1")


def _kind_samples(kind: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    samples = dict(HONOURED_SAMPLES)
    if kind == "chat":
        samples["logprobs"] = ({}, {"logprobs": True})
        samples["top_logprobs"] = ({"logprobs": True}, {"top_logprobs": 2})
        samples["messages"] = ({}, {"messages": [{"role": "user", "content": "cd"}]})
        samples["add_special_tokens"] = ({}, {"add_special_tokens": False})
        for name in ("separate_reasoning", "stream_reasoning", "include_reasoning"):  # default True
            samples[name] = ({}, {name: False})
        samples["tools"] = ({}, {"tools": [{"type": "function", "function": {"name": "f"}}]})
        samples["tool_choice"] = ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                                  {"tool_choice": "required"})
        samples["parallel_tool_calls"] = ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                                          {"parallel_tool_calls": False})
    else:
        samples["logprobs"] = ({}, {"logprobs": 1})
        samples["prompt"] = ({}, {"prompt": "cd"})
        samples["add_special_tokens"] = ({}, {"add_special_tokens": False})
    return samples


def _asking_value(name: str) -> Any:
    """A value of `name` that asks for something (none of its neutral values)."""
    neutral = fields.NEUTRAL.get(name, ())
    for candidate in (True, 1, 5, "x", ["x"], {"x": 1}, {"name": "f"}, 2.0, "required", ["audio"]):
        if not any(type(candidate) is type(ok) and candidate == ok for ok in neutral):
            if isinstance(candidate, bool) and False not in neutral and True not in neutral and neutral:
                continue  # a field whose neutral values are not booleans gets a value of its own type
            return candidate
    raise AssertionError(name)


CASES = [(kind, name) for kind, names in PEERS.items() for name in names]


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_every_field_a_peer_documents_is_honoured_or_refused_naming_it(kind: str, name: str) -> None:
    samples = _kind_samples(kind)
    base_extra, sample = samples.get(name, ({}, {name: _asking_value(name)}))
    base = {**BASE[kind], **base_extra}
    without = _parse(base, kind)
    try:
        parsed = _parse({**base, **sample}, kind)
    except RequestError as exc:
        assert 400 <= exc.status < 500
        assert exc.param is not None and exc.param.split(".")[0] == name, (name, exc.param, str(exc))
        return
    if name in fields.NO_EFFECT:
        assert parsed == without, f"{name} is listed as having no effect but changed the request"
        return
    assert parsed != without, f"'{name}' was accepted and changed nothing: silently ignored"


@pytest.mark.parametrize("kind", ["completion", "chat", "generate"])
def test_a_field_no_peer_documents_is_refused_as_unrecognized(kind: str) -> None:
    body = {**BASE.get(kind, {"text": "ab"}), "temprature": 0.5}  # a typo must not pass as the default
    with pytest.raises(RequestError) as info:
        _parse(body, kind)
    assert info.value.status == 400 and info.value.param == "temprature"


def test_neutral_values_of_unimplemented_fields_pass() -> None:
    """Clients (the OpenAI SDK, vLLM's and SGLang's benchmarks) send peers' defaults; those are accepted."""
    body = {"prompt": "ab", "best_of": 1, "suffix": "", "use_beam_search": False, "length_penalty": 1.0,
            "skip_special_tokens": True, "spaces_between_special_tokens": True, "include_stop_str_in_output": False,
            "response_format": {"type": "text"}, "priority": 0, "user": "u"}
    assert _parse(body, "completion").request.input_ids == [1, 97, 98]
    chat = {**BASE["chat"], "tool_choice": "none", "tools": [],
            "add_generation_prompt": True, "separate_reasoning": True, "include_reasoning": True}
    assert _parse(chat, "chat").request.input_ids


def test_sglang_sampling_params_follow_the_same_rules() -> None:
    ok = _parse({"text": "ab", "sampling_params": {"max_new_tokens": 3, "min_p": 0.2, "sampling_seed": 9}},
                "generate")
    assert (ok.request.sampling.max_new_tokens, ok.request.sampling.min_p, ok.request.sampling.seed) == (3, 0.2, 9)
    regex = _parse({"text": "ab", "sampling_params": {"regex": "a+"}}, "generate").request.sampling
    assert (regex.grammar_kind, regex.grammar) == ("regex", "a+")
    for params, param in (({"ebnf": "x"}, "sampling_params.ebnf"),  # not a grammar
                          ({"structural_tag": "{}"}, "sampling_params.structural_tag"),
                          ({"stop_regex": "a+"}, "sampling_params.stop_regex"),
                          ({"max_new_tokns": 3}, "sampling_params.max_new_tokns")):
        with pytest.raises(RequestError) as info:
            _parse({"text": "ab", "sampling_params": params}, "generate")
        assert info.value.param == param
    with pytest.raises(RequestError) as info:  # a top-level sampling field beside sampling_params is not used
        _parse({"text": "ab", "sampling_params": {}, "temperature": 0}, "generate")
    assert info.value.param == "temperature"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": "a", "stream": True, "stream_options": {"include_usagee": True}}, 400,
         "stream_options.include_usagee"),
        ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "a", "stop_token_ids": [256]}, 400, "stop_token_ids"),
        ({"prompt": "a", "bootstrap_room": 5}, 400, "bootstrap_room"),
        ({"prompt": "a", "min_p": 1.5}, 400, "min_p"),
        ({"prompt": "a", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
        ({"prompt": "a", "n": 0}, 400, "n"),
        ({"prompt": ["a", "b"], "rid": ["x"]}, 400, "rid"),
        ({"prompt": ["a", "b"], **BOOT}, 400, "bootstrap_room"),  # two choices need two rooms
    ],
)
def test_bad_values_are_4xx_naming_the_field(body: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(RequestError) as info:
        _parse(body, "completion")
    assert (info.value.status, info.value.param) == (status, param)
    if status == 404:
        assert info.value.code == "model_not_found"


def test_developer_role_is_a_system_message() -> None:
    as_developer = _parse({"messages": [{"role": "developer", "content": "be brief"},
                                        {"role": "user", "content": "hi"}]}, "chat")
    as_system = _parse({"messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hi"}]}, "chat")
    assert as_developer.request.input_ids == as_system.request.input_ids


def test_n_and_list_prompts_become_one_request_per_choice_with_derived_seeds() -> None:
    parsed = _parse({"prompt": [[97, 98], [5, 6]], "n": 3, "seed": 10, "echo": True}, "completion")
    assert [r.input_ids for r in parsed.requests] == [[97, 98]] * 3 + [[5, 6]] * 3
    assert [r.sampling.seed for r in parsed.requests] == [10, 11, 12] * 2  # vLLM's seed + index per choice
    assert [r.rid for r in parsed.requests] == [f"fixed-{i}" for i in range(6)]
    assert parsed.echo_prompts == ["ab"] * 3 + ["\x05\x06"] * 3  # token-id prompts echo their text
    assert parsed.response_id == "fixed"
    routed = _parse({"prompt": ["ab", "cd"], "rid": ["a", "b"], "bootstrap_host": "h", "bootstrap_port": 1,
                     "bootstrap_room": [7, 8]}, "completion")
    assert [(r.rid, r.bootstrap.room) for r in routed.requests] == [("a", 7), ("b", 8)]  # type: ignore[union-attr]


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("extra", "kind", "text"),
    [
        ({"response_format": {"type": "json_object"}}, "json", '{"type": "object"}'),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
         "json", None),
        ({"guided_json": SCHEMA}, "json", None),
        ({"json_schema": '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'},
         "json", None),
        ({"structured_outputs": {"json": SCHEMA}}, "json", None),
        ({"structured_outputs": {"json_object": True}}, "json", '{"type": "object"}'),
        ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+"),
        ({"regex": "[a-z]+"}, "regex", "[a-z]+"),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+"),
        ({"guided_choice": ["yes", "no"]}, "choice", '["yes", "no"]'),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", '["yes", "no"]'),
        ({"guided_grammar": 'root ::= "a"'}, "ebnf", 'root ::= "a"'),
        ({"ebnf": 'root ::= "a"'}, "ebnf", 'root ::= "a"'),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "ebnf", 'root ::= "a"'),
    ],
)
def test_every_spelling_of_structured_output_reaches_the_engine(extra: dict[str, Any], kind: str,
                                                                 text: str | None) -> None:
    import json

    for endpoint in ("completion", "chat"):
        sampling = _parse({**BASE[endpoint], **extra}, endpoint).request.sampling
        assert sampling.grammar_kind == kind
        assert sampling.grammar == (text if text is not None else json.dumps(SCHEMA))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, "guided_json"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"regex": "a{2,1}"}, "regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"ebnf": "root ::= undefined_rule"}, "ebnf"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "structural_tag", "structures": [], "triggers": []}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),  # one kind per request
    ],
)
def test_a_bad_grammar_is_a_400_naming_its_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        _parse({**BASE["completion"], **extra}, "completion")
    assert (info.value.status, info.value.param) == (400, param), str(info.value)
