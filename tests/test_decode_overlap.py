"""Overlapped decode turns (`engine.decode_overlap`): the next forward is launched before the last one's tokens
are read, taking them from the device. On CPU the forward is synchronous, so nothing overlaps in time, but every
path runs: the tokens, finish reasons and page counts must be those of the synchronous schedule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.llm import LLM
from engine.sampling import NONFINITE_LOGITS, SamplingParams
from engine.scheduler import RequestStatus, Scheduler
from tests.nan_model import POISON, write_nan_model
from tests.tiny_engine import tiny_v3_dir

PS = 16
PROMPTS = [[(13 * i + 7 * j) % 250 + 2 for j in range(20 + 3 * i)] for i in range(6)]
# Ends by length at different turns (1 token: on the prefill's own token; 2: on the first decode).
LENGTHS = [1, 2, 7, 19, 33, 40]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def engines(tiny_dir: Path) -> Iterator[tuple[LLM, LLM]]:
    """(synchronous, overlapped) engines over the same weights."""
    plain = LLM(str(tiny_dir), page_size=PS, num_pages=96, overlap_schedule=False)
    overlapped = LLM(str(tiny_dir), page_size=PS, num_pages=96, overlap_schedule=True)
    yield plain, overlapped
    plain.close()
    overlapped.close()


def _idle(llm: LLM) -> bool:
    scratch = 1 if llm.graph_runner is not None else 0  # the CUDA graphs' padding rows write one page of their own
    return llm.kv_pool.available_pages == llm.kv_pool.num_pages - scratch and not llm.scheduler.has_work()


def test_a_plain_greedy_batch_gives_the_synchronous_tokens_and_finish_reasons(engines: tuple[LLM, LLM]) -> None:
    plain, overlapped = engines
    free = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in LENGTHS]
    reference = plain.generate(PROMPTS, free)
    # Stop tokens the requests draw mid-run: they end one turn before the forward launched after them is read.
    # (every other request: the rest end by length beside them).
    stops = [SamplingParams(max_new_tokens=n, ignore_eos=True, stop_token_ids=(out.token_ids[n // 2],) if i % 2 else ())
             for i, (n, out) in enumerate(zip(LENGTHS, reference, strict=True))]
    for params in (free, stops):
        expected = plain.generate(PROMPTS, params)
        got = overlapped.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
        assert _idle(overlapped)
    assert {o.finish_reason for o in plain.generate(PROMPTS, stops)} == {"stop", "length"}


def test_seeded_sampling_draws_on_the_device_the_synchronous_tokens(engines: tuple[LLM, LLM]) -> None:
    plain, overlapped = engines
    kinds = [SamplingParams(temperature=0.9, seed=11, max_new_tokens=24, ignore_eos=True),
             SamplingParams(temperature=1.3, top_k=12, seed=12, max_new_tokens=17, ignore_eos=True),
             SamplingParams(temperature=0.7, top_p=0.8, min_p=0.05, seed=13, max_new_tokens=30, ignore_eos=True),
             SamplingParams(max_new_tokens=21, ignore_eos=True),
             SamplingParams(temperature=1e-5, seed=14, max_new_tokens=9, ignore_eos=True),
             SamplingParams(temperature=1e300, seed=15, max_new_tokens=12, ignore_eos=True)]
    expected = plain.generate(PROMPTS, kinds)
    got = overlapped.generate(PROMPTS, kinds)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert len({tuple(o.token_ids) for o in got}) == len(PROMPTS)
    assert _idle(overlapped)


def test_the_next_forward_is_launched_before_the_last_tokens_are_read(engines: tuple[LLM, LLM]) -> None:
    _, overlapped = engines
    scheduler = overlapped.scheduler
    reqs = [scheduler.add(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in PROMPTS[:2]]
    assert len(scheduler.step().new_tokens) == 2  # the prefill, read at once
    assert scheduler.step().new_tokens == []  # the first decode forward is launched, nothing is read yet
    assert [len(r.output_ids) for r in reqs] == [1, 1]
    for _ in range(4):  # each turn reads the forward launched one turn before
        assert [req for req, _ in scheduler.step().new_tokens] == reqs
    # 5 tokens in: their 6th is in flight, so no forward runs for a 7th; this turn only reads it.
    result = scheduler.step()
    assert [req for req, _ in result.new_tokens] == reqs and all(r.finished for r in reqs)
    assert _idle(overlapped)


def test_a_request_that_cannot_overlap_joining_mid_run_gives_everyone_their_tokens(
        engines: tuple[LLM, LLM]) -> None:
    plain, overlapped = engines
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=12, ignore_eos=True)
    penalised = SamplingParams(temperature=0.8, seed=6, max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3)

    def run(llm: LLM) -> list[list[int]]:
        scheduler = llm.scheduler
        reqs = [scheduler.add(p, greedy) for p in PROMPTS[:2]] + [scheduler.add(PROMPTS[2], seeded)]
        for _ in range(4):
            scheduler.step()
        reqs += [scheduler.add(PROMPTS[3], seeded), scheduler.add(PROMPTS[4], penalised)]
        while any(not r.finished for r in reqs):
            scheduler.step()
        scheduler.read_launched()
        return [r.output_ids for r in reqs]

    assert run(overlapped) == run(plain)
    assert _idle(overlapped)


def test_an_abort_while_its_forward_is_in_flight_frees_its_pages_once_read(engines: tuple[LLM, LLM]) -> None:
    plain, overlapped = engines
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = [o.token_ids for o in plain.generate(PROMPTS[:3], params)]
    scheduler = overlapped.scheduler
    reqs = [scheduler.add(p, params) for p in PROMPTS[:3]]
    for _ in range(3):
        scheduler.step()
    assert scheduler._launched is not None and reqs[1] in scheduler._launched.row_of
    before = overlapped.kv_pool.available_pages
    scheduler.abort(reqs[1])
    assert reqs[1].finish_reason == "abort"
    assert overlapped.kv_pool.available_pages == before  # the launched forward still writes its next KV
    while not all(r.finished for r in reqs):
        assert reqs[1] not in (req for req, _ in scheduler.step().new_tokens)
    scheduler.read_launched()
    assert [reqs[0].output_ids, reqs[2].output_ids] == [expected[0], expected[2]]
    assert _idle(overlapped)


def test_a_request_whose_decode_logits_are_not_finite_fails_alone(tmp_path: Path) -> None:
    llm = LLM(str(write_nan_model(tmp_path / "nan")), page_size=PS, num_pages=32, overlap_schedule=True)
    try:
        scheduler: Scheduler = llm.scheduler
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        healthy = scheduler.add(PROMPTS[0], params)
        scheduler.step()  # its prefill
        # A request prefilled elsewhere whose first token is the poisoned one: its first decode forward is NaN.
        pages = llm.kv_pool.alloc(2)
        broken = scheduler.add_prefilled(PROMPTS[1][:20], POISON, pages, params)
        failed = []
        while not healthy.finished:
            failed += scheduler.step().failed
        scheduler.read_launched()
        assert failed == [broken] and broken.error == NONFINITE_LOGITS and broken.output_ids == [POISON]
        assert healthy.status is RequestStatus.FINISHED and healthy.finish_reason == "length"
        assert len(healthy.output_ids) == 8
        assert _idle(llm)
    finally:
        llm.close()


def test_both_workers_take_the_flag_that_turns_the_overlap_off(tiny_dir: Path) -> None:
    from decode_worker.__main__ import build_parser as decode_parser
    from engine.server.cli import engine_args
    from prefill_worker.__main__ import build_parser as prefill_parser

    for build in (prefill_parser, decode_parser):
        assert engine_args(build().parse_args(["--model", str(tiny_dir)])).overlap_schedule
        assert not engine_args(build().parse_args(["--model", str(tiny_dir), "--disable-overlap-schedule"])).overlap_schedule


def test_retraction_and_overlap_do_not_mix(tiny_dir: Path) -> None:
    llm = LLM(str(tiny_dir), page_size=PS, num_pages=16, reserve_tokens=8, overlap_schedule=True)
    try:
        assert not llm.scheduler.overlap  # pages grow while forwards are in flight otherwise
    finally:
        llm.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("graphs", [0, 8], ids=["eager", "graphs"])
def test_overlapped_turns_give_the_synchronous_tokens_eager_and_through_the_graph_runner(
        tiny_dir: Path, device: str, graphs: int) -> None:
    """On the GPU the forward runs while the host reads the last one; on CPU the graph runner's padded path runs
    eagerly (its static buffers and scratch page all the same)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    runs = []
    for overlap in (False, True):
        llm = LLM(str(tiny_dir), device=device, dtype="float32", page_size=PS, num_pages=96,
                  cuda_graph_max_bs=graphs, overlap_schedule=overlap)
        try:
            free = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in LENGTHS]
            first = llm.generate(PROMPTS, free)
            stops = [SamplingParams(max_new_tokens=n, ignore_eos=True,
                                    stop_token_ids=(o.token_ids[n // 2],) if i % 2 else ())
                     for i, (n, o) in enumerate(zip(LENGTHS, first, strict=True))]
            seeded = [SamplingParams(temperature=0.8, top_k=40 * (i % 2), top_p=0.9, seed=i, max_new_tokens=n,
                                     ignore_eos=True) for i, n in enumerate(LENGTHS)]
            outs = first + llm.generate(PROMPTS, stops) + llm.generate(PROMPTS, seeded)
            runs.append([(o.token_ids, o.finish_reason) for o in outs])
            assert _idle(llm)
        finally:
            llm.close()
    assert runs[1] == runs[0]
