"""Structured-output fields of a request, every peer's spelling, reduced to one `GrammarSpec` (or none).

OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema", ...}};
vLLM: `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and their successor
`structured_outputs` {"json" | "regex" | "choice" | "grammar" | "json_object"}; SGLang: `json_schema` (a JSON
text), `regex`, `ebnf` (in `sampling_params` on /generate). One kind per request, as vLLM requires. The spec is
checked here, in the HTTP process: a bad schema, regex or grammar is a 400 naming its field.
"""

from __future__ import annotations

import json
from typing import Any

from ..grammar import GrammarError, GrammarSpec, check_spec
from .errors import RequestError

# Top-level fields (OpenAI kinds) and `sampling_params` fields (/generate) that ask for a grammar.
OPENAI_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs", "json_schema", "regex", "ebnf")  # fmt: skip
SAMPLING_PARAMS_FIELDS = ("json_schema", "regex", "ebnf")
_STRUCTURED_OUTPUTS_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "ebnf",
                            "json_object": "json"}  # fmt: skip
JSON_OBJECT = '{"type": "object"}'  # what json_object means (SGLang compiles it the same way)


def _schema_text(value: Any, name: str) -> str:
    """A JSON schema given as an object or as JSON text, as text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RequestError(f"'{name}' is not valid JSON: {exc}", param=name) from None
    if not isinstance(value, dict | bool):
        raise RequestError(f"'{name}' must be a JSON schema (an object)", param=name)
    return json.dumps(value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"'{name}' must be a non-empty string", param=name)
    return value


def _choices(value: Any, name: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise RequestError(f"'{name}' must be a non-empty list of non-empty strings", param=name)
    return json.dumps(value)


def _response_format(value: Any) -> GrammarSpec | None:
    name = "response_format"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RequestError("'response_format' must be an object with a 'type'", param=name)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json", JSON_OBJECT)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise RequestError("'response_format.json_schema' must be an object with a 'schema'",
                               param="response_format.json_schema")
        # `strict` true or false is served the same: the schema is always enforced (OpenAI's strict mode).
        return GrammarSpec("json", _schema_text(inner["schema"], "response_format.json_schema.schema"))
    raise RequestError(f"'response_format' type {kind!r} is not supported (text, json_object, json_schema)",
                       code="unsupported", param=name)


def _structured_outputs(value: Any) -> GrammarSpec | None:
    name = "structured_outputs"
    if not isinstance(value, dict):
        raise RequestError("'structured_outputs' must be an object", param=name)
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    unknown = sorted(given.keys() - _STRUCTURED_OUTPUTS_KEYS.keys())
    if unknown:
        raise RequestError(f"'structured_outputs.{unknown[0]}' is not supported", code="unsupported",
                           param=f"{name}.{unknown[0]}")
    if len(given) > 1:
        raise RequestError("'structured_outputs' takes one of json, regex, choice, grammar, json_object", param=name)
    if not given:
        return None
    key, v = next(iter(given.items()))
    where = f"{name}.{key}"
    if key == "json_object":
        return GrammarSpec("json", JSON_OBJECT)
    if key == "json":
        return GrammarSpec("json", _schema_text(v, where))
    if key == "choice":
        return GrammarSpec("choice", _choices(v, where))
    return GrammarSpec(_STRUCTURED_OUTPUTS_KEYS[key], _text(v, where))


def _one(name: str, value: Any) -> GrammarSpec | None:
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _structured_outputs(value)
    if name in ("guided_json", "json_schema"):
        return GrammarSpec("json", _schema_text(value, name))
    if name in ("guided_regex", "regex"):
        return GrammarSpec("regex", _text(value, name))
    if name == "guided_choice":
        return GrammarSpec("choice", _choices(value, name))
    return GrammarSpec("ebnf", _text(value, name))  # guided_grammar, ebnf


def parse_grammar(src: dict[str, Any], fields: tuple[str, ...], prefix: str = "") -> GrammarSpec | None:
    """The request's grammar from whichever of `fields` `src` sets, checked; None when it asks for none."""
    found: list[tuple[str, GrammarSpec]] = []
    for name in fields:
        value = src.get(name)
        if value is None:
            continue
        spec = _one(name, value)
        if spec is not None:
            found.append((name, spec))
    if not found:
        return None
    if len(found) > 1:
        raise RequestError(f"one kind of structured output per request: '{found[0][0]}' and '{found[1][0]}' given",
                           param=prefix + found[1][0])
    name, spec = found[0]
    try:
        check_spec(spec)
    except GrammarError as exc:
        raise RequestError(f"'{name}' is not a valid {spec.kind} grammar: {exc}", param=prefix + name) from None
    return spec
