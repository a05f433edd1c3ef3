"""Offline generation API: ``LLM(model_dir).generate(prompts, params)``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import ModelConfig
from engine.cuda_graph import CudaGraphRunner
from engine.dbo import DboConfig
from engine.grammar import GrammarRuntime
from engine.kv_pool import KVPool, resolve_kv_cache_dtype
from engine.model import DeepseekForCausalLM
from engine.mps_cap_check import check_gemms_under_sm_cap
from engine.quant import plan_quantization
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import Tokenizer, load_tokenizer
from engine.weights import load_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Output:
    """One prompt's result: generated ids only (not the prompt), their text, why it stopped."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None  # per output token, with `generate(..., return_logprob=True)`
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per output token, with `top_logprobs=k`
    # Per prompt token (None for the first), with `generate(..., prompt_logprobs=k)`; and its k alternatives.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)} or auto)")
    return _DTYPES[dtype]


class LLM:
    """Model + KV pool + scheduler + tokenizer in one process. ``close()`` releases the pool.

    Args:
        model_dir: HF checkpoint directory (config.json, *.safetensors, optional tokenizer.json).
        device: "cpu" or "cuda[:N]".
        dtype: "auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16", "float16".
        page_size: tokens per KV page.
        num_pages: KV pool size; None takes 1/4 of free GPU memory, or room for 65536 tokens on CPU.
        load_format: "auto" (safetensors) or "dummy" (seeded random weights of the config's shapes).
        max_prefill_tokens: chunk size of one prefill forward.
        seed: seed of dummy weights.
        kv_cache_dtype: "auto" (the model dtype), "bfloat16" or "fp8_e4m3" (engine.kv_pool).
        cuda_graph_max_bs: decode batches of up to this many sequences replay CUDA graphs captured at
            start-up (engine.cuda_graph); 0 = eager. On CPU the same padded graph-safe path runs eagerly.
        quantization: "auto" (the checkpoint's quantization_config), "fp8" or "none" (engine.quant).
        prefix_cache: reuse the KV pages of cached prompt prefixes (engine.prefix_cache); idle then means
            ``kv_pool.available_pages == kv_pool.num_pages`` (free + evictable cached pages).
        reserve_tokens: None reserves each request's whole life at admission; N reserves prompt + N output
            tokens and retracts the newest requests when the pool runs out (``Scheduler``).
        dbo: dual batch overlap (``engine.dbo``); None: off. One rank has no EP traffic to hide, so it only
            tests the interleaving (and measures its cost).
        overlap_schedule: overlapped decode turns (``engine.decode_overlap``); None: on CUDA only.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = "auto",
                 page_size: int = 64, num_pages: int | None = None, load_format: str = "auto",
                 max_prefill_tokens: int = 8192, max_running: int = 256, seed: int = 0,
                 cuda_graph_max_bs: int = 0, kv_cache_dtype: str = "auto", quantization: str = "auto",
                 prefix_cache: bool = True, reserve_tokens: int | None = None, dbo: DboConfig | None = None,
                 overlap_schedule: bool | None = None) -> None:
        if cuda_graph_max_bs < 0:
            raise ValueError(f"cuda_graph_max_bs must be >= 0, got {cuda_graph_max_bs}")
        self.device = torch.device(device)
        self.config = ModelConfig.from_dir(model_dir)
        self.dtype = resolve_dtype(dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        started = time.monotonic()
        if self.device.type == "cuda":  # under an MPS SM cap only (engine.mps_cap_check)
            check_gemms_under_sm_cap(self.config, self.device, rows=max_prefill_tokens, dtype=self.dtype)
        self.quant = plan_quantization(quantization, self.config, self.device, self.dtype)
        self.model = DeepseekForCausalLM(self.config, dtype=self.dtype, device=self.device, fp8=self.quant.model_fp8)
        load_model(self.model, model_dir, load_format, seed, self.quant.in_effect)
        self.model.dbo = dbo or DboConfig()
        log.info("model ready in %.1fs", time.monotonic() - started)
        if num_pages is None:
            num_pages = self._default_num_pages(page_size)
        self.kv_pool = KVPool(num_pages, self.config.num_hidden_layers, page_size, self.config.kv_cache_dim,
                              self.kv_dtype, self.device, prefix_cache=prefix_cache)
        self.tokenizer: Tokenizer = load_tokenizer(model_dir, self.config.eos_token_ids)
        self.graph_runner: CudaGraphRunner | None = None
        if cuda_graph_max_bs:
            self.graph_runner = CudaGraphRunner(self.model, self.kv_pool, cuda_graph_max_bs)
        self.scheduler = Scheduler(self.model, self.kv_pool, max_prefill_tokens, max_running,
                                   self.config.eos_token_ids, decode_forward=self.graph_runner,
                                   reserve_tokens=reserve_tokens,
                                   grammar=GrammarRuntime(self.tokenizer, self.config.vocab_size,
                                                          self.config.eos_token_ids),
                                   overlap=self.device.type == "cuda" if overlap_schedule is None else overlap_schedule)

    def _default_num_pages(self, page_size: int) -> int:
        bytes_per_page = (self.config.num_hidden_layers * page_size * self.config.kv_cache_dim
                          * torch.empty(0, dtype=self.kv_dtype).element_size())
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * 0.25) // bytes_per_page)
        return max(1, -(-65536 // page_size))

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = False, return_logprob: bool = False, top_logprobs: int = 0,
                 prompt_logprobs: int | None = None) -> list[Output]:
        """Generate for every prompt, all batched together; outputs in prompt order. `return_logprob`: each
        output token's log-probability under the model (`engine.sampling.logprob_report`) too, and with
        `top_logprobs` > 0 that many most likely tokens at each position (token id, logprob).

        Every prompt is validated before any work starts, so a bad one leaves nothing queued.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, list):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        token_lists = [self.encode(p) for p in prompts]
        for i, (ids, p) in enumerate(zip(token_lists, per_prompt, strict=True)):
            try:
                self.scheduler.validate_prompt(ids, p)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from exc
        requests = [self.scheduler.add(ids, p) for ids, p in zip(token_lists, per_prompt, strict=True)]
        for req in requests:
            req.return_logprob = return_logprob or top_logprobs > 0
            req.top_logprobs = top_logprobs
            req.prompt_logprobs = -1 if prompt_logprobs is None else prompt_logprobs
        total = sum(p.max_new_tokens for p in per_prompt)
        with tqdm(total=total, disable=not use_tqdm, unit="tok", desc="generate") as bar:
            try:
                while any(not r.finished for r in requests):
                    result = self.scheduler.step()
                    bar.update(len(result.new_tokens))
                self.scheduler.read_launched()  # an overlapped turn's void rows: their pages go back
            except BaseException:
                for req in requests:
                    self.scheduler.abort(req)
                raise
        return [Output(r.prompt_ids, list(r.output_ids), self.tokenizer.decode(r.output_ids),
                       r.finish_reason or "abort", list(r.output_logprobs) if r.return_logprob else None,
                       list(r.output_top_logprobs) if top_logprobs else None,
                       list(r.prompt_logprob_values) if prompt_logprobs is not None else None,
                       list(r.prompt_top_logprobs) if prompt_logprobs is not None else None)
                for r in requests]

    def close(self) -> None:
        if self.graph_runner is not None:
            self.graph_runner.close()  # returns its scratch page before the pool goes
        self.kv_pool.close()
