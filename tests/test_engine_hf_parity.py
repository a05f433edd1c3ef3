"""The engine reproduces transformers' DeepSeek-V2/V3 exactly (float32, CPU).

Checkpoints are built and saved by transformers itself (``save_pretrained``) from the tiny configs
of ``engine.tiny_model``, with weights re-drawn so outputs are far from degenerate. Prompts of 5, 37
and 130 tokens cross 16-token page boundaries and, with 32 new tokens, YaRN's original context (128).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.forward_batch import ForwardBatch, ForwardMode
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.tiny_model import tiny_config

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (5, 37, 130)
NEW_TOKENS = 32
PAGE_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
HF_CLASSES = {
    "v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "v2-lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "v2-group": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
}


@dataclass
class Parity:
    variant: str
    model_dir: Path
    hf_model: torch.nn.Module
    prompts: list[list[int]]
    llm: LLM
    batched: list[list[int]]  # the engine's greedy tokens for all prompts generated together


def _redraw_weights(model: torch.nn.Module, seed: int) -> None:
    """transformers' init (std 0.02) gives near-constant logits; draw O(1)-activation weights instead,
    with norm weights and the router correction bias away from their neutral values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def parity(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    variant = request.param
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[variant])
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**tiny_config(variant))).eval()
    _redraw_weights(hf_model, seed=1)
    model_dir = tmp_path_factory.mktemp(f"hf-{variant}")
    hf_model.save_pretrained(model_dir)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    llm = LLM(str(model_dir), dtype="float32", page_size=PAGE_SIZE, num_pages=64)
    start = llm.kv_pool.available_pages
    outputs = llm.generate(prompts, GREEDY)
    assert all(o.finish_reason == "length" for o in outputs)
    assert llm.kv_pool.available_pages == start
    yield Parity(variant, model_dir, hf_model, prompts, llm, [o.token_ids for o in outputs])
    assert llm.kv_pool.available_pages == llm.kv_pool.num_pages
    llm.close()


def _hf_greedy(parity: Parity, prompt: list[int]) -> list[int]:
    model = parity.hf_model
    model.generation_config.eos_token_id = None  # the engine side runs with ignore_eos
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()




def test_greedy_tokens_equal_transformers_generate_for_prompts_crossing_pages(parity: Parity) -> None:
    expected = [_hf_greedy(parity, p) for p in parity.prompts]
    for n, ours, ref in zip(PROMPT_LENS, parity.batched, expected, strict=True):
        assert ours == ref, f"{parity.variant}, prompt of {n} tokens"
    assert len({t for ours in parity.batched for t in ours}) > 10, "degenerate model: too few distinct tokens"


def test_prefill_logits_match_transformers_within_1e4_relative(parity: Parity) -> None:
    llm = parity.llm
    pages = [llm.kv_pool.alloc(llm.kv_pool.pages_for_tokens(len(p))) for p in parity.prompts]
    try:
        batch = ForwardBatch.build(ForwardMode.EXTEND, parity.prompts, [0, 0, 0], pages, llm.kv_pool,
                                   return_all_logits=True)
        ours = llm.model(batch).all_logits
        assert ours is not None
        offsets = batch.cu_seqlens_q.tolist()
        for i, prompt in enumerate(parity.prompts):
            with torch.no_grad():
                ref = parity.hf_model(torch.tensor([prompt])).logits[0]
            got = ours[offsets[i] : offsets[i + 1]]
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            assert rel <= 1e-4, f"{parity.variant}, prompt of {len(prompt)} tokens: relative error {rel:.2e}"
    finally:
        for p in pages:
            llm.kv_pool.free(p)


def test_output_logprobs_equal_transformers_log_softmax_of_its_logits(parity: Parity) -> None:
    """Each output token's logprob (return_logprob) is log_softmax of transformers' raw logits at that step."""
    model = parity.hf_model
    model.generation_config.eos_token_id = None
    outputs = parity.llm.generate(parity.prompts, GREEDY, return_logprob=True)
    for prompt, out in zip(parity.prompts, outputs, strict=True):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == NEW_TOKENS
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        expected = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(ref.logits, out.token_ids,
                                                                                       strict=True)]  # fmt: skip
        worst = max(abs(a - b) for a, b in zip(out.logprobs, expected, strict=True))
        assert worst < 1e-4, f"{parity.variant}, prompt of {len(prompt)} tokens: logprob off by {worst:.2e}"
        assert all(lp <= 0.0 for lp in out.logprobs)
    assert parity.llm.generate(parity.prompts[:1], GREEDY)[0].logprobs is None  # only when asked


def test_top_logprobs_are_transformers_most_likely_tokens_at_each_position(parity: Parity) -> None:
    model = parity.hf_model
    model.generation_config.eos_token_id = None
    prompt = parity.prompts[1]
    out = parity.llm.generate([prompt], GREEDY, top_logprobs=5)[0]
    assert out.top_logprobs is not None and len(out.top_logprobs) == NEW_TOKENS
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    for pos, (top, chosen, step) in enumerate(zip(out.top_logprobs, out.token_ids, ref.logits, strict=True)):
        expected = torch.log_softmax(step[0].float(), -1)
        assert [t for t, _ in top][0] == chosen  # greedy: the chosen token is the most likely one
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        ref_values = expected.topk(5).values.tolist()
        assert max(abs(v - r) for (_, v), r in zip(top, ref_values, strict=True)) < 1e-4, pos
        assert max(abs(v - expected[t].item()) for t, v in top) < 1e-4, pos


class _OpenAIPenalties:
    """OpenAI's presence/frequency penalties as a transformers logits processor (over generated tokens)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[0, self.prompt_len :]
        if generated.numel():
            ids, counts = generated.unique(return_counts=True)
            scores = scores.clone()
            scores[0, ids] -= self.frequency * counts.to(scores.dtype) + self.presence
        return scores


@pytest.mark.parametrize(("repetition", "presence", "frequency"), [(1.3, 0.0, 0.0), (1.0, 0.4, 0.6), (1.2, -0.3, 0.5)])
def test_greedy_tokens_with_penalties_equal_transformers(parity: Parity, repetition: float, presence: float,
                                                         frequency: float) -> None:
    """Repetition as transformers' own `repetition_penalty`; presence/frequency as OpenAI defines them."""
    model = parity.hf_model
    model.generation_config.eos_token_id = None
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                            repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency)
    ours = parity.llm.generate(parity.prompts, params)
    plain = parity.batched
    for prompt, out in zip(parity.prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        processors = transformers.LogitsProcessorList([_OpenAIPenalties(len(prompt), presence, frequency)])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0, repetition_penalty=repetition,
                                 logits_processor=processors)
        assert out.token_ids == ref[0, len(prompt) :].tolist(), (parity.variant, len(prompt))
    assert any(o.token_ids != b for o, b in zip(ours, plain, strict=True))  # the penalties changed something


def test_batched_prompts_give_the_same_tokens_as_one_at_a_time(parity: Parity) -> None:
    for prompt, together in zip(parity.prompts, parity.batched, strict=True):
        alone = parity.llm.generate([prompt], GREEDY)[0]
        assert alone.token_ids == together
    assert parity.llm.kv_pool.available_pages == parity.llm.kv_pool.num_pages


def test_chunked_prefill_gives_the_same_tokens_as_one_shot_prefill(parity: Parity) -> None:
    scheduler = parity.llm.scheduler
    scheduler.max_prefill_tokens = 24  # not a multiple of the page size: chunks end mid-page
    try:
        chunked = parity.llm.generate(parity.prompts, GREEDY)
    finally:
        scheduler.max_prefill_tokens = 8192
    assert [o.token_ids for o in chunked] == parity.batched
    assert parity.llm.kv_pool.available_pages == parity.llm.kv_pool.num_pages


def test_prompt_logprobs_equal_transformers_log_softmax_over_the_prompt(parity: Parity) -> None:
    """Each prompt token's logprob (`prompt_logprobs`, computed chunk by chunk as the prompt is prefilled:
    chunks of 16 tokens here, so the 130-token prompt spans 9) is log_softmax of transformers' logits at the
    position before it, and the alternatives are its best tokens; the first token has none."""
    llm = parity.llm
    saved = llm.scheduler.max_prefill_tokens
    llm.scheduler.max_prefill_tokens = 16
    try:
        outputs = llm.generate(parity.prompts, SamplingParams(max_new_tokens=1), prompt_logprobs=2)
    finally:
        llm.scheduler.max_prefill_tokens = saved
    for prompt, out in zip(parity.prompts, outputs, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(parity.hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert out.prompt_logprobs is not None and out.prompt_top_logprobs is not None
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        expected = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1).tolist()
        worst = max(abs(a - b) for a, b in zip(out.prompt_logprobs[1:], expected, strict=True))  # type: ignore[operator]
        assert worst < 1e-4, f"{parity.variant}, prompt of {len(prompt)} tokens: logprob off by {worst:.2e}"
        best = ref[:-1].topk(2, dim=-1)
        for pos, top in enumerate(out.prompt_top_logprobs[1:]):
            assert [t for t, _ in top] == best.indices[pos].tolist() or abs(top[0][1] - top[1][1]) < 1e-4
            assert max(abs(v - e) for (_, v), e in zip(top, best.values[pos].tolist(), strict=True)) < 1e-4
