"""The worker HTTP base over a scripted backend (the far side): shapes, streaming, errors, aborts."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import openai
import orjson
import pytest
from byte_codec import ByteCodec
from threaded_app import serve_in_thread

from engine.server.app import ServerConfig, WorkerApp
from engine.server.messages import GenerateRequest, TokenOutput
from kvtransfer.protocol import KV_REUSED_HEADER

REFUSED_TOKEN = 7  # a prompt starting with it is refused by the scripted ranks


class ScriptedBackend:
    """Echoes the prompt's bytes back one token per output, slowly enough to abort mid-way."""

    def __init__(self) -> None:
        self.submitted: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.delay_s = 0.0
        self.reused: int | None = None  # decode-side reuse: what the first output reports as held already

    async def submit(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        self.submitted.append(request)
        if request.input_ids[0] == REFUSED_TOKEN:  # what a rank answers for a prompt beyond its KV pool
            yield TokenOutput(rid=request.rid, token_ids=[], finished=True, finish_reason="error",
                              error="request needs 99 KV pages but the pool has 8", error_status=400,
                              error_code="invalid_request")
            return
        n = request.sampling.max_new_tokens
        ids = (request.input_ids * n)[:n]
        for i, tok in enumerate(ids):
            await asyncio.sleep(self.delay_s)
            last = i == len(ids) - 1
            yield TokenOutput(rid=request.rid, token_ids=[tok], finished=last,
                              finish_reason="length" if last else None, prompt_tokens=len(request.input_ids),
                              kv_reused_tokens=self.reused if i == 0 else None,
                              logprobs=[-0.25 * (i + 1)] if request.return_logprob else [],
                              top_logprobs=[[(tok + j, -0.25 * (i + 1) - j) for j in range(request.top_logprobs)]]
                              if request.top_logprobs else [])

    async def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    def info(self) -> dict:
        return {"free_pages": 7}


def _json_request(url: str, data: bytes | None = None, method: str | None = None) -> object:
    """A urllib request labelled as JSON (urllib labels a body as a form unless told otherwise)."""
    import urllib.request

    return urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})


@pytest.fixture
def server() -> Iterator[tuple[str, ScriptedBackend]]:
    backend = ScriptedBackend()
    app = WorkerApp(backend, ByteCodec(), ServerConfig("tiny", vocab_size=256, max_context=512, role="decode"))
    with serve_in_thread(app.build(), handler_cancellation=True) as url:
        yield url, backend


def test_completion_and_chat_shapes_parse_with_the_openai_sdk(server: tuple[str, ScriptedBackend]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.completions.create(model="tiny", prompt="abc", max_tokens=5)
    assert done.choices[0].text == "abcab" and done.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    assert chat.choices[0].message.content.startswith("<")  # the rendered template echoed back
    chat_chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                                      max_tokens=3, stream=True))
    assert [c.choices[0].delta.role for c in chat_chunks] == ["assistant"] + [None] * (len(chat_chunks) - 1)
    assert chat_chunks[-1].choices[0].finish_reason == "length"
    stream = client.completions.create(model="tiny", prompt="xyz", max_tokens=4, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "xyzx"
    assert chunks[-1].usage.completion_tokens == 4


def test_bootstrap_fields_reach_the_backend(server: tuple[str, ScriptedBackend]) -> None:
    import urllib.request

    url, backend = server
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 2},
            "bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 12345}
    req = _json_request(url + "/generate", data=orjson.dumps(body), method="POST")
    with urllib.request.urlopen(req) as resp:
        reply = orjson.loads(resp.read())
    assert reply["output_ids"] == [ord("h"), ord("e")]
    assert backend.submitted[-1].bootstrap is not None and backend.submitted[-1].bootstrap.room == 12345


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (orjson.dumps({"prompt": "a", "max_tokens": 0}), 400, "at least 1"),
        (orjson.dumps({"prompt": ""}), 400, "empty"),
        (orjson.dumps({"prompt": [1, 999]}), 400, "outside the vocabulary"),
        (orjson.dumps({"prompt": "a", "temperature": "hot"}), 400, "temperature"),
        (orjson.dumps({"prompt": "a", "max_tokens": 600}), 400, "context limit"),
    ],
)
def test_bad_requests_get_openai_style_errors(server: tuple[str, ScriptedBackend], body: bytes, status: int,
                                              needle: str) -> None:
    import urllib.error
    import urllib.request

    url, backend = server
    req = _json_request(url + "/v1/completions", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == status
    err = orjson.loads(info.value.read())["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert backend.submitted == []


def test_client_disconnect_aborts_the_request(server: tuple[str, ScriptedBackend]) -> None:
    url, backend = server
    backend.delay_s = 0.05
    host, port = url.removeprefix("http://").split(":")
    body = orjson.dumps({"prompt": "abc", "max_tokens": 200, "stream": True, "rid": "gone-1"})
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200" in sock.recv(4096)
    for _ in range(100):
        if backend.aborted:
            break
        threading.Event().wait(0.05)
    assert backend.aborted == ["gone-1"]


def test_output_logprobs_in_openai_shapes_streamed_or_not(server: tuple[str, ScriptedBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.completions.create(model="tiny", prompt="abc", max_tokens=4, logprobs=0)
    lp = done.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c", "a"] and lp.token_logprobs == [-0.25, -0.5, -0.75, -1.0]
    assert lp.text_offset == [0, 1, 2, 3]
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=2).choices[0].logprobs is None
    assert backend.submitted[-1].return_logprob is False

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == [-0.25, -0.5, -0.75]
    # The echoed chat template starts "<｜": a token is its own decoded text, U+FFFD for a piece of a character.
    assert [c.token for c in content] == ["<", "\ufffd", "\ufffd"] and content[0].bytes == [ord("<")]

    # "é" is two byte-tokens: the first is held back until the character completes, and its logprob
    # travels with the chunk that carries the character.
    chunks = list(client.completions.create(model="tiny", prompt="é", max_tokens=4, logprobs=0, stream=True))
    texts = [c.choices[0].text for c in chunks]
    per_chunk = [c.choices[0].logprobs.token_logprobs for c in chunks]
    assert "".join(texts) == "éé" and [len(x) for x in per_chunk] == [2, 2]
    assert sum(per_chunk, []) == [-0.25, -0.5, -0.75, -1.0]
    assert [c.choices[0].logprobs.text_offset[0] for c in chunks] == [0, 1]

    streamed = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                                   max_tokens=3, logprobs=True, stream=True))
    assert [c.logprob for ch in streamed for c in ch.choices[0].logprobs.content] == [-0.25, -0.5, -0.75]


def test_top_alternatives_per_position_in_openai_and_sglang_shapes(server: tuple[str, ScriptedBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.completions.create(model="tiny", prompt="ab", max_tokens=2, logprobs=2)
    lp = done.choices[0].logprobs
    assert lp.top_logprobs == [{"a": -0.25, "b": -1.25}, {"b": -0.5, "c": -1.5}]
    assert backend.submitted[-1].top_logprobs == 2 and backend.submitted[-1].return_logprob

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=1, logprobs=True, top_logprobs=3)
    top = chat.choices[0].logprobs.content[0].top_logprobs
    assert [(t.token, t.logprob) for t in top] == [("<", -0.25), ("=", -1.25), (">", -2.25)]

    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                                 max_tokens=2, logprobs=True, top_logprobs=1, stream=True))
    assert [len(c.top_logprobs) for ch in chunks for c in ch.choices[0].logprobs.content] == [1, 1]

    import urllib.request

    body = {"text": "xy", "sampling_params": {"max_new_tokens": 2}, "return_logprob": True, "top_logprobs_num": 2}
    with urllib.request.urlopen(_json_request(url + "/generate", data=orjson.dumps(body))) as resp:
        meta = orjson.loads(resp.read())["meta_info"]
    # SGLang's triples: [logprob, token id, text (None unless return_text_in_logprobs)]
    assert meta["output_token_logprobs"] == [[-0.25, 120, None], [-0.5, 121, None]]
    assert meta["output_top_logprobs"] == [[[-0.25, 120, None], [-1.25, 121, None]],
                                           [[-0.5, 121, None], [-1.5, 122, None]]]
    body["return_text_in_logprobs"] = True
    with urllib.request.urlopen(_json_request(url + "/generate", data=orjson.dumps(body))) as resp:
        meta = orjson.loads(resp.read())["meta_info"]
    assert meta["output_token_logprobs"] == [[-0.25, 120, "x"], [-0.5, 121, "y"]]


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "between 0 and 20"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 3},
         "needs 'logprobs': true"),
    ],
)
def test_impossible_logprob_requests_are_refused(server: tuple[str, ScriptedBackend], path: str,
                                                 body: dict, needle: str) -> None:
    import urllib.error
    import urllib.request

    url, backend = server
    req = _json_request(url + path, data=orjson.dumps(body), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 400 and needle in orjson.loads(info.value.read())["error"]["message"]
    assert backend.submitted == []


def test_stop_strings_end_the_text_and_the_request(server: tuple[str, ScriptedBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.completions.create(model="tiny", prompt="abcd", max_tokens=10, stop=["da", "zz"])
    assert done.choices[0].text == "abc" and done.choices[0].finish_reason == "stop"
    assert backend.aborted[-1] == backend.submitted[-1].rid  # generation stopped there, not at max_tokens

    chunks = list(client.completions.create(model="tiny", prompt="xyz", max_tokens=9, stop="zx", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "xy" and chunks[-1].choices[0].finish_reason == "stop"

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=40, stop=["User"])
    assert chat.choices[0].message.content == "<｜" and chat.choices[0].finish_reason == "stop"

    # A stop string that never appears changes nothing.
    done = client.completions.create(model="tiny", prompt="ab", max_tokens=4, stop=["q"])
    assert done.choices[0].text == "abab" and done.choices[0].finish_reason == "length"

    import urllib.request

    body = {"text": "hello", "sampling_params": {"max_new_tokens": 8, "stop": "lo"}}
    with urllib.request.urlopen(_json_request(url + "/generate", data=orjson.dumps(body))) as resp:
        reply = orjson.loads(resp.read())
    assert reply["text"] == "hel" and reply["meta_info"]["finish_reason"] == {"type": "stop", "matched": "lo"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "a", "n": 2, "best_of": 3}, "'best_of' other than 'n' is not supported"),
        ({"prompt": "a", "presence_penalty": 2.5}, "'presence_penalty' must be in [-2, 2]"),
        ({"prompt": "a", "repetition_penalty": 0}, "'repetition_penalty' must be in (0, 10]"),
        ({"prompt": "a", "logit_bias": {"5": 101}}, "'logit_bias' values must be numbers in [-100, 100]"),
        ({"prompt": "a", "logit_bias": {"999": 1}}, "outside the vocabulary"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "'logit_bias' keys must be token ids"),
        ({"prompt": "a", "max_tokens": 4, "min_tokens": 5}, "min tokens must be between 0 and the max tokens"),
        ({"prompt": "a", "stop": ["ok", ""]}, "'stop' must be"),
        ({"prompt": "a", "stop": [str(i) for i in range(17)]}, "at most 16"),
        ({"prompt": "a", "echo": True, "logprobs": 0, "stream": True}, "not available when streaming"),
    ],
)
def test_parameters_that_would_be_ignored_are_refused(server: tuple[str, ScriptedBackend], body: dict,
                                                      needle: str) -> None:
    import urllib.error
    import urllib.request

    url, backend = server
    ok = {"prompt": "a", "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
          "response_format": {"type": "text"}}  # the neutral values pass
    with urllib.request.urlopen(_json_request(url + "/v1/completions", data=orjson.dumps(ok))) as resp:
        assert resp.status == 200
    before = len(backend.submitted)
    req = _json_request(url + "/v1/completions", data=orjson.dumps(body), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 400 and needle in orjson.loads(info.value.read())["error"]["message"]
    assert len(backend.submitted) == before


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_ranks_refuse_as_bad_input_is_a_400_streamed_or_not(
        server: tuple[str, ScriptedBackend], stream: bool) -> None:
    """Not a 500, and for a stream not a 200 whose events carry the error: the status the rank chose."""
    import urllib.error
    import urllib.request

    url, _ = server
    body = orjson.dumps({"prompt": [REFUSED_TOKEN, 1], "max_tokens": 2, "stream": stream})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(_json_request(url + "/v1/completions", data=body, method="POST"))
    assert info.value.code == 400
    err = orjson.loads(info.value.read())["error"]
    assert err == {"message": "request needs 99 KV pages but the pool has 8", "type": "invalid_request_error",
                   "code": "invalid_request", "param": None}


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/no/such/route", 404),
                                                        ("GET", "/v1/completions", 405),
                                                        ("DELETE", "/health", 405)])
def test_unknown_routes_and_wrong_methods_get_the_json_error_body(
        server: tuple[str, ScriptedBackend], method: str, path: str, status: int) -> None:
    import urllib.error
    import urllib.request

    url, _ = server
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(_json_request(url + path, method=method))
    assert info.value.code == status and info.value.headers["Content-Type"].startswith("application/json")
    err = orjson.loads(info.value.read())["error"]
    want = "not_found_error" if status == 404 else "invalid_request_error"  # the router's types, one table
    assert err["type"] == want and path in err["message"] and set(err) == {"message", "type", "code", "param"}


def test_a_wrongly_typed_field_is_named_in_the_error_param(server: tuple[str, ScriptedBackend]) -> None:
    import urllib.error
    import urllib.request

    url, _ = server
    body = orjson.dumps({"prompt": "a", "temperature": "hot"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(_json_request(url + "/v1/completions", data=body, method="POST"))
    assert orjson.loads(info.value.read())["error"]["param"] == "temperature"


def test_chat_logprob_bytes_join_back_into_the_content(server: tuple[str, ScriptedBackend]) -> None:
    """A token inside a multi-byte character shows as U+FFFD, but its `bytes` are its own (OpenAI's rule)."""
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    for stream in (False, True):
        kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "é"}], "max_tokens": 12,
                  "logprobs": True, "top_logprobs": 1}
        if stream:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            entries = [e for c in chunks for e in c.choices[0].logprobs.content]
        else:
            done = client.chat.completions.create(**kwargs)
            content, entries = done.choices[0].message.content, done.choices[0].logprobs.content
        assert "\ufffd" in "".join(e.token for e in entries)  # the echoed template holds multi-byte characters
        assert bytes(b for e in entries for b in e.bytes).decode() == content
        assert all(e.top_logprobs[0].bytes == e.bytes for e in entries)  # the scripted best is the token itself


def test_n_choices_and_list_prompts_are_numbered_in_order(server: tuple[str, ScriptedBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.completions.create(model="tiny", prompt=["ab", "xyz"], n=2, max_tokens=3, seed=5)
    assert [(c.index, c.text) for c in done.choices] == [(0, "aba"), (1, "aba"), (2, "xyz"), (3, "xyz")]
    assert [r.sampling.seed for r in backend.submitted[-4:]] == [5, 6, 5, 6]
    assert done.usage.prompt_tokens == 5 and done.usage.completion_tokens == 12  # each prompt counted once
    chunks = list(client.completions.create(model="tiny", prompt=[[97, 98], [120]], max_tokens=2, stream=True))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "ab", 1: "xx"}
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                          max_tokens=2)
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) == 1
    assert len({r.rid for r in backend.submitted[-3:]}) == 3  # each choice is its own engine request


def test_echo_returns_the_prompt_for_token_ids_and_when_streaming(server: tuple[str, ScriptedBackend]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.completions.create(model="tiny", prompt=[104, 105], max_tokens=2, echo=True)
    assert done.choices[0].text == "hihi"
    chunks = list(client.completions.create(model="tiny", prompt="ok", max_tokens=2, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "okok"


def test_continuous_usage_stats_put_usage_in_every_chunk(server: tuple[str, ScriptedBackend]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=3, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counted = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counted == [1, 2, 3] and chunks[-1].usage.total_tokens == 6


def test_models_by_id_and_an_unknown_model_in_a_request(server: tuple[str, ScriptedBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.created > 0
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"
    before = len(backend.submitted)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="a", max_tokens=1)
    assert info.value.body["param"] == "model" and len(backend.submitted) == before


def test_a_form_encoded_body_is_refused_as_an_unsupported_media_type(server: tuple[str, ScriptedBackend]) -> None:
    import urllib.error
    import urllib.request

    url, backend = server
    before = len(backend.submitted)
    body = orjson.dumps({"prompt": "a", "max_tokens": 1})
    with pytest.raises(urllib.error.HTTPError) as info:  # urllib labels a body as a form by default
        urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body))
    assert info.value.code == 415 and orjson.loads(info.value.read())["error"]["code"] == "unsupported_media_type"
    assert len(backend.submitted) == before


def test_stop_strings_kept_on_request_and_the_matched_stop_reported(server: tuple[str, ScriptedBackend]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.completions.create(model="tiny", prompt="abcd", max_tokens=10, stop=["da"],
                                     extra_body={"include_stop_str_in_output": True})
    assert done.choices[0].text == "abcda" and done.choices[0].matched_stop == "da"  # type: ignore[attr-defined]
    plain = client.completions.create(model="tiny", prompt="abcd", max_tokens=10, stop=["da"])
    assert plain.choices[0].text == "abc" and plain.choices[0].matched_stop == "da"  # type: ignore[attr-defined]
    chunks = list(client.completions.create(model="tiny", prompt="xyz", max_tokens=9, stop="zx", stream=True,
                                            extra_body={"include_stop_str_in_output": True}))
    assert "".join(c.choices[0].text for c in chunks) == "xyzx"
    assert chunks[-1].choices[0].matched_stop == "zx"  # type: ignore[attr-defined]
    ran_out = client.completions.create(model="tiny", prompt="ab", max_tokens=2)
    assert ran_out.choices[0].finish_reason == "length" and ran_out.choices[0].matched_stop is None  # type: ignore[attr-defined]
    import urllib.request

    body = {"text": "hello", "sampling_params": {"max_new_tokens": 8, "stop": "lo", "no_stop_trim": True}}
    with urllib.request.urlopen(_json_request(url + "/generate", data=orjson.dumps(body))) as resp:
        reply = orjson.loads(resp.read())
    assert reply["text"] == "hello" and reply["meta_info"]["finish_reason"] == {"type": "stop", "matched": "lo"}


def test_the_responses_api_answers_text_whole_and_as_events(server: tuple[str, ScriptedBackend]) -> None:
    url, backend = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.responses.create(model="tiny", input="hi", instructions="be brief", max_output_tokens=4)
    assert done.status == "incomplete" and done.incomplete_details.reason == "max_output_tokens"
    assert done.output_text == bytes(backend.submitted[-1].input_ids[:4]).decode()  # the echoing backend
    assert done.usage.output_tokens == 4 and done.usage.input_tokens == len(backend.submitted[-1].input_ids)
    assert bytes(backend.submitted[-1].input_ids).decode().startswith("be brief<｜User｜>hi")
    events = list(client.responses.create(model="tiny", input=[{"role": "user", "content": "hey"}],
                                          max_output_tokens=3, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == events[-1].response.output_text
    for refused, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                           ({"store": True}, "store"), ({"tools": [{"type": "web_search"}]}, "tools"),
                           ({"modalities": ["text"]}, "modalities")):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="tiny", input="hi", extra_body=refused)
        assert info.value.body["param"] == param


def test_a_decode_side_reuse_report_rides_in_the_answer_s_head_streamed_or_not(
    server: tuple[str, ScriptedBackend]
) -> None:
    import urllib.request

    url, backend = server
    bodies = [{"input_ids": [65, 66, 67], "sampling_params": {"max_new_tokens": 3}},
              {"input_ids": [65, 66, 67], "stream": True, "sampling_params": {"max_new_tokens": 3}},
              {"model": "tiny", "prompt": "abcd", "max_tokens": 2}]
    paths = ["/generate", "/generate", "/v1/completions"]
    for reused in (None, 32):
        backend.reused = reused
        for path, body in zip(paths, bodies, strict=True):
            with urllib.request.urlopen(_json_request(url + path, orjson.dumps(body))) as response:
                header = response.headers.get(KV_REUSED_HEADER)
                response.read()
            prompt = len(body.get("input_ids", body.get("prompt", "")))
            assert header == (None if reused is None else f"32/{prompt}"), (path, body)
