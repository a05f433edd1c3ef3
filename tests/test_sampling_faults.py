"""One request's sampling values can never stop a batch or a rank: extreme values that pass validation
still draw a token, non-finite ones are refused, and a draw that raises fails that request alone. Nor can one
request's broken forward: logits that come out NaN fail that request alone (a prefill instance once stopped on
the NaN log-probability of its first token)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from nan_model import POISON, write_nan_model

import engine.sampling as sampling
from engine.llm import LLM
from engine.sampling import NONFINITE_LOGITS, SamplingParams, apply_penalties, nonfinite_rows, sample
from engine.scheduler import Scheduler
from engine.tiny_model import write_tiny_model

EXTREME = [
    {"temperature": 1e-300},
    {"temperature": 1e-6},
    {"temperature": 1e300},
    {"temperature": 1.0, "repetition_penalty": 1e-300},
    {"temperature": 1.0, "top_p": 1e-300},
    {"temperature": 0.7, "top_k": 1},
    {"temperature": 1.0, "logit_bias": ((3, 100.0), (4, -100.0))},
]


@pytest.mark.parametrize("kwargs", EXTREME)
def test_extreme_values_that_pass_validation_draw_a_valid_token(kwargs: dict) -> None:
    logits = torch.randn(3, 50) * 30
    p = SamplingParams(seed=5, **kwargs)
    penalised = apply_penalties(logits, [p] * 3, [[1, 2, 3]] * 3, [[4]] * 3)
    tokens, errors = sample(penalised, [p] * 3, [p.make_generator("cpu") for _ in range(3)], [1, 1, 1])
    assert errors == {} and all(0 <= t < 50 for t in tokens)


def test_a_vanishing_temperature_is_greedy() -> None:
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1e-300, seed=3)
    assert p.greedy
    assert sample(logits, [p] * 4, [None] * 4).tokens == logits.argmax(-1).tolist()


def test_rows_driven_to_inf_or_nan_still_sample() -> None:
    logits = torch.tensor([[float("inf"), 0.0, float("nan"), -1.0], [float("nan")] * 4, [float("-inf")] * 4])
    p = SamplingParams(temperature=1.0, seed=1)
    tokens, errors = sample(logits, [p] * 3, [p.make_generator("cpu") for _ in range(3)], [0, 0, 0])
    assert errors == {} and tokens[0] == 0 and all(0 <= t < 4 for t in tokens)


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_draw_that_raises_fails_that_row_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sampling._draw

    def draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None, pos: int | None) -> int:
        if p.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(row, p, gen, pos)

    monkeypatch.setattr(sampling, "_draw", draw)
    good, bad = SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=666)
    logits = torch.randn(3, 20)
    tokens, errors = sample(logits, [good, bad, good], [good.make_generator("cpu"), None,
                                                        good.make_generator("cpu")], [0, 0, 0])
    assert list(errors) == [1] and "inf, nan" in errors[1] and tokens[1] == -1
    assert 0 <= tokens[0] < 20 and 0 <= tokens[2] < 20


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    model = write_tiny_model(tmp_path_factory.mktemp("sampling-faults") / "tiny-v3")
    engine = LLM(Path(model), page_size=16)
    yield engine
    engine.close()


def test_a_request_whose_draw_raises_fails_alone_and_the_batch_finishes(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sampling._draw

    def draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None, pos: int | None) -> int:
        if p.seed == 666 and pos == 2:  # fails mid-generation, after two tokens
            raise RuntimeError("boom")
        return real(row, p, gen, pos)

    monkeypatch.setattr(sampling, "_draw", draw)
    free_at_start = llm.kv_pool.available_pages
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = llm.generate([[5, 6, 7, 8]], greedy)[0].token_ids
    scheduler: Scheduler = llm.scheduler
    bad = scheduler.add([9, 9, 9], SamplingParams(temperature=1.0, seed=666, max_new_tokens=6, ignore_eos=True))
    good = scheduler.add([5, 6, 7, 8], greedy)
    failed = []
    while not (bad.finished and good.finished):
        failed.extend(scheduler.step().failed)
    assert failed == [bad] and bad.finish_reason == "error" and "boom" in (bad.error or "")
    assert len(bad.output_ids) == 2 and good.output_ids == expected
    assert llm.kv_pool.available_pages == free_at_start


def test_nonfinite_rows_are_the_rows_of_raw_logits_holding_nan_or_inf() -> None:
    logits = torch.randn(4, 30)
    logits[1, 7] = float("nan")
    logits[3, 0] = float("-inf")
    assert nonfinite_rows(logits) == {1: NONFINITE_LOGITS, 3: NONFINITE_LOGITS}
    assert nonfinite_rows(torch.randn(2, 30)) == {}


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nan_model(tmp_path_factory.mktemp("poisoned") / "tiny-v3")


def test_a_request_whose_forward_turns_nan_fails_alone_and_the_batch_finishes(poisoned_dir: Path) -> None:
    engine = LLM(poisoned_dir, page_size=16)
    try:
        greedy = SamplingParams(max_new_tokens=5, ignore_eos=True)
        expected = engine.generate([[5, 6, 7, 8]], greedy)[0].token_ids
        free_at_start = engine.kv_pool.available_pages
        scheduler: Scheduler = engine.scheduler
        bad = scheduler.add([9, POISON, 9], greedy)
        good = scheduler.add([5, 6, 7, 8], greedy)
        bad.return_logprob = good.return_logprob = True  # a NaN log-probability is what stopped the prefill
        failed = []
        while not (bad.finished and good.finished):
            failed.extend(scheduler.step().failed)
        assert failed == [bad] and bad.finish_reason == "error" and bad.error == NONFINITE_LOGITS
        assert bad.output_ids == [] and good.output_ids == expected
        assert all(math.isfinite(v) for v in good.output_logprobs)
        assert engine.kv_pool.available_pages == free_at_start
    finally:
        engine.close()


def test_a_prefill_job_whose_logits_are_nan_fails_alone_and_the_batcher_keeps_serving(poisoned_dir: Path) -> None:
    """The prefill batcher draws each prompt's first token: a NaN row sets that job's error (its room is
    aborted, as for a draw that raised) instead of a NaN log-probability the KV sender would refuse."""
    from engine.config import ModelConfig
    from engine.kv_pool import KVPool
    from engine.model import DeepseekForCausalLM
    from engine.weights import load_model
    from prefill_worker.batcher import PrefillBatcher, PrefillJob

    config = ModelConfig.from_dir(poisoned_dir)
    model = DeepseekForCausalLM(config, dtype=torch.float32, device="cpu")
    load_model(model, poisoned_dir)
    pool = KVPool(32, config.num_hidden_layers, 16, config.kv_cache_dim, torch.float32, "cpu")
    batcher = PrefillBatcher(model, pool, max_prefill_tokens=64, max_running=4)
    bad = PrefillJob("bad", [3, 4, POISON, 5], SamplingParams(temperature=0.0))
    good = PrefillJob("good", [3, 4, 6, 5, 8], SamplingParams(temperature=0.0))
    batcher.add(bad)
    batcher.add(good)
    while not (bad.prefilled and good.prefilled):
        batcher.step()
    assert bad.error == NONFINITE_LOGITS and bad.first_token is None
    assert good.error is None and good.first_token is not None and math.isfinite(good.first_logprob)
