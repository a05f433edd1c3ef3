"""A byte-per-token text codec for tests of the HTTP layer: token id = byte value (the far side of the API)."""

from __future__ import annotations


class ByteCodec:
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])
