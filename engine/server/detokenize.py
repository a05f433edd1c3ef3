"""Output text for streaming: token ids in, text deltas out, with stop strings.

Two things are held back from a delta until they resolve: a partial UTF-8 character (the ids so far
decode to U+FFFD at the end), and, with stop strings, an ending that may still grow into one. When a
stop string appears, the text ends where it begins (the stop string itself is not returned, as in
OpenAI's API) and `stopped` names it; later ids change nothing.

Each push decodes a small window of ids, not the whole output (vLLM's incremental detokenizer): the
window starts at `prefix offset`, the ids before it already spoke; the ids in [prefix, read) are
decoded again only as context (a tokenizer may spell a token differently at the start of a text, e.g.
drop a leading space), and what the window's text has beyond theirs is the new text. The offsets move
only when that new text is whole (no trailing U+FFFD), so the window is a few tokens long and a push
costs the same at the 10th token as at the 10,000th. The text is the full decode's wherever decoding
from a character boundary gives the full text's characters from there on: bytes, byte-level BPE, and
SentencePiece-style pieces (the context id carries the space their decoder drops at a text's start);
tests/test_detokenize_window.py holds every push to what a whole-output decode returned.
"""

from __future__ import annotations

from .protocol import TextCodec

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """`push(ids)` returns the text they release; `flush()` the rest once the output is complete."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = (), include_stop: bool = False) -> None:
        """`include_stop`: the text ends after the stop string instead of before it (vLLM's
        include_stop_str_in_output, SGLang's no_stop_trim)."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._codec = codec
        self._stop = stop
        self._include_stop = include_stop
        self._longest = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.stopped: str | None = None  # the stop string that ended the text
        self._prefix_offset = 0  # the window's first id
        self._read_offset = 0  # ids before this one are in the text
        self._released: list[str] = []  # the deltas returned so far (joined when `text` is read)
        # The decoded text not yet released: a stop string can only begin here, since a release holds
        # back the longest ending that begins one (so nothing released can grow into one).
        self._text = ""

    @property
    def text(self) -> str:
        """The text released so far (all of it after `flush`, cut before the stop string if one matched)."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        if self.stopped is not None:
            return ""
        new = self._decode_new(final=False)
        if new is None:
            return ""
        self._text += new
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped is not None:
            return ""
        self._text += self._decode_new(final=True) or ""
        return self._release(final=True)

    def _decode_new(self, final: bool) -> str | None:
        """The text the ids past the read offset add, or None while there is none or it ends in a partial
        character (then the offsets stay, and the next push decodes those ids again with its own)."""
        prefix = self._codec.decode(self.ids[self._prefix_offset : self._read_offset])
        window = self._codec.decode(self.ids[self._prefix_offset :])
        if len(window) <= len(prefix) or (not final and window.endswith(REPLACEMENT)):
            return None
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return window[len(prefix) :]

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if self._stop:
            hits = [(at, s) for s in self._stop if (at := self._text.find(s)) >= 0]
            if hits:
                end, self.stopped = min(hits)
                if self._include_stop:
                    end += len(self.stopped)
            elif not final:
                end -= self._pending_prefix()
        delta, self._text = self._text[:end], self._text[end:]
        if delta:
            self._released.append(delta)
        return delta

    def _pending_prefix(self) -> int:
        """Length of the longest ending of the text that begins some stop string (held back for now)."""
        for k in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
