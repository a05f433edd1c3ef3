"""The windowed detokenizer (`engine.server.detokenize`) against a decode of the whole output on every push.

The reference is the class as it was before (`bench.detokenize.FullDecodeDetokenizer`): for random ids,
random push sizes and stop strings, every push must return the same delta, and the end the same text
and stop string. Codecs: bytes (the API tests' codec), the byte fallback tokenizer, the tiny model's
tokenizer.json, a trained byte-level BPE whose ids can end inside a UTF-8 character, and a trained
SentencePiece-style BPE (its decoder drops the text's leading space: the window's context ids matter).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from byte_codec import ByteCodec

from bench.detokenize import FullDecodeDetokenizer, random_text, trained_bpe
from engine.server.detokenize import IncrementalDetokenizer
from engine.server.protocol import TextCodec
from engine.tokenizer import ByteTokenizer, HFTokenizer, write_byte_level_tokenizer

CASES = 250


@pytest.fixture(scope="module")
def codec_by_name(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TextCodec]:
    tmp = tmp_path_factory.mktemp("tokenizers")
    write_byte_level_tokenizer(tmp / "tiny.json")
    return {"bytes": ByteCodec(), "byte_tokenizer": ByteTokenizer(),
            "tiny_tokenizer_json": HFTokenizer(tmp / "tiny.json", (1,)), "trained_bpe": trained_bpe(tmp / "bpe.json"),
            "sentencepiece": trained_sentencepiece(tmp / "sp.json")}


def trained_sentencepiece(path: Path) -> HFTokenizer:
    """Metaspace pieces ("▁the"): the decoder turns "▁" into a space but drops the one that starts a text,
    so a window decoded without its context ids would lose a space between words."""
    from tokenizers import SentencePieceBPETokenizer

    rng = random.Random(1)
    tok = SentencePieceBPETokenizer()
    tok.train_from_iterator((random_text(rng, 40) for _ in range(300)), vocab_size=200, show_progress=False,
                            special_tokens=["<bos>", "<eos>", "<pad>", "<unk>"])
    tok.save(str(path))
    return HFTokenizer(path, (1,))


def random_ids(rng: random.Random, codec: TextCodec, vocab: int) -> list[int]:
    """Encoded multi-script text with stray ids mixed in: any id of the vocabulary (special tokens, a
    lone UTF-8 continuation byte, U+FFFD's own bytes among them), and ids past it for the tokenizers."""
    ids: list[int] = []
    for _ in range(rng.randint(0, 6)):
        roll = rng.random()
        if roll < 0.6:
            ids += codec.encode(random_text(rng, rng.randint(1, 4)), add_special_tokens=False)
        elif roll < 0.7:
            ids += codec.encode("\ufffd", add_special_tokens=False)
        else:
            ids += [rng.randrange(vocab + (0 if isinstance(codec, ByteCodec) else 8))]
    return ids


def pushes(rng: random.Random, ids: list[int]) -> list[list[int]]:
    """`ids` cut into pushes of 1 to 3 ids (a decode step, or a few of them batched), an empty one at times."""
    out, at = [], 0
    while at < len(ids):
        n = rng.choice((0, 1, 1, 1, 2, 3))
        out.append(ids[at : at + n])
        at += n
    return out


def random_stops(rng: random.Random, text: str) -> tuple[str, ...]:
    """Pieces of the text (so they match, often across pushes) and near misses that share their start."""
    stops: list[str] = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.7:
            at = rng.randrange(len(text))
            piece = text[at : at + rng.randint(1, 5)]
            stops.append(piece if rng.random() < 0.7 else piece + "\x00")
        else:
            stops.append(rng.choice(("é", "日本", "\n\n", "🚀🚀", "the end")))
    return tuple(stops)


def run(detok: IncrementalDetokenizer | FullDecodeDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str, str | None]:
    deltas = [detok.push(c) for c in chunks] + [detok.flush()]
    return deltas, detok.text, detok.stopped


@pytest.mark.parametrize("name", ["bytes", "byte_tokenizer", "tiny_tokenizer_json", "trained_bpe", "sentencepiece"])
def test_every_push_returns_what_decoding_the_whole_output_returned(codec_by_name: dict[str, TextCodec],
                                                                    name: str) -> None:
    codec = codec_by_name[name]
    vocab = getattr(codec, "vocab_size", 256)
    rng = random.Random(name)
    stopped = 0
    for case in range(CASES):
        ids = random_ids(rng, codec, vocab)
        chunks = pushes(rng, ids)
        stop = random_stops(rng, codec.decode(ids)) if case % 2 else ()
        include_stop = rng.random() < 0.5
        got = run(IncrementalDetokenizer(codec, stop, include_stop), chunks)
        want = run(FullDecodeDetokenizer(codec, stop, include_stop), chunks)
        assert got == want, (case, ids, chunks, stop, include_stop)
        if not stop:
            assert "".join(got[0]) == got[1] == codec.decode(ids)
        stopped += got[2] is not None
    assert stopped > CASES // 5  # the stop strings did end texts, often


def test_the_trained_bpe_splits_characters_across_ids(codec_by_name: dict[str, TextCodec]) -> None:
    """What makes it a test of partial characters: some of its ids hold only part of a character."""
    codec = codec_by_name["trained_bpe"]
    assert isinstance(codec, HFTokenizer)
    ids = codec.encode("日本語 テキスト 😀 🚀 café ключ σήμα", add_special_tokens=False)
    partial = [i for i in ids if codec.decode([i]).endswith("\ufffd") and len(codec.token_bytes(i)) > 1]
    assert partial, "no merged id ends inside a character"
    detok = IncrementalDetokenizer(codec)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == codec.decode(ids) and "\ufffd" not in "".join(deltas)
    assert "" in deltas[:-1]  # held while a character was incomplete


def test_a_character_split_over_pushes_and_a_stop_string_spanning_them() -> None:
    detok = IncrementalDetokenizer(ByteCodec(), ("本語",))
    text = "日本語".encode()  # three 3-byte characters
    deltas = [detok.push([b]) for b in text[:7]]
    assert deltas == ["", "", "日", "", "", "", ""]  # "本" whole at byte 6, held: it may begin "本語"
    assert detok.push(list(text[7:])) == "" and detok.stopped == "本語" and detok.text == "日"
    detok = IncrementalDetokenizer(ByteCodec(), ("本語",), include_stop=True)
    assert [detok.push([b]) for b in text][-1] == "本語" and detok.text == "日本語"


def test_a_push_decodes_a_few_ids_however_long_the_output(tmp_path: Path) -> None:
    """The point of the window: no push decodes more than a few ids, at the 5000th token as at the first."""
    write_byte_level_tokenizer(tmp_path / "tiny.json")
    tokenizer = HFTokenizer(tmp_path / "tiny.json", (1,))
    longest: list[int] = []

    class Counting:
        eos_token_id = None

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return tokenizer.encode(text, add_special_tokens)

        def decode(self, ids: list[int]) -> str:
            longest.append(len(ids))
            return tokenizer.decode(ids)

    ids = tokenizer.encode(random_text(random.Random(0), 2000), add_special_tokens=False)[:5000]
    detok = IncrementalDetokenizer(Counting(), ("</answer>",))
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert len(ids) == 5000 and "".join(deltas) == tokenizer.decode(ids)
    assert max(longest) <= 8  # a 4-byte character's ids plus the one before it
