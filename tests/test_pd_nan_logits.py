"""A request whose forward comes out NaN fails alone; the instances that ran it keep serving.

On one GPU a prefill instance once stopped whole: a request's logits came out NaN, and the KV sender refused the
NaN log-probability of its first token inside the rank loop. Here a tiny model whose embedding row for one token
is NaN makes such a forward on purpose, through the router (the prefill side draws the first token) and on a
decode worker alone (it draws them all): the client gets a server error naming the fault, the next requests are
served as colocated generation serves them, and every pool is back at its idle count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from nan_model import POISON, write_nan_model
from pd_system import PDSystem, http, skip_unless_backend, wait_idle

from engine.llm import LLM
from engine.sampling import NONFINITE_LOGITS, SamplingParams


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nan_model(tmp_path_factory.mktemp("nan-logits") / "tiny-v3")


@pytest.fixture(scope="module")
def system(poisoned_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDSystem]:
    skip_unless_backend("nixl")
    pd = PDSystem(poisoned_model, tmp_path_factory.mktemp("pd-nan"), "nixl")
    yield pd
    pd.close()


@pytest.mark.parametrize("target", ["router", "decode"])
def test_a_nan_forward_fails_that_request_alone_and_every_instance_keeps_serving(
        system: PDSystem, poisoned_model: Path, target: str) -> None:
    url = (system.router if target == "router" else system.decode).url + "/v1/completions"
    clean = [*range(20, 60)]
    reference = LLM(poisoned_model, page_size=16)
    try:
        expected = reference.generate([clean], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].text
    finally:
        reference.close()
    body = {"max_tokens": 6, "ignore_eos": True, "temperature": 0, "logprobs": 1}
    for _ in range(2):  # twice: the instance that ran the first is still there to run the second
        status, raw = http("POST", url, {**body, "prompt": [*clean[:10], POISON, *clean[10:]]})
        error = json.loads(raw)["error"]
        assert status == 500 and error["type"] == "server_error" and error["message"] == NONFINITE_LOGITS, raw
        status, raw = http("POST", url, {**body, "prompt": clean})
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == expected, raw
    for worker in (system.prefill, system.decode):
        wait_idle(worker.url)
