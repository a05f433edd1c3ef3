"""The one table of request fields the worker API knows, and what it does with each (issue 21: nothing is
silently ignored).

Every field a request may carry is in exactly one class, per endpoint kind:
- honoured: `engine.server.protocol` parses it and it changes what runs or what is answered;
- neutral-only (`NEUTRAL`): not implemented; accepted only at the value that asks for nothing (the
  peers' default), any other value is a 400 naming it (`code: unsupported`);
- no effect by nature (`NO_EFFECT`): metadata about the caller (`user`, `metadata`) or a hint that changes
  no answer (`prompt_cache_key`); accepted, with the reason here.
A field in none of them is refused as OpenAI does ("Unrecognized request argument", 400, `param` set),
where vLLM and SGLang would log and ignore it.

The names are the union of OpenAI's, vLLM's (`vllm/entrypoints/openai/protocol.py`) and SGLang's
(`sglang/srt/entrypoints/openai/protocol.py`, `io_struct.GenerateReqInput`, `SamplingParams`) request
fields; `tests/test_api_fields.py` walks them all. The router (which may not import this package) only
reads what routing needs and passes every body on, so this table is the one place the rules live.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from kvtransfer import protocol as pd

from . import structured
from .errors import RequestError

# Sampling fields: OpenAI's top-level names, and SGLang's `sampling_params` names (both accepted in both
# places, as tandem always has: `max_new_tokens` at the top level, `max_tokens` inside sampling_params).
SAMPLING = frozenset({
    "max_tokens", "max_completion_tokens", "max_new_tokens", "min_tokens", "min_new_tokens", "temperature",
    "top_p", "top_k", "min_p", "seed", "sampling_seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "stop", "stop_token_ids", "ignore_eos", "n",
})  # fmt: skip
_PD = frozenset({pd.BOOTSTRAP_HOST, pd.BOOTSTRAP_PORT, pd.BOOTSTRAP_ROOM, pd.DATA_PARALLEL_RANK, pd.ROUTED_DP_RANK,
                 pd.DISAGG_PREFILL_DP_RANK, "rid"})
_OPENAI = frozenset({"model", "stream", "stream_options", "logprobs", "truncate_prompt_tokens",
                     "add_special_tokens", "include_stop_str_in_output", "no_stop_trim"})  # fmt: skip
_GRAMMAR = frozenset(structured.OPENAI_FIELDS)
_SGLANG_GRAMMAR = frozenset(structured.SAMPLING_PARAMS_FIELDS)
HONOURED: dict[str, frozenset[str]] = {
    "completion": SAMPLING | _PD | _OPENAI | _GRAMMAR | {"prompt", "echo", "best_of", "prompt_logprobs"},
    "chat": SAMPLING | _PD | _OPENAI | _GRAMMAR | {"messages", "top_logprobs", "best_of", "tools", "tool_choice",
                                                   "parallel_tool_calls", "separate_reasoning", "stream_reasoning",
                                                   "include_reasoning", "prompt_logprobs"},
    "generate": SAMPLING | _PD | _SGLANG_GRAMMAR | {"text", "input_ids", "sampling_params", "stream",
                                                    "return_logprob", "top_logprobs_num", "return_text_in_logprobs",
                                                    "logprob_start_len"},
}

# name -> the values that ask for nothing (None, absent, is always neutral). Kept to what a peer documents.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    # OpenAI
    "suffix": ("",), "functions": ([],), "function_call": ("none", "auto"),
    "store": (False,), "service_tier": ("auto", "default"), "modalities": (["text"],), "audio": (),
    "prediction": (), "web_search_options": (), "verbosity": (), "reasoning_effort": (), "reasoning": (),
    # vLLM
    "use_beam_search": (False,), "length_penalty": (1, 1.0),
    "skip_special_tokens": (True,),  # output text never holds special tokens (engine.tokenizer)
    "allowed_token_ids": ([],), "bad_words": ([],), "structural_tag": (),
    "guided_decoding_backend": ("xgrammar",),  # the one grammar engine here
    "guided_whitespace_pattern": (), "priority": (0,), "request_id": (),
    "logits_processors": ([],), "return_tokens_as_token_ids": (False,), "kv_transfer_params": ({},),
    "vllm_xargs": ({},), "mm_processor_kwargs": ({},), "prompt_embeds": (), "echo": (False,),
    "add_generation_prompt": (True,), "continue_final_message": (False,), "documents": ([],),
    "chat_template": (), "chat_template_kwargs": ({},),
    # SGLang
    "stop_regex": ([],),
    "return_hidden_states": (False,), "return_routed_experts": (False,), "routed_experts_start_len": (0,),
    "return_cached_tokens_details": (False,), "return_token_ids": (False,), "return_prompt_token_ids": (False,),
    "return_meta_info": (False,), "lora_path": (), "session_id": (), "session_params": ({},),
    "custom_params": ({},), "custom_logit_processor": (), "images_config": ({},), "extra_key": (), "ngram_corpus_id": (), "custom_labels": ({},),
    "max_dynamic_patch": (), "min_dynamic_patch": (), "use_audio_in_video": (False,), "task": (),
    "image_data": ([],), "audio_data": ([],), "video_data": ([],),
    "input_embeds": (), "token_ids_logprob": ([],), "return_bytes": (False,), "bootstrap_pair_key": (),
    # vLLM's per-tenant salt for prefix-cache hits: the prefix cache is shared by every request here, so a
    # salt that asks for isolation is refused rather than silently not given
    "cache_salt": (),
}  # fmt: skip
# Fields with no effect on the answer by nature, and why accepting them hides nothing.
NO_EFFECT: dict[str, str] = {
    "user": "an end-user id for the caller's abuse monitoring (OpenAI); it never changes the output",
    "safety_identifier": "OpenAI's successor of `user`",
    "metadata": "OpenAI's tags for stored completions; nothing is stored",
    "prompt_cache_key": "a cache-routing hint; the router's cache-aware policy routes by the prompt's own prefix",
    "log_metrics": "SGLang's per-request metrics switch; metrics are aggregated only",
    "spaces_between_special_tokens": "output text never holds special tokens, so nothing has spaces between",
}
_NEUTRAL_BY_KIND = {
    "completion": frozenset(NEUTRAL) - {"functions", "function_call",
                                        "add_generation_prompt", "continue_final_message",
                                        "documents", "chat_template", "chat_template_kwargs",
                                        "reasoning_effort", "reasoning", "audio", "modalities", "task",
                                        "web_search_options", "prediction"},
    "chat": frozenset(NEUTRAL) - {"suffix"},
    "generate": frozenset(NEUTRAL),
}
# Inside /generate's `sampling_params` (SGLang's SamplingParams).
_SAMPLING_PARAMS_NEUTRAL = frozenset({"skip_special_tokens", "structural_tag", "custom_params",
                                      "stop_regex"})  # fmt: skip


def _is_neutral(name: str, value: Any) -> bool:
    if value is None:
        return True
    return any(type(value) is type(ok) and value == ok for ok in NEUTRAL[name]) or (
        name == "length_penalty" and isinstance(value, int | float) and not isinstance(value, bool) and value == 1
    )


def _unsupported(name: str, value: Any) -> RequestError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return RequestError(f"'{name}' is not supported by this server (got {shown})", code="unsupported", param=name)


def _refuse_unhonoured(fields: dict[str, Any], honoured: Callable[[str], bool], neutral: Collection[str],
                       prefix: str, unrecognized: str) -> None:
    """One level of a body: every field honoured, or neutral-only with its no-op value, else a 400 whose
    `param` is the field's path (`prefix` + name)."""
    for name, value in fields.items():
        if honoured(name):
            continue
        if name in neutral:
            if not _is_neutral(name, value):
                raise _unsupported(prefix + name, value)
            continue
        raise RequestError(f"{unrecognized}: '{name}'", code="unrecognized_argument", param=prefix + name)


def check_fields(body: dict[str, Any], kind: str) -> None:
    """Refuse (RequestError, 400, `param` = the field) any field of `body` this server would not honour."""
    honoured = HONOURED[kind]
    # Kind-specific no-effect fields are harmless elsewhere too.
    _refuse_unhonoured(body, lambda name: name in honoured or name in NO_EFFECT, _NEUTRAL_BY_KIND[kind], "",
                       "Unrecognized request argument supplied")
    if kind == "generate":
        params = body.get("sampling_params")
        if isinstance(params, dict):
            _refuse_unhonoured(params, lambda name: (name in SAMPLING or name in _SGLANG_GRAMMAR
                                                     or name in ("spaces_between_special_tokens", "no_stop_trim")),
                               _SAMPLING_PARAMS_NEUTRAL, "sampling_params.", "Unrecognized sampling parameter")
            both = sorted((SAMPLING | _SGLANG_GRAMMAR) & body.keys())
            if both:
                raise RequestError(f"'{both[0]}' goes inside 'sampling_params' when that is given",
                                   param=both[0])


STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})


def check_stream_options(body: dict[str, Any]) -> dict[str, bool]:
    """OpenAI's `stream_options`: only with `stream: true` (OpenAI and vLLM answer 400 otherwise), only the
    keys it has, booleans."""
    options = body.get("stream_options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    if options and body.get("stream") is not True:
        raise RequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    out = {}
    for key, value in options.items():
        if key not in STREAM_OPTIONS:
            raise RequestError(f"Unrecognized stream option '{key}'", code="unrecognized_argument",
                               param=f"stream_options.{key}")
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"'stream_options.{key}' must be a boolean", param=f"stream_options.{key}")
        out[key] = bool(value)
    return out
