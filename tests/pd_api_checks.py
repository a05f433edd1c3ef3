"""Checks of issue 21's API features through a served PD system (router + prefill + decode), shared by the
PD test modules: each answer equals colocated generation in this process (`engine.llm.LLM`) and the pools
go back to idle."""

from __future__ import annotations

import json
from typing import Any

from pd_system import PDSystem, http, wait_idle

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
