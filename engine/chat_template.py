"""Chat messages -> prompt text, the way the checkpoint says.

A checkpoint that ships a chat template (`tokenizer_config.json`'s `chat_template`, or a
`chat_template.jinja` file beside it) gets it rendered with Jinja2 in a sandbox, the way transformers'
`apply_chat_template` renders it (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`, the special
tokens as variables, `add_generation_prompt=True`); its text is then tokenized without adding special
tokens, since the template writes them. DeepSeek-V2 and V3 lay chats out differently, so one built-in
layout cannot serve both. A checkpoint without a template gets DeepSeek-V3's layout (`builtin_layout`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed to render."""


def builtin_layout(messages: list[dict[str, Any]]) -> str:
    """DeepSeek-V3's chat layout, for checkpoints without a template of their own."""
    from .server.tools import CALLS_BEGIN, CALLS_END, render_tool_call

    system, turns = "", []
    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "system":
            system += content
        elif role == "user":
            turns.append(f"<｜User｜>{content}")
        elif role == "tool":  # a call's result, as V3's template writes it
            turns.append(f"<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>"
                         "<｜tool▁outputs▁end｜>")
        else:
            calls = msg.get("tool_calls") or []
            called = CALLS_BEGIN + "\n".join(render_tool_call(c) for c in calls) + CALLS_END if calls else ""
            turns.append(f"<｜Assistant｜>{content}{called}<｜end▁of▁sentence｜>")
    return system + "".join(turns) + "<｜Assistant｜>"


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """Renders a conversation (messages already validated: dicts with string `role` and `content`)."""

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = None
        if source is not None:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii
            )
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(source)
            except TemplateError as exc:
                raise ChatTemplateError(f"the checkpoint's chat template does not parse: {exc}") from exc

    @property
    def from_checkpoint(self) -> bool:
        """True when the checkpoint's template renders (its text carries its own special tokens)."""
        return self._template is not None

    def render(self, messages: list[dict[str, Any]]) -> str:
        if self._template is None:
            return builtin_layout(messages)
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from exc

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> ChatTemplate:
        """The checkpoint's template (`chat_template.jinja`, else tokenizer_config.json's `chat_template`,
        the one named "default" when it lists several), or the built-in layout."""
        if model_dir is None:
            return cls(None)
        root = Path(model_dir)
        config_path = root / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        special = {key: _token_text(config[key]) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if key in config}  # fmt: skip
        jinja_file = root / "chat_template.jinja"
        source = jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return cls(source if isinstance(source, str) else None, special)
