"""Chat templates: the checkpoint's own (rendered as transformers renders it) or DeepSeek-V3's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.chat_template import ChatTemplate, builtin_layout
from engine.server.protocol import RequestError, parse_request
from engine.tokenizer import HFTokenizer, write_byte_level_tokenizer

# DeepSeek-V2-Chat's layout ("User: ...\n\nAssistant: ..."), not V3's: what a built-in layout got wrong.
V2_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "and now?"},
]


def _checkpoint(tmp_path: Path, template: object, jinja_file: str | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_byte_level_tokenizer(tmp_path / "tokenizer.json")
    config = {"bos_token": {"content": "<bos>", "special": True}, "eos_token": "<eos>"}
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja_file)
    return tmp_path


def test_the_checkpoints_template_renders_and_tokenizes_as_transformers_does(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = _checkpoint(tmp_path, V2_TEMPLATE)
    ours = ChatTemplate.from_model_dir(model_dir)
    assert ours.from_checkpoint
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<bos>",
                                              eos_token="<eos>", chat_template=V2_TEMPLATE)  # fmt: skip
    expected_text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.render(MESSAGES) == expected_text
    assert expected_text.startswith("<bos>Be brief.\n\nUser: hi") and expected_text.endswith("Assistant:")

    body = {"messages": MESSAGES, "max_tokens": 4}
    tokenizer = HFTokenizer(model_dir / "tokenizer.json", (1,))
    parsed = parse_request(body, "chat", tokenizer, 259, "tiny", 4096, ours)
    encoded = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    expected_ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # transformers 5: a dict
    assert parsed.request.input_ids == list(expected_ids)
    assert parsed.request.input_ids.count(0) == 1  # one BOS: the template's, none added by tokenization


def test_without_a_template_the_v3_layout_is_used(tmp_path: Path) -> None:
    template = ChatTemplate.from_model_dir(_checkpoint(tmp_path, None))
    assert not template.from_checkpoint
    assert template.render(MESSAGES) == builtin_layout(MESSAGES)
    assert builtin_layout(MESSAGES[1:2]) == "<｜User｜>hi<｜Assistant｜>"
    assert not ChatTemplate.from_model_dir(None).from_checkpoint


def test_a_template_file_wins_and_a_named_list_uses_default(tmp_path: Path) -> None:
    listed = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}D"}]
    assert ChatTemplate.from_model_dir(_checkpoint(tmp_path / "a", listed)).render(MESSAGES) == "<bos>D"
    from_file = ChatTemplate.from_model_dir(_checkpoint(tmp_path / "b", V2_TEMPLATE, jinja_file="FILE"))
    assert from_file.render(MESSAGES) == "FILE"


def test_a_template_that_refuses_the_conversation_gives_a_400(tmp_path: Path) -> None:
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}{% endif %}x"
    template = ChatTemplate.from_model_dir(_checkpoint(tmp_path, strict))
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json", (1,))
    with pytest.raises(RequestError, match="no system prompts"):
        parse_request({"messages": MESSAGES}, "chat", tokenizer, 259, "tiny", 4096, template)
    assert parse_request({"messages": MESSAGES[1:]}, "chat", tokenizer, 259, "tiny", 4096, template).request.input_ids


@pytest.mark.parametrize("source", ["{% for %}", "{{ unclosed "])
def test_a_template_that_does_not_parse_is_refused_at_start_up(tmp_path: Path, source: str) -> None:
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate.from_model_dir(_checkpoint(tmp_path, source))
