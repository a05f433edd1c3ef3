"""Sampling penalties (`engine.sampling.apply_penalties`) against their definitions, worked by hand."""

from __future__ import annotations

import pytest
import torch

from engine.sampling import SamplingParams, apply_penalties


def test_repetition_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, [p], prompts=[[0, 1]], outputs=[[1]])
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]  # tokens 0 and 1 seen; 2 and 3 untouched


def test_frequency_and_presence_subtract_per_count_and_once_over_the_output_only() -> None:
    logits = torch.zeros(1, 5)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    out = apply_penalties(logits, [p], prompts=[[4, 4, 4]], outputs=[[2, 2, 2, 3]])
    assert out.tolist() == [[0.0, 0.0, -2.5, -1.5, 0.0]]  # the prompt's token 4 is not penalised


def test_rows_without_penalties_are_left_as_they_were_and_nothing_is_copied_when_none_have_any() -> None:
    logits = torch.randn(2, 6)
    plain, penalised = SamplingParams(), SamplingParams(presence_penalty=-2.0)
    assert apply_penalties(logits, [plain, plain], [[1], [2]], [[3], [4]]) is logits
    out = apply_penalties(logits, [plain, penalised], [[1], [2]], [[3], [4]])
    assert torch.equal(out[0], logits[0].float()) and out[1, 4] == logits[1, 4] + 2.0
    assert torch.equal(out[1, :4], logits[1, :4].float())


@pytest.mark.parametrize(("kwargs", "message"), [({"presence_penalty": 2.1}, "presence_penalty"),
                                                 ({"frequency_penalty": -3}, "frequency_penalty"),
                                                 ({"repetition_penalty": 0.0}, "repetition_penalty")])
def test_out_of_range_penalties_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logit_bias_adds_to_the_named_tokens_and_can_force_or_ban_one() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = apply_penalties(logits, [SamplingParams(logit_bias=((0, 5.0), (2, -100.0)))], [[]], [[]])
    assert out.tolist() == [[6.0, 2.0, -97.0]]
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))


def test_a_forced_token_is_what_greedy_generation_emits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.llm import LLM
    from engine.tiny_model import write_tiny_model

    llm = LLM(write_tiny_model(tmp_path / "tiny"), page_size=16)
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True, logit_bias=((77, 100.0),)))
        assert out[0].token_ids == [77, 77, 77, 77]
    finally:
        llm.close()


def test_min_new_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0]])
    p = SamplingParams(max_new_tokens=8, min_new_tokens=2, stop_token_ids=(2,))
    early = apply_penalties(logits, [p], [[3]], [[1]], eos_token_ids=(0,))
    assert early.tolist() == [[float("-inf"), 1.0, float("-inf"), 0.0]]
    assert apply_penalties(logits, [p], [[3]], [[1, 1]], eos_token_ids=(0,)).tolist() == logits.tolist()
    keep_eos = SamplingParams(max_new_tokens=8, min_new_tokens=2, ignore_eos=True)
    assert apply_penalties(logits, [keep_eos], [[3]], [[]], eos_token_ids=(0,))[0, 0] == 5.0
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=2, min_new_tokens=3)


def test_min_new_tokens_holds_generation_past_a_stop_token(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.llm import LLM
    from engine.tiny_model import write_tiny_model

    llm = LLM(write_tiny_model(tmp_path / "tiny"), page_size=16)
    try:
        first = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
        stop = (first[0],)  # the greedy first token, declared a stop token
        assert llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, stop_token_ids=stop,
                                                        ignore_eos=True))[0].token_ids == [first[0]]
        held = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, stop_token_ids=stop, ignore_eos=True,
                                                        min_new_tokens=3))[0].token_ids
        assert len(held) >= 3 and stop[0] not in held[:3]
    finally:
        llm.close()
