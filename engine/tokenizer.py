"""Text <-> token ids: HF ``tokenizers`` when the checkpoint has ``tokenizer.json``, else bytes.

The byte-level fallback maps byte b to id ``b + BYTE_OFFSET`` (ids below the offset are reserved for
special tokens: 0 bos, 1 eos, 2 pad), so any model with a vocabulary of at least 259 can take text.
"""

from __future__ import annotations

from pathlib import Path

BYTE_OFFSET = 3
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")


class Tokenizer:
    """Common interface: ``encode``, ``decode``, ``eos_token_ids``."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for in output text (a piece of a multi-byte character is its
        own bytes, not U+FFFD's; OpenAI's chat `logprobs[].bytes` join back into the content)."""
        return self.decode([token_id]).encode()

    def grammar_vocab(self, size: int) -> tuple[list[str] | list[bytes], bool]:
        """The first `size` ids as a grammar engine reads them (`engine.grammar`): (pieces, byte_level).
        Byte-level BPE pieces as they are (byte_level True), else each token's bytes; tokens without
        text (special, padding) are empty."""
        return [self.token_bytes(i) for i in range(size)], False


class ByteTokenizer(Tokenizer):
    def __init__(self, eos_token_ids: tuple[int, ...] = (1,)) -> None:
        self.vocab_size = 256 + BYTE_OFFSET
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id - BYTE_OFFSET]) if BYTE_OFFSET <= token_id < 256 + BYTE_OFFSET else b""


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, eos_token_ids: tuple[int, ...]) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self._tok = _HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = eos_token_ids
        # Byte-level BPE (DeepSeek's, GPT-2's) spells each byte as one printable character: its pieces map
        # back to their bytes. Other vocabularies fall back to decoding the token alone.
        self._byte_of = ({c: b for b, c in _bytes_to_unicode().items()}
                         if type(self._tok.decoder).__name__ == "ByteLevel" else None)
        self._special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        # Models pad their vocabulary past the tokenizer's; those ids have no text.
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def grammar_vocab(self, size: int) -> tuple[list[str] | list[bytes], bool]:
        if self._byte_of is None:
            return super().grammar_vocab(size)
        pieces = []
        for i in range(size):
            piece = self._tok.id_to_token(i) if i < self.vocab_size else None
            pieces.append("" if piece is None or piece in self._special else piece)
        return pieces, True

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if piece is None or piece in self._special:
            return b""  # no text: padding past the tokenizer's vocabulary, or a special token (skipped)
        if self._byte_of is not None and all(c in self._byte_of for c in piece):
            return bytes(self._byte_of[c] for c in piece)
        return self.decode([token_id]).encode()


def load_tokenizer(model_dir: str | Path | None, eos_token_ids: tuple[int, ...]) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json" if model_dir is not None else None
    if path is not None and path.is_file():
        return HFTokenizer(path, eos_token_ids)
    return ByteTokenizer(eos_token_ids)


def write_byte_level_tokenizer(path: str | Path) -> None:
    """Write a ``tokenizer.json`` (HF ``tokenizers`` byte-level BPE, no merges) whose ids equal the
    byte fallback's: specials 0..2, byte b at b + 3. Used by the tiny model so both paths agree."""
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_chars[b]: b + BYTE_OFFSET for b in range(256)})
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table that byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
