"""Any body a client sends the router is refused with a 400 (`BadRequest`) or becomes worker bodies that are
one JSON object each: the client's fields, a `rid`, and for a PD pair the bootstrap fields (the router
splices bytes rather than re-encoding, so this checks the splice on bodies of every shape and spacing).
Over HTTP, against a live router: hostile requests of every shape get a 4xx with the JSON error body or a
valid answer, never a 5xx, and the router serves after each batch."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_mocks import Cluster, cluster

from kvtransfer.protocol import BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM
from router.config import Role, WorkerSpec
from router.errors import BadRequest
from router.inbound import Kind, parse_inbound, worker_body
from router.workers import Worker

FIELDS = ["prompt", "messages", "text", "input_ids", "stream", "rid", "max_tokens", "sampling_params",
          BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM, "model", "n"]  # fmt: skip
values = st.recursive(
    # (JSON ints past int64 parse as floats, so the integers stop at int64's edges.)
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from([*FIELDS, "role", "content"]),
                                                                inner, max_size=3),
    max_leaves=10,
)  # fmt: skip
noise = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
# Most bodies carry a well-formed prompt for their endpoint, so that the splice is what gets exercised.
prompts = st.builds(
    lambda messages, prompt, generate: {"messages": messages, "prompt": prompt, **generate},
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=10)}),
             min_size=1, max_size=2),
    st.text(min_size=1, max_size=10) | st.lists(st.integers(0, 300), min_size=1, max_size=5),
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=10) | st.lists(st.text(min_size=1), min_size=1,
                                                                                max_size=3)})
    | st.fixed_dictionaries({"input_ids": st.lists(st.integers(0, 300), min_size=1, max_size=5)}),
)  # fmt: skip
bodies = st.builds(lambda extra, prompt: {**extra, **prompt}, noise, prompts) | noise
PREFILL = Worker(WorkerSpec("http://10.0.0.7:30000", Role.PREFILL, 8998))


@pytest.mark.parametrize("kind", list(Kind))
@settings(max_examples=400, deadline=None, derandomize=True)
@given(body=bodies, indent=st.sampled_from([None, 1, 4]), trailing=st.sampled_from(["", " ", "\n\t "]))
def test_every_body_is_refused_or_spliced_into_valid_worker_bodies(
    kind: Kind, body: dict, indent: int | None, trailing: str
) -> None:
    raw = (json.dumps(body, indent=indent) + trailing).encode()
    try:
        inbound = parse_inbound(raw, kind)
    except BadRequest:
        return
    rooms: int | list[int] = 5 if inbound.batch_size is None else list(range(inbound.batch_size))
    for prefill, room in ((None, None), (PREFILL, rooms)):
        out = json.loads(worker_body(inbound, "rid-1", prefill, room))
        assert isinstance(out, dict)
        for key, value in body.items():
            if key == "rid":
                continue  # workers get the router's own id whatever the client sent (checked below)
            if key not in (BOOTSTRAP_HOST, BOOTSTRAP_PORT, BOOTSTRAP_ROOM) or prefill is None:
                assert out[key] == value, key
        assert out["rid"] == ("rid-1" if inbound.batch_size is None
                              else [f"rid-1-{i}" for i in range(inbound.batch_size)])
        if prefill is not None:
            assert out[BOOTSTRAP_ROOM] == room
            assert out[BOOTSTRAP_PORT] in (8998, [8998] * len(rooms) if isinstance(rooms, list) else None)


# -- hostile requests over HTTP, against a live router with mock workers ----------------------------

SAMPLING = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "max_tokens", "max_completion_tokens", "max_new_tokens", "min_tokens", "min_new_tokens", "seed", "n",
            "logprobs", "top_logprobs", "logit_bias", "stop", "stop_token_ids", "ignore_eos", "echo",
            "stream_options", "return_logprob", "top_logprobs_num", "data_parallel_rank"]  # fmt: skip
EDGES = [1e-300, -1e-300, 1e300, -1e300, 0.0, -0.0, 2**63 - 1, -(2**63), 2**63, 2**64, -1, 0, 1, 4097,
         float("nan"), float("inf"), float("-inf"), 5e-324, "1", "", True, None, [], {}]  # fmt: skip
hostile = st.sampled_from(EDGES) | values
sampling = st.dictionaries(st.sampled_from(SAMPLING), hostile, max_size=4)
PATHS = ["/v1/chat/completions", "/v1/completions", "/generate"]
MAX_BODY = 64 * 1024


def _serialized(doc: object) -> bytes:
    # Python's json writes NaN and Infinity as bare words (not JSON): the router must refuse them.
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, path, body): mostly inference requests with a valid prompt and hostile sampling
    fields, also whole bodies of noise, broken bytes, and wrong methods."""
    path = draw(st.sampled_from([*PATHS, "/abort_request"]))
    prompt = draw(prompts)
    # The prompt fields are mostly kept and noise is rare, so that most bodies reach the workers with
    # hostile sampling fields rather than stopping at the router's prompt checks.
    kept = {k: v for k, v in prompt.items() if draw(st.integers(0, 4))}
    doc: dict = {**kept, **draw(sampling), **(draw(noise) if not draw(st.integers(0, 3)) else {})}
    if draw(st.booleans()):
        doc["sampling_params"] = draw(sampling)
    if draw(st.booleans()):
        doc["stream"] = draw(st.booleans())
    body = _serialized(doc)
    shape = draw(st.sampled_from(["doc"] * 6 + ["empty", "truncated", "not_utf8", "huge", "array", "method"]))
    method = "POST"
    if shape == "empty":
        body = b""
    elif shape == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif shape == "not_utf8":
        body = body.replace(b'"', b'"\xff\xfe', 1) if b'"' in body else b"\xff" + body
    elif shape == "huge":
        body = b'{"text": "' + b"x" * (MAX_BODY + 10) + b'"}'
    elif shape == "array":
        body = _serialized([doc])
    elif shape == "method":
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    return method, path, body


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Cluster, int]]:
    """A router with mock workers on a loop of its own thread, so hypothesis can drive it synchronously."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-router", daemon=True)
    thread.start()
    manager = cluster(1, 1, max_body_bytes=MAX_BODY)
    c = asyncio.run_coroutine_threadsafe(manager.__aenter__(), loop).result(10)
    try:
        yield c, int(c.router_url.rsplit(":", 1)[1])
    finally:
        asyncio.run_coroutine_threadsafe(manager.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _send(port: int, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _still_serving(port: int) -> None:
    status, _, data = _send(port, "POST", "/generate", b'{"text": "' + b"a prompt " * 20 + b'"}')
    assert status == 200 and orjson.loads(data)["text"], (status, data)


_seen = {"n": 0}


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                    HealthCheck.data_too_large])
@given(request=requests())
def test_hostile_requests_get_a_4xx_json_error_or_a_valid_answer_never_a_5xx(
    live: tuple[Cluster, int], request: tuple[str, str, bytes]
) -> None:
    c, port = live
    method, path, body = request
    status, headers, data = _send(port, method, path, body)
    if 200 <= status < 300:
        if headers.get("content-type", "").startswith("text/event-stream"):
            events = [e for e in data.split(b"\n\n") if e]
            assert events and all(e.startswith(b"data: ") for e in events), data[:200]
            for e in events[:-1]:
                orjson.loads(e[6:])
        else:
            assert isinstance(orjson.loads(data), dict)
    else:
        assert 400 <= status < 500, (status, method, path, body[:300], data[:300])
        err = orjson.loads(data)["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"] and err["code"]
    _seen["n"] += 1
    if _seen["n"] % 50 == 0:  # after each batch: the router still serves
        _still_serving(port)


def test_after_the_hostile_requests_the_router_serves_and_holds_nothing(live: tuple[Cluster, int]) -> None:
    c, port = live
    _still_serving(port)
    # The router's thread counts a request out just after writing its answer: this thread may read the
    # counts in between (seen under load in CI), so it gives the router a moment.
    deadline = time.monotonic() + 2.0
    while (c.state.stats.in_flight or c.state.active) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.state.stats.in_flight == 0 and not c.state.active
    assert all(w.in_flight == 0 and w.healthy for w in c.state.registry.all_workers())
