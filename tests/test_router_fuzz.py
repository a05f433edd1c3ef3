"""Any body a client sends the router is refused with a 400 (`BadRequest`) or becomes worker bodies that are
one JSON object each: the client's fields, a `rid`, and for a PD pair the bootstrap fields (the router
splices bytes rather than re-encoding, so this checks the splice on bodies of every shape and spacing)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
