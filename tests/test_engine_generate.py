"""Offline generation end to end: CLI, tokenizers, checkpoint formats, sampling, stops, and requests
whose KV arrives from another instance."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_engine import idle_llm, tiny_v3_dir

from engine.forward_batch import ForwardBatch, ForwardMode
from engine.llm import LLM
from engine.sampling import SamplingParams, sample
from engine.tiny_model import write_tiny_model

GREEDY8 = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_v3_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def llm(tiny_dir: Path) -> Iterator[LLM]:
    yield from idle_llm(tiny_dir, num_pages=64)


def test_cli_prints_generated_ids_and_text_as_json_in_prompt_order(tiny_dir: Path, llm: LLM) -> None:
    prompts = [[10, 11, 12, 13, 14, 15, 16], [40, 41]]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(tiny_dir), "--prompt-token-ids",
         json.dumps(prompts), "--max-new-tokens", "6", "--ignore-eos", "--json", "--page-size", "16"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    outputs = json.loads(proc.stdout)["outputs"]
    expected = llm.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [o["token_ids"] for o in outputs] == [e.token_ids for e in expected]
    assert [o["text"] for o in outputs] == [e.text for e in expected]


def test_cli_rejects_malformed_token_ids_with_a_clear_message(tiny_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(tiny_dir), "--prompt-token-ids", "[1, 2]"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "must be a JSON list of lists of integers" in proc.stderr


def test_text_prompts_encode_the_same_with_tokenizer_json_and_the_byte_fallback(tiny_dir: Path, tmp_path: Path,
                                                                                  llm: LLM) -> None:
    no_tokenizer = tmp_path / "m"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tokenizer / f).write_bytes((tiny_dir / f).read_bytes())
    fallback = LLM(str(no_tokenizer), page_size=16, num_pages=8)
    try:
        assert type(fallback.tokenizer).__name__ == "ByteTokenizer"
        assert type(llm.tokenizer).__name__ == "HFTokenizer"
        text = "héllo, wörld"
        assert fallback.tokenizer.encode(text) == llm.tokenizer.encode(text) == [b + 3 for b in text.encode()]
        out_hf = llm.generate([text], GREEDY8)[0]
        out_bytes = fallback.generate([text], GREEDY8)[0]
        assert out_hf.token_ids == out_bytes.token_ids
        assert out_hf.text == out_bytes.text
    finally:
        fallback.close()


def test_sharded_checkpoint_with_index_loads_the_same_weights(tmp_path: Path, llm: LLM) -> None:
    sharded = LLM(str(write_tiny_model(tmp_path / "s", "v3", seed=0, shards=3)), page_size=16, num_pages=8)
    try:
        assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
        for (name, a), (_, b) in zip(llm.model.state_dict().items(), sharded.model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    finally:
        sharded.close()


def test_tiny_model_checkpoint_loads_in_transformers_with_the_same_logits(tiny_dir: Path, llm: LLM) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    prompt = list(range(3, 60))
    pages = llm.kv_pool.alloc(4)
    try:
        batch = ForwardBatch.build(ForwardMode.EXTEND, [prompt], [0], [pages], llm.kv_pool, return_all_logits=True)
        ours = llm.model(batch).all_logits
    finally:
        llm.kv_pool.free(pages)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_dummy_weights_are_seeded_and_not_degenerate(tiny_dir: Path) -> None:
    outs = []
    for seed in (5, 5, 6):
        engine = LLM(str(tiny_dir), page_size=16, num_pages=8, load_format="dummy", seed=seed)
        try:
            outs.append(engine.generate([[10, 20, 30]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids)
        finally:
            engine.close()
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert len(set(outs[0])) > 3


def test_seeded_sampling_depends_only_on_the_request_seed_not_on_its_batch(llm: LLM) -> None:
    sampled = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_new_tokens=10, ignore_eos=True)
    alone = llm.generate([[10, 11, 12]], sampled)[0].token_ids
    together = llm.generate([[50, 51], [10, 11, 12], [99] * 20],
                            [SamplingParams(temperature=0.8, seed=1, max_new_tokens=5), sampled, GREEDY8])[1]
    other_seed = llm.generate([[10, 11, 12]], SamplingParams(temperature=1.0, seed=8, max_new_tokens=10,
                                                              ignore_eos=True))[0].token_ids
    assert together.token_ids == alone
    assert other_seed != alone


def test_top_k_one_and_a_tiny_top_p_both_reduce_to_greedy(llm: LLM) -> None:
    greedy = llm.generate([[7, 8, 9]], GREEDY8)[0].token_ids
    top_k = llm.generate([[7, 8, 9]], SamplingParams(temperature=1.5, top_k=1, max_new_tokens=8, ignore_eos=True))
    top_p = llm.generate([[7, 8, 9]], SamplingParams(temperature=1.5, top_p=1e-6, seed=3, max_new_tokens=8,
                                                     ignore_eos=True))
    assert top_k[0].token_ids == greedy == top_p[0].token_ids


def test_stop_tokens_and_eos_end_generation_and_ignore_eos_does_not(llm: LLM) -> None:
    greedy = llm.generate([[7, 8, 9]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids
    stop = greedy[4]
    cut = greedy.index(stop) + 1
    out = llm.generate([[7, 8, 9]], SamplingParams(max_new_tokens=16, stop_token_ids=(stop,)))[0]
    assert (out.token_ids, out.finish_reason) == (greedy[:cut], "stop")
    saved = llm.scheduler.eos_token_ids
    llm.scheduler.eos_token_ids = (stop,)
    try:
        as_eos = llm.generate([[7, 8, 9]], SamplingParams(max_new_tokens=16))[0]
        ignored = llm.generate([[7, 8, 9]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    finally:
        llm.scheduler.eos_token_ids = saved
    assert (as_eos.token_ids, as_eos.finish_reason) == (greedy[:cut], "stop")
    assert (ignored.token_ids, ignored.finish_reason) == (greedy, "length")


def test_request_with_prompt_kv_from_another_instance_decodes_like_a_local_one(tiny_dir: Path, llm: LLM) -> None:
    prompt = list(range(20, 60))
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].token_ids
    prefill = LLM(str(tiny_dir), page_size=16, num_pages=8)
    try:
        src_pages = prefill.kv_pool.alloc(prefill.kv_pool.pages_for_tokens(len(prompt)))
        batch = ForwardBatch.build(ForwardMode.EXTEND, [prompt], [0], [src_pages], prefill.kv_pool)
        first = int(prefill.model(batch).next_token_logits[0].argmax())
        dst_pages = llm.kv_pool.alloc(len(src_pages))
        llm.kv_pool.tensor[dst_pages] = prefill.kv_pool.tensor[src_pages]  # what a KV transfer does
        prefill.kv_pool.free(src_pages)
        req = llm.scheduler.add_prefilled(prompt, first, dst_pages, params)
        while not req.finished:
            llm.scheduler.step()
        assert req.output_ids == expected
        assert prefill.kv_pool.free_pages == prefill.kv_pool.num_pages
    finally:
        prefill.close()


def test_seeded_request_resumed_with_its_first_token_samples_what_the_uninterrupted_run_samples(
    tiny_dir: Path, llm: LLM
) -> None:
    # The first token is drawn where the prompt ran (as the prefill worker draws it: a fresh generator
    # from make_generator), the rest where the request is adopted: both must match one colocated run.
    prompt = list(range(30, 55))
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=11, max_new_tokens=12, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].token_ids
    prefill = LLM(str(tiny_dir), page_size=16, num_pages=8)
    try:
        src_pages = prefill.kv_pool.alloc(prefill.kv_pool.pages_for_tokens(len(prompt)))
        batch = ForwardBatch.build(ForwardMode.EXTEND, [prompt], [0], [src_pages], prefill.kv_pool)
        logits = prefill.model(batch).next_token_logits
        first = sample(logits, [params], [params.make_generator("cpu")]).tokens[0]
        dst_pages = llm.kv_pool.alloc(len(src_pages))
        llm.kv_pool.tensor[dst_pages] = prefill.kv_pool.tensor[src_pages]
        prefill.kv_pool.free(src_pages)
        req = llm.scheduler.add_prefilled(prompt, first, dst_pages, params)
        while not req.finished:
            llm.scheduler.step()
        assert req.output_ids == expected
        assert len(set(expected)) > 3  # really sampled, not a constant run
        assert prefill.kv_pool.free_pages == prefill.kv_pool.num_pages
    finally:
        prefill.close()
