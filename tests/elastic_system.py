"""Helpers of the elastic EP end-to-end tests (decode: test_elastic_scale.py, prefill: test_elastic_prefill.py):
find a worker's rank processes, and post a scale while killing the first new rank as soon as it exists."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import PAGE_SIZE

from bench.elastic_ep import ScaleStep, post_scale
from bench.pd_servers import Server
from engine.llm import LLM
from engine.sampling import SamplingParams


@pytest.fixture(scope="module", name="reference")
def reference_llm(tiny_model: Path) -> Iterator[LLM]:
    """The tiny model in one process: the static run every scaled stream's tokens must equal."""
    llm = LLM(tiny_model, page_size=PAGE_SIZE)
    yield llm
    llm.close()


def static_tokens(llm: LLM, cases: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in max_new_tokens]
    return [o.token_ids for o in llm.generate(cases, params)]


def rank_children(pid: int) -> set[int]:
    """The spawned rank processes of worker ``pid`` (multiprocessing's resource tracker left out)."""
    found = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                found.add(int(child))
    return found


def scale_killing_a_new_rank(worker: Server, new_dp: int) -> ScaleStep:
    """POST a scale to ``worker`` and SIGKILL its first new rank process as soon as it exists."""
    before = rank_children(worker.proc.pid)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_scale, worker.url, new_dp)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not pending.done():
            new = rank_children(worker.proc.pid) - before
            if new:
                os.kill(min(new), signal.SIGKILL)
                break
            time.sleep(0.02)
        return pending.result()
