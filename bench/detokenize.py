"""Streaming detokenization: CPU time of one `push()` per token, whole-output decode vs. windowed decode.

The worker's HTTP process detokenizes every streamed answer on its one event loop, so the cost of a
push at the n-th output token delays every stream it serves. `FullDecodeDetokenizer` below is the
class as it was before the windowed decode (it decoded all of a request's ids on every push), kept
here as the baseline and as the tests' reference for what every push must return.

    python -m bench.detokenize [--lengths 100 1000 8000] [--output-json bench/results/detokenize_cpu.json]

Codecs: the embedded tiny model's byte-level tokenizer (one id per byte) and a byte-level BPE trained
here on mixed-script text (ids of several bytes, some ending inside a UTF-8 character), each with and
without stop strings. Per cell: the mean and p99 of push() over the tokens of one output, one token per
push, as a decode stream feeds it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.server.detokenize import IncrementalDetokenizer
from engine.server.protocol import TextCodec
from engine.tokenizer import HFTokenizer, write_byte_level_tokenizer

# Words from several scripts, so outputs hold 1- to 4-byte characters.
WORDS = ("the", "decode", "rank", "prefill", "café", "naïve", "über", "日本語", "テキスト", "中文", "ключ",
         "σήμα", "😀", "🚀", "a\u0301", "—", "€", "\n", "stream", "token")
STOPS = ("</answer>", "\n\nUser:", "🚀🚀")  # never in the generated text: the worst case, always checked


class FullDecodeDetokenizer:
    """The detokenizer before the windowed decode: each push decodes every id of the output so far."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = (), include_stop: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._codec = codec
        self._stop = stop
        self._include_stop = include_stop
        self.ids: list[int] = []
        self.stopped: str | None = None
        self._text = ""
        self._emitted = 0

    @property
    def text(self) -> str:
        return self._text[: self._emitted]

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        if self.stopped is not None:
            return ""
        self._text = self._codec.decode(self.ids)
        if self._text.endswith("\ufffd"):
            return ""
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped is not None:
            return ""
        self._text = self._codec.decode(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if self._stop:
            longest = max(len(s) for s in self._stop)
            start = max(0, self._emitted - longest + 1)
            hits = [(at, s) for s in self._stop if (at := self._text.find(s, start)) >= 0]
            if hits:
                end, self.stopped = min(hits)
                if self._include_stop:
                    end += len(self.stopped)
            elif not final:
                end -= self._pending_prefix(longest)
        delta, self._emitted = self._text[self._emitted : end], max(self._emitted, end)
        return delta

    def _pending_prefix(self, longest: int) -> int:
        for k in range(min(longest - 1, len(self._text) - self._emitted), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def trained_bpe(path: Path, vocab_size: int = 320, seed: int = 0) -> HFTokenizer:
    """A byte-level BPE (DeepSeek's kind of vocabulary) trained on WORDS, small enough (61 merges) that
    merged ids span several bytes and some end inside a character, whose bytes then arrive over two pushes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(seed)
    tok.train_from_iterator((random_text(rng, 40) for _ in range(500)), trainer)
    tok.save(str(path))
    return HFTokenizer(path, (1,))


def codecs(workdir: Path) -> dict[str, HFTokenizer]:
    write_byte_level_tokenizer(workdir / "tiny.json")
    return {"tiny_byte_level": HFTokenizer(workdir / "tiny.json", (1,)),
            "trained_bpe": trained_bpe(workdir / "bpe.json")}


def time_pushes(cls: type, codec: HFTokenizer, ids: list[int], stop: tuple[str, ...]) -> list[float]:
    detok = cls(codec, stop)
    times = []
    for t in ids:
        start = time.perf_counter()
        detok.push([t])
        times.append(time.perf_counter() - start)
    detok.flush()
    return times


def measure(lengths: list[int], seed: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec_name, codec in codecs(Path(tmp)).items():
            rng = random.Random(seed)
            for n in lengths:
                ids = []
                while len(ids) < n:
                    ids += codec.encode(random_text(rng, 64), add_special_tokens=False)
                ids = ids[:n]
                for stop in ((), STOPS):
                    for impl, cls in (("full_decode", FullDecodeDetokenizer), ("windowed", IncrementalDetokenizer)):
                        times = time_pushes(cls, codec, ids, stop)
                        us = sorted(t * 1e6 for t in times)
                        rows.append({"codec": codec_name, "tokens": n, "stop_strings": len(stop), "impl": impl,
                                     "mean_us": statistics.fmean(us), "p99_us": us[int(0.99 * (len(us) - 1))],
                                     "last_100_mean_us": statistics.fmean(t * 1e6 for t in times[-100:]),
                                     "total_ms": sum(times) * 1e3})
                        print(f"{codec_name:16s} n={n:5d} stops={len(stop)} {impl:11s} "
                              f"mean {rows[-1]['mean_us']:9.1f} us  p99 {rows[-1]['p99_us']:9.1f} us  "
                              f"total {rows[-1]['total_ms']:9.1f} ms", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codec_names = sorted({r["codec"] for r in rows})
    fig, axes = plt.subplots(1, len(codec_names), figsize=(6 * len(codec_names), 4.5), squeeze=False)
    for ax, codec_name in zip(axes[0], codec_names, strict=True):
        for impl, style in (("full_decode", "-"), ("windowed", "--")):
            for stops, marker in ((0, "o"), (len(STOPS), "s")):
                sel = sorted((r for r in rows if r["codec"] == codec_name and r["impl"] == impl
                              and r["stop_strings"] == stops), key=lambda r: r["tokens"])
                ax.plot([r["tokens"] for r in sel], [r["mean_us"] for r in sel], style, marker=marker,
                        label=f"{impl}, {stops} stop strings")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("output tokens (one push per token)")
        ax.set_ylabel("mean push() time (us)")
        ax.set_title(codec_name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Streaming detokenization: CPU time per pushed token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 8000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default="bench/results/detokenize_cpu.json")
    args = p.parse_args()
    rows = measure(args.lengths, args.seed)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "python": platform.python_version(),
                               "processor": platform.processor(), "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    print("wrote", out, "and", out.with_suffix(".png"))


if __name__ == "__main__":
    main()
