"""Output text for streaming: token ids in, text deltas out, with stop strings.

Two things are held back from a delta until they resolve: a partial UTF-8 character (the ids so far
decode to U+FFFD at the end), and, with stop strings, an ending that may still grow into one. When a
stop string appears, the text ends where it begins (the stop string itself is not returned, as in
OpenAI's API) and `stopped` names it; later ids change nothing.
"""

from __future__ import annotations

from .protocol import TextCodec


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
        self.ids: list[int] = []
        self.stopped: str | None = None  # the stop string that ended the text
        self._text = ""  # the ids' text as last decoded
        self._emitted = 0  # characters of it released so far

    @property
    def text(self) -> str:
        """The text released so far (all of it after `flush`, cut before the stop string if one matched)."""
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
            # A stop string can only start where it would overlap what is new since the last release.
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
        """Length of the longest ending of the text that begins some stop string (held back for now)."""
        for k in range(min(longest - 1, len(self._text) - self._emitted), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
