"""Structured output: a grammar (JSON schema, regex, choice, EBNF) masks the logits of every step (xgrammar).

One code path for every place a token is drawn (`constrain` before the draw, `advance` after it):
colocated decode (`engine.scheduler`), the prefill side's first token (`prefill_worker.batcher`), and a
decode instance adopting a request whose first token was drawn by prefill (`Scheduler.add_prefilled`
rebuilds the matcher and replays that token through `advance` before it masks token 1). So a request's
tokens are the same whether it is disaggregated or not.

A request carries its grammar as text (`GrammarSpec`): what crosses processes is small, and each rank
compiles it once (xgrammar's compiler caches by grammar). Specs are checked where the request arrives
(`check_spec`, in the HTTP process), so a bad schema or regex is a 400 there, never a rank-side error.
xgrammar is imported on first use: a server that never sees a constrained request never loads it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

# What a spec's text holds, by kind: a JSON schema (json_object is the schema {"type": "object"}, as
# SGLang compiles it), a regular expression, a JSON list of strings (exactly one of them), or EBNF
# (xgrammar's dialect, as SGLang's `ebnf` and vLLM's `grammar`).
KINDS = ("json", "regex", "choice", "ebnf")
# JSON is generated compact: a model may not pad an answer with whitespace until it runs out of tokens
# (xgrammar's any_whitespace would allow it, and a sampled model at temperature 1 does it).
_ANY_WHITESPACE = False


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of KINDS
    text: str


class GrammarError(ValueError):
    """The spec does not compile (bad schema, regex or grammar)."""


# xgrammar 0.2.9 writes strings with a length bound as `[^"\\\r\n]{0, n}`, which lets raw control characters
# (U+0000-U+001F) into JSON strings: invalid JSON that json.loads refuses (found by tests/test_chat_output.py).
# Its unbounded strings exclude them; bounded ones get the same class here.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def json_schema_grammar(schema: str) -> Any:
    """xgrammar's grammar for a JSON schema, its strings kept to valid JSON."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=_ANY_WHITESPACE)
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


def _grammar(spec: GrammarSpec) -> Any:
    import xgrammar as xgr

    if spec.kind == "json":
        return json_schema_grammar(spec.text)
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.text)
    if spec.kind == "choice":
        choices = json.loads(spec.text)
        # Each choice as an EBNF string literal: JSON's escaping (ASCII only) is a valid literal there.
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "ebnf":
        return xgr.Grammar.from_ebnf(spec.text)
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


def check_spec(spec: GrammarSpec) -> None:
    """Raise GrammarError unless `spec` parses (no tokenizer needed: the HTTP process checks it)."""
    if spec.kind == "choice":
        choices = json.loads(spec.text)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("a choice must be a non-empty list of non-empty strings")
    try:
        _grammar(spec)
    except GrammarError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors for bad input
        raise GrammarError(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__) from None


class GrammarRuntime:
    """One rank's grammar compiler over its tokenizer. `matcher(spec)` is a fresh matcher for a request;
    compiled grammars are cached (xgrammar's own cache, keyed by the grammar), so a schema is compiled once.
    The compiler is built on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _compile(self, spec: GrammarSpec) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                # Special tokens come as empty strings, which xgrammar never allows inside text.
                vocab, byte_level = self._tokenizer.grammar_vocab(self.vocab_size)
                vocab_type = xgr.VocabType.BYTE_LEVEL if byte_level else xgr.VocabType.RAW
                info = xgr.TokenizerInfo(vocab, vocab_type, vocab_size=self.vocab_size, stop_token_ids=self._eos)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            compiler = self._compiler
        try:
            return compiler.compile_grammar(_grammar(spec))
        except GrammarError:
            raise
        except Exception as exc:
            raise GrammarError(f"the {spec.kind} grammar does not compile: {exc}") from None

    def matcher(self, spec: GrammarSpec) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self._compile(spec))


def matcher_for(runtime: GrammarRuntime | None, spec: GrammarSpec | None) -> Any:
    """A fresh matcher for a request's structured output (`spec`), or None without one; ValueError where the
    instance has no grammar runtime. The one rule for the scheduler and the prefill batcher."""
    if spec is None:
        return None
    if runtime is None:
        raise ValueError("structured output is not available on this instance")
    return runtime.matcher(spec)


def constrain(logits: torch.Tensor, matchers: list[Any], copied: bool) -> torch.Tensor:
    """`logits` [B, V] with each constrained row's disallowed tokens at -inf. `copied`: `logits` is the
    caller's own copy already (else one is made, so the model's raw logits stay for the logprob report)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    out = logits if copied and logits.dtype == torch.float32 else logits.float().clone()
    bitmask = xgr.allocate_token_bitmask(len(matchers), out.shape[-1])
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(out, bitmask.to(out.device), indices=rows)
    return out


def advance(matcher: Any, token: int) -> bool:
    """Move `matcher` past `token`; False if the grammar does not allow it there."""
    return bool(matcher.accept_token(token))


def finished(matcher: Any) -> bool:
    """The grammar is complete and its stop token was taken: the answer is over."""
    return bool(matcher.is_terminated())
