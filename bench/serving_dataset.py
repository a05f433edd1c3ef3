"""Synthetic prompts for the serving benchmark (SGLang/vLLM ``--dataset random`` conventions).

Each request gets an input length drawn uniformly from ``[max(1, I * ratio), I]`` and an output length
from ``[max(1, O * ratio), O]`` (SGLang's rule; ratio 1.0 means fixed lengths). The prompt is either a
list of token ids (exact length, no tokenizer needed) or text: decoded from random ids when a tokenizer
is given, or random words otherwise (then the server's ``usage.prompt_tokens`` gives the true length).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# Common short English words: each is one token in every BPE vocabulary we know of, so a prompt of n
# words is close to n tokens even without a tokenizer.
_FILLER_WORDS: tuple[str, ...] = (
    "the of and to in is it you that he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find"
).split()


class TokenizerLike(Protocol):
    """The two calls the benchmark needs from a tokenizer."""

    def encode_ids(self, text: str) -> list[int]: ...

    def decode_ids(self, ids: list[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...


@dataclass(frozen=True)
class RequestInput:
    """One benchmark request before it is sent.

    ``prompt`` is a token-id list or text; ``prompt_len`` is its length in tokens as far as the client
    knows (exact for ids or with a tokenizer, the word count otherwise).
    """

    index: int
    prompt: str | list[int]
    prompt_len: int
    output_len: int


class HFTokenizer:
    """A ``tokenizers`` (or, failing that, ``transformers``) tokenizer loaded from a model folder."""

    def __init__(self, path: str) -> None:
        folder = Path(path)
        tokenizer_json = folder / "tokenizer.json" if folder.is_dir() else folder
        if tokenizer_json.is_file() and tokenizer_json.suffix == ".json":
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(tokenizer_json))
            self._hf = None
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:  # pragma: no cover - transformers is a test dependency
                raise ValueError(f"no tokenizer.json in {path} and transformers is not installed") from exc
            self._fast = None
            self._hf = AutoTokenizer.from_pretrained(path)

    @property
    def vocab_size(self) -> int:
        if self._fast is not None:
            return int(self._fast.get_vocab_size())
        return int(len(self._hf))

    def encode_ids(self, text: str) -> list[int]:
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=False).ids)
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode_ids(self, ids: list[int]) -> str:
        if self._fast is not None:
            return str(self._fast.decode(ids))
        return str(self._hf.decode(ids))


def _special_token_ids(path: str | None) -> set[int]:
    """Ids of special tokens named in a model folder, so random prompts never contain BOS/EOS."""
    if path is None:
        return set()
    config = Path(path) / "config.json"
    if not config.is_file():
        return set()
    fields = json.loads(config.read_text())
    found: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = fields.get(key)
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, int))
    return found


def draw_lengths(rng: np.random.Generator, target: int, ratio: float, count: int) -> np.ndarray:
    """Uniform lengths in ``[max(1, target * ratio), target]`` (SGLang's ``--random-range-ratio``)."""
    low = max(1, int(target * ratio))
    return rng.integers(low, target + 1, size=count)


def random_requests(
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    prompt_format: str,
    vocab_size: int,
    tokenizer: TokenizerLike | None = None,
    excluded_ids: set[int] | None = None,
) -> list[RequestInput]:
    """Build ``num_prompts`` random requests; the same arguments always give the same requests.

    ``prompt_format`` is ``"ids"`` (token-id list) or ``"text"``. Ids run consecutively from a random
    offset (as SGLang does) so a prefix cache cannot short-cut prefill, and skip ``excluded_ids``.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input and output lengths must be >= 1, got {input_len} and {output_len}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"random range ratio must be in [0, 1], got {range_ratio}")
    if prompt_format not in ("ids", "text"):
        raise ValueError(f"prompt format must be 'ids' or 'text', got {prompt_format!r}")
    excluded = excluded_ids or set()
    allowed = np.array([i for i in range(vocab_size) if i not in excluded], dtype=np.int64)
    if allowed.size < 2:
        raise ValueError(f"vocab size {vocab_size} leaves fewer than 2 usable token ids")

    rng = np.random.default_rng(seed)
    input_lens = draw_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = draw_lengths(rng, output_len, range_ratio, num_prompts)
    offsets = rng.integers(0, allowed.size, size=num_prompts)
    requests: list[RequestInput] = []
    for index in range(num_prompts):
        n_in = int(input_lens[index])
        positions = (int(offsets[index]) + index + np.arange(n_in)) % allowed.size
        ids = allowed[positions].tolist()
        prompt: str | list[int]
        if prompt_format == "ids":
            prompt, prompt_len = ids, n_in
        elif tokenizer is not None:
            prompt = tokenizer.decode_ids(ids)
            prompt_len = len(tokenizer.encode_ids(prompt))
        else:
            words = rng.choice(len(_FILLER_WORDS), size=n_in)
            prompt, prompt_len = " ".join(_FILLER_WORDS[w] for w in words), n_in
        requests.append(RequestInput(index, prompt, prompt_len, int(output_lens[index])))
    return requests


def load_tokenizer(path: str | None) -> tuple[HFTokenizer | None, set[int]]:
    """The tokenizer at ``path`` (or None) and the special-token ids to keep out of prompts."""
    if path is None:
        return None, set()
    return HFTokenizer(path), _special_token_ids(path)
