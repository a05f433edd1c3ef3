"""The ranks' outputs cross to the HTTP process as one OutputBatch per loop turn."""

from __future__ import annotations

import pytest

from engine.server.messages import (
    MessageError,
    OutputBatch,
    TokenOutput,
    decode_from_ranks,
    decode_to_ranks,
    encode,
)


def test_a_turns_outputs_arrive_whole_and_in_order() -> None:
    outs = [TokenOutput(rid=f"r{i}", token_ids=[i], logprobs=[-0.5 * i], prompt_tokens=7) for i in range(5)]
    outs.append(TokenOutput(rid="r9", token_ids=[], finished=True, finish_reason="error", error="boom",
                            error_status=502, error_code="kv_transfer_failed"))
    message = decode_from_ranks(encode(OutputBatch(outs)))
    assert isinstance(message, OutputBatch) and message.outputs == outs


def test_an_output_batch_is_not_a_message_to_the_ranks() -> None:
    with pytest.raises(MessageError, match="unexpected message kind 'outputs'"):
        decode_to_ranks(encode(OutputBatch([TokenOutput(rid="r", token_ids=[1])])))
