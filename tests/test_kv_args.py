"""`--kv-*` flags to `KVArgs`, and the NIXL engine a rank's transport builds from them (real NIXL, CPU pool)."""

from __future__ import annotations

import argparse

import pytest
import torch

from engine.runtime.disagg import RankTransport, add_kv_flags, kv_args, nixl_threads_for


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-running-requests", type=int, default=8)
    parser.add_argument("--transfer-backend", default="nixl")
    add_kv_flags(parser)
    return parser.parse_args(list(flags))


def test_negative_nixl_threads_are_refused_before_any_rank_starts() -> None:
    with pytest.raises(ValueError, match="--kv-nixl-threads must be >= 0, got -1"):
        kv_args(parse("--kv-nixl-threads", "-1"))


def test_nixl_threads_default_follows_the_pool_device() -> None:
    assert nixl_threads_for("cuda:0") == 0 and nixl_threads_for("cuda:3") == 0
    assert nixl_threads_for("cpu") == 4
    assert kv_args(parse()).nixl_threads is None
    assert kv_args(parse("--kv-nixl-threads", "2")).nixl_threads == 2


@pytest.mark.parametrize(("flags", "expected"), [((), 4), (("--kv-nixl-threads", "1"), 1)])
def test_rank_transport_builds_nixl_with_those_threads(flags: tuple[str, ...], expected: int) -> None:
    pytest.importorskip("nixl")
    pool = torch.zeros(4, 2, 16, 8)
    transport = RankTransport(kv_args(parse(*flags)), "prefill", 0, pool)
    try:
        assert transport.engine.num_threads == expected
        assert transport.engine.num_registrations == 2  # the pool and the aux buffer
    finally:
        transport.close()
    assert transport.engine.num_registrations == 0


def test_mooncake_protocol_flag_reaches_the_engine() -> None:
    assert kv_args(parse()).mooncake_protocol == "tcp"
    assert kv_args(parse("--kv-mooncake-protocol", "nvlink_intra")).mooncake_protocol == "nvlink_intra"
    with pytest.raises(SystemExit):  # argparse refuses other names
        parse("--kv-mooncake-protocol", "carrier-pigeon")
    pytest.importorskip("mooncake.engine")
    pool = torch.zeros(4, 2, 16, 8)
    transport = RankTransport(kv_args(parse("--transfer-backend", "mooncake")), "decode", 0, pool)
    try:
        assert transport.engine.protocol == "tcp"
    finally:
        transport.close()
