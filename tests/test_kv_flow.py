"""Prefill ranks writing real bytes into decode ranks through the whole control plane, with each engine.

Prefill ranks (and decode ranks where a test kills one) run in child processes (kvflow_rank.serve); the
other side runs in the test process. Each test checks the destination bytes against the real source
rank's pool, that pages nobody asked for are untouched, and that every count is back at idle afterwards.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import kvflow_rank
import numpy as np
import pytest
from kvflow_rank import SENTINEL, DecodeRank, PoolShape, PrefillRank, prefill_pool_bytes

from kvtransfer.bootstrap import BootstrapService
from kvtransfer.channel import ControlChannel
from kvtransfer.mapping import ParallelLayout
from kvtransfer.messages import Heartbeat
from kvtransfer.rooms import RankInfo
from kvtransfer.send_manager import KVSendManager
from kvtransfer.state import KVBootstrapError, KVPoll, KVTimeouts

KINDS = ["nixl", "mooncake"]
OPTIONS: dict[str, dict[str, Any]] = {"nixl": {}, "mooncake": {"transfer_timeout_s": 5}}
SHAPE = PoolShape()
TIMEOUTS = KVTimeouts(
    bootstrap_s=4, transfer_s=8, heartbeat_interval_s=0.1, peer_timeout_s=2.5, fence_s=1.0, http_s=3,
    tombstone_s=30,
)


@functools.cache
def _missing(kind: str) -> str | None:
    """Why `kind`'s backend cannot run here, or None (import only: making an engine costs seconds)."""
    module = {"nixl": "nixl._api", "mooncake": "mooncake.engine"}[kind]
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:
        return f"{kind} backend unavailable: {exc}"
    return None


def _skip_without(kind: str) -> None:
    if _missing(kind):
        pytest.skip(_missing(kind))


# Decode ranks living in this process: stepped while the test waits on a child, as a decode rank's loop
# keeps polling while it waits (NIXL without a progress thread lands writes into it only then).
IN_PROCESS_DECODE: list[DecodeRank] = []


def step_in_process_decode() -> None:
    for rank in IN_PROCESS_DECODE:
        rank.step()


class Child:
    """A rank in a child process; `call` runs a command there and returns its answer."""

    def __init__(self, role: str, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=kvflow_rank.serve, args=(child_conn, role, kwargs), daemon=True)
        self.process.start()
        child_conn.close()
        self.endpoint: str | None = None

    def ready(self) -> Child:
        """Wait until the child has built its rank (children boot in parallel: start all, then wait)."""
        if self.endpoint is None:
            self.endpoint = self._answer(60)
        return self

    def _answer(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.002 if IN_PROCESS_DECODE else timeout_s):
            if time.monotonic() > deadline or not IN_PROCESS_DECODE:
                raise TimeoutError("child rank did not answer")
            step_in_process_decode()
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def call(self, name: str, *args: Any, timeout_s: float = 20) -> Any:
        self.conn.send((name, *args))
        return self._answer(timeout_s)

    def result(self, room: int, timeout_s: float = 15) -> Any:
        return self.call("result", room, timeout_s, timeout_s=timeout_s + 5)

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("close")
            except (TimeoutError, EOFError, OSError, RuntimeError):
                pass
        self.process.join(10)
        self.kill()
        self.conn.close()


class DecodeChild(Child):
    """A decode rank in a child process, with the in-process `DecodeRank`'s methods (one round trip each)."""

    def __init__(self, kind: str, rank_info: RankInfo) -> None:
        super().__init__("decode", kind=kind, rank_info=rank_info, shape=SHAPE, timeouts=TIMEOUTS,
                         engine_options=OPTIONS[kind])

    def start(self, *args: Any) -> Any:
        return self.call("start", *args)

    def result(self, room: int, timeout_s: float = 0) -> Any:  # type: ignore[override]
        return self.call("result", room, timeout_s, timeout_s=timeout_s + 20)

    def dump(self) -> tuple[bytes, bytes]:
        return self.call("dump")

    def counts(self) -> dict[str, int]:
        return self.call("counts")

    def close(self) -> dict[str, int]:
        return self.call("close")


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Things to close at the end of a test, whatever happened: children, services, in-process ranks."""
    owned: list[Any] = []
    yield owned
    IN_PROCESS_DECODE.clear()
    for thing in reversed(owned):
        try:
            thing.stop() if isinstance(thing, Child) else thing.close()
        except Exception:
            pass


def start_prefill(kind: str, parallel: ParallelLayout, cleanup: list[Any]) -> tuple[BootstrapService, list[Child]]:
    service = BootstrapService(parallel)
    cleanup.append(service)
    children = []
    for rank in range(parallel.tp_size):
        info = RankInfo(rank, parallel.tp_size, parallel.dp_size)
        child = Child("prefill", kind=kind, rank_info=info, bootstrap_addr=service.address, shape=SHAPE,
                      timeouts=TIMEOUTS, engine_options=OPTIONS[kind])
        cleanup.append(child)
        children.append(child)
    return service, children


def ready(children: list[Child]) -> list[Child]:
    return [child.ready() for child in children]


def start_decode(kind: str, parallel: ParallelLayout, cleanup: list[Any]) -> list[DecodeRank]:
    ranks = [DecodeRank(kind, RankInfo(r, parallel.tp_size, parallel.dp_size), SHAPE, TIMEOUTS, OPTIONS[kind])
             for r in range(parallel.tp_size)]
    cleanup.extend(ranks)
    IN_PROCESS_DECODE.extend(ranks)
    return ranks


def wait_terminal(decode: Any, room: int, timeout_s: float = 15) -> tuple[str, str | None, Any]:
    deadline = time.monotonic() + timeout_s
    while (result := decode.result(room)) is None:
        assert time.monotonic() < deadline, f"room {room} not terminal after {timeout_s} s"
        time.sleep(0.002)
    return result


def wait_sender_state(child: Child, room: int, state: str, timeout_s: float = 10) -> None:
    """Step until the child's sender of `room` reports `state` (a bounded wait; the child steps meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while (now := child.call("state", room)) != state:
        assert time.monotonic() < deadline, f"sender of room {room} stuck in {now}"
        time.sleep(0.01)


def page_bytes(data: bytes | np.ndarray, page: int) -> bytes:
    size = SHAPE.nbytes // SHAPE.num_pages
    return bytes(data[page * size : (page + 1) * size])


def check_destination(decode: Any, writes: dict[int, tuple[int, int]]) -> None:
    """`writes`: decode page -> (prefill rank, its page). Every other page must still be SENTINEL."""
    pool, _ = decode.dump()
    sources = {rank: prefill_pool_bytes(SHAPE, rank) for rank, _ in writes.values()}
    for page in range(SHAPE.num_pages):
        if page in writes:
            rank, src_page = writes[page]
            assert page_bytes(pool, page) == page_bytes(sources[rank], src_page), f"decode page {page}"
        else:
            assert page_bytes(pool, page) == bytes([SENTINEL]) * (SHAPE.nbytes // SHAPE.num_pages), f"page {page}"


def assert_idle(prefill: list[Child], decode: list[Any]) -> None:
    deadline = time.monotonic() + 5
    while True:
        counts = [c.call("counts") for c in prefill] + [d.counts() for d in decode]
        idle = all(c["live_rooms"] == 0 and c["inflight_handles"] == 0 and c["free_pages"] == SHAPE.num_pages
                   for c in counts)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for c in counts:
        assert c["live_rooms"] == 0 and c["inflight_handles"] == 0 and c["registrations"] == 2, counts
        assert c["free_pages"] == SHAPE.num_pages, counts
        assert c.get("free_aux_slots", kvflow_rank.AUX_SLOTS) == kvflow_rank.AUX_SLOTS, counts
    for child in prefill:
        closed = child.call("close")
        assert closed == {"inflight_handles": 0, "registrations": 0, "peers": 0}
    for rank in decode:
        assert rank.close() == {"inflight_handles": 0, "registrations": 0, "peers": 0}


# Scattered source and destination pages, three chunks: runs coalesce on both sides only in places.
SRC_PAGES = [3, 4, 5, 9, 10, 20, 21, 22, 30]
DST_PAGES = [7, 8, 2, 3, 4, 15, 16, 17, 0]
CHUNKS = [(SRC_PAGES[0:4], 0), (SRC_PAGES[4:7], 4), (SRC_PAGES[7:], 7)]


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_move_chunked_scattered_pages_and_aux(kind: str, cleanup: list[Any]) -> None:
    _skip_without(kind)
    service, prefill = start_prefill(kind, ParallelLayout(1), cleanup)
    (decode,) = start_decode(kind, ParallelLayout(1), cleanup)
    ready(prefill)
    room = 2**62 + 12345
    assert decode.start(service.host, service.port, room, DST_PAGES, 5) == (0, ())
    prefill[0].call("start", room, CHUNKS, (31337, -0.5))
    assert prefill[0].result(room) == ("Success", None)
    assert wait_terminal(decode, room) == ("Success", None, (31337, -0.5))
    check_destination(decode, {d: (0, s) for s, d in zip(SRC_PAGES, DST_PAGES, strict=True)})
    _, aux = decode.dump()
    assert aux[: 5 * 16] == bytes([SENTINEL]) * 80 and aux[6 * 16 :] == bytes([SENTINEL]) * 32
    assert_idle(prefill, [decode])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "prefill_layout,decode_layout",
    [(ParallelLayout(2), ParallelLayout(2, 2)), (ParallelLayout(2, 2), ParallelLayout(1))],
    ids=["P-tp2_to_D-tp2dp2", "P-tp2dp2_to_D-tp1"],
)
def test_four_rank_layouts_write_each_decode_page_once_from_the_mapped_real_rank(
    kind: str, prefill_layout: ParallelLayout, decode_layout: ParallelLayout, cleanup: list[Any]
) -> None:
    _skip_without(kind)
    service, prefill = start_prefill(kind, prefill_layout, cleanup)
    decode = [DecodeChild(kind, RankInfo(r, decode_layout.tp_size, decode_layout.dp_size))
              for r in range(decode_layout.tp_size)]
    cleanup.extend(decode)
    ready([*prefill, *decode])  # every rank its own process: up to four
    expected: dict[int, dict[int, tuple[int, int]]] = {d: {} for d in range(len(decode))}
    rooms = [(room, (room // 2) % len(decode)) for room in (40, 41, 42, 43)]  # every real/dummy rotation
    for i, (room, d) in enumerate(rooms):
        src, dst = [1 + 2 * i, 2 + 2 * i], [10 + 3 * i, 11 + 3 * i]
        real, dummies = decode[d].start(service.host, service.port, room, dst, i)
        contacted = {real, *dummies}
        assert contacted == set(prefill_layout.group_ranks(room % prefill_layout.dp_size))
        for rank in contacted:
            prefill[rank].call("start", room, [(src, 0)], (100 + i, -float(i)))
        expected[d].update({dst[k]: (real, src[k]) for k in range(2)})
    for room, d in rooms:
        assert wait_terminal(decode[d], room)[:2] == ("Success", None)
        assert decode[d].result(room)[2] == (100 + rooms.index((room, d)), -float(rooms.index((room, d))))
    for child in prefill:
        for room, _ in rooms:
            if room % prefill_layout.dp_size == prefill.index(child) // prefill_layout.attn_tp_size:
                assert child.result(room) == ("Success", None)
    for d, rank in enumerate(decode):
        check_destination(rank, expected[d])
    assert_idle(prefill, decode)


@pytest.mark.parametrize("kind", KINDS)
def test_killed_sender_fails_the_receiver_within_its_timeout(kind: str, cleanup: list[Any]) -> None:
    _skip_without(kind)
    service, prefill = start_prefill(kind, ParallelLayout(1), cleanup)
    (decode,) = start_decode(kind, ParallelLayout(1), cleanup)
    ready(prefill)
    room = 77
    decode.start(service.host, service.port, room, DST_PAGES, 0)
    prefill[0].call("start", room, CHUNKS, (1, 0.0), 1)  # one chunk, then it hangs mid-transfer
    wait_sender_state(prefill[0], room, "Transferring")
    assert decode.receivers[room].poll() in (KVPoll.WaitingForInput, KVPoll.Transferring)
    prefill[0].kill()
    # "silent": the heartbeat timeout fired, not the (longer) transfer timeout
    state, reason, _ = wait_terminal(decode, room, timeout_s=TIMEOUTS.transfer_s)
    assert state == "Failed" and "silent" in reason
    assert decode.counts()["live_rooms"] == 0 and decode.counts()["free_pages"] == SHAPE.num_pages
    assert decode.close() == {"inflight_handles": 0, "registrations": 0, "peers": 0}


@pytest.mark.parametrize("kind", KINDS)
def test_gone_receiver_fails_the_sender_and_frees_everything(kind: str, cleanup: list[Any]) -> None:
    _skip_without(kind)
    service, prefill = start_prefill(kind, ParallelLayout(1), cleanup)
    decode = Child("decode", kind=kind, rank_info=RankInfo(0, 1), shape=SHAPE, timeouts=TIMEOUTS,
                   engine_options=OPTIONS[kind])
    cleanup.append(decode)
    ready([*prefill, decode])
    room = 78
    decode.call("start", service.host, service.port, room, DST_PAGES, 0)
    prefill[0].call("start", room, CHUNKS, (1, 0.0), 1)
    wait_sender_state(prefill[0], room, "Transferring")  # the decode rank's request arrived, one chunk went
    decode.kill()
    state, reason = prefill[0].result(room, timeout_s=TIMEOUTS.transfer_s)
    # the heartbeat timeout ("silent") or the engine's own failure status, not the transfer timeout
    assert state == "Failed" and ("write to decode peer" in reason or "silent" in reason), reason
    counts = prefill[0].call("counts")
    assert counts == {"live_rooms": 0, "inflight_handles": 0, "registrations": 2, "free_pages": SHAPE.num_pages,
                      "free_aux_slots": 8}
    assert prefill[0].call("close") == {"inflight_handles": 0, "registrations": 0, "peers": 0}


def test_abort_by_either_side_fails_both_and_leaves_pages_safe(cleanup: list[Any]) -> None:
    kind = "nixl"
    _skip_without(kind)
    service, prefill = start_prefill(kind, ParallelLayout(2), cleanup)
    (decode,) = start_decode(kind, ParallelLayout(1), cleanup)
    ready(prefill)
    # P tp2 -> D tp1: one real rank and one dummy per room; rooms 90 and 91 swap them
    for room, side in ((90, "prefill"), (91, "decode")):
        real, (dummy,) = decode.start(service.host, service.port, room, DST_PAGES, room - 90)
        for rank in (real, dummy):
            prefill[rank].call("start", room, CHUNKS, (1, 0.0), 1)  # one chunk, then the worker stalls
        wait_sender_state(prefill[real], room, "Transferring")
        wait_sender_state(prefill[dummy], room, "Transferring")  # a dummy writes nothing, but has its chunk
        if side == "prefill":
            prefill[real].call("abort", room)
        else:
            decode.abort(room)
        state, reason, _ = wait_terminal(decode, room, timeout_s=5)
        assert state == "Failed" and f"test aborts on the {side} side" in reason
        for rank in (real, dummy):
            state, reason = prefill[rank].result(room, timeout_s=5)
            assert state == "Failed" and f"test aborts on the {side} side" in reason
    # a receiver aborted before init (no pages reserved yet) fails at once and tells the prefill ranks
    decode.start(service.host, service.port, 92, None, 2)
    decode.abort(92)
    assert wait_terminal(decode, 92, timeout_s=2)[0] == "Failed"
    prefill[0].call("start", 92, CHUNKS, (1, 0.0))
    assert prefill[0].result(92, timeout_s=3)[0] == "Failed"
    assert_idle(prefill, [decode])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_bootstrap_and_mismatched_pages_are_clear_errors(cleanup: list[Any]) -> None:
    kind = "nixl"
    _skip_without(kind)
    service = BootstrapService(ParallelLayout(1))
    cleanup.append(service)
    child = Child("prefill", kind=kind, rank_info=RankInfo(0, 1), bootstrap_addr=service.address,
                  shape=PoolShape(page_size=8), timeouts=TIMEOUTS, engine_options=OPTIONS[kind])
    cleanup.append(child)
    (decode,) = start_decode(kind, ParallelLayout(1), cleanup)
    child.ready()
    port = _free_port()
    with pytest.raises(KVBootstrapError, match=f"127.0.0.1:{port}/v1/instance is unreachable"):
        decode.start("127.0.0.1", port, 5, DST_PAGES, 0)
    with pytest.raises(KVBootstrapError, match="page_size differs"):
        decode.start(service.host, service.port, 6, DST_PAGES, 0)
    # a prefill rank whose bootstrap service never comes up fails within http_s, holding nothing
    with pytest.raises(KVBootstrapError, match="unreachable"):
        KVSendManager(decode.engine, decode.layout, decode.aux, RankInfo(0, 1), f"127.0.0.1:{port}",
                      KVTimeouts(http_s=0.3))
    assert decode.counts()["live_rooms"] == 0
    assert decode.close() == {"inflight_handles": 0, "registrations": 0, "peers": 0}


def test_a_decode_rank_refuses_a_prefill_instance_that_serves_another_model(cleanup: list[Any]) -> None:
    """Same shapes, other weights (DeepSeek-V3 vs R1): refused at the lookup, naming what differs, before any
    page is asked for; a prefill rank likewise refuses a decode intro of another model."""
    kind = "mooncake"
    _skip_without(kind)
    service = BootstrapService(ParallelLayout(1))
    cleanup.append(service)
    v3, r1 = "config=c1 weights=w-v3 dtype=bfloat16", "config=c1 weights=w-r1 dtype=bfloat16"
    prefill = PrefillRank(kind, RankInfo(0, 1, model_fingerprint=v3), service.address, SHAPE, TIMEOUTS, OPTIONS[kind])
    cleanup.append(prefill)
    decode = DecodeRank(kind, RankInfo(0, 1, model_fingerprint=r1), SHAPE, TIMEOUTS, OPTIONS[kind])
    cleanup.append(decode)
    with pytest.raises(KVBootstrapError, match="another model: weights w-r1 here, w-v3 on the peer"):
        decode.start(service.host, service.port, 5, DST_PAGES, 0)
    assert decode.counts()["live_rooms"] == 0
    # The check a prefill rank makes of a decode rank's intro (its first TransferRequest).
    why = prefill.manager._layout_mismatch(decode.layout, decode.aux, r1)
    assert why is not None and "weights w-v3 here, w-r1 on the peer" in why


def test_a_signed_control_channel_takes_only_frames_signed_with_the_deployment_key() -> None:
    channels = {name: ControlChannel(key=key) for name, key in
                (("ours", "deploy-1"), ("peer", "deploy-1"), ("stranger", None), ("other", "deploy-2"))}
    try:
        ours = channels["ours"]
        for name in ("stranger", "other", "peer"):
            assert channels[name].send(ours.endpoint, Heartbeat(sender=name, session="s"))
        got, deadline = [], time.monotonic() + 5
        while (len(got) < 1 or ours.num_refused < 2) and time.monotonic() < deadline:
            message = ours.recv(0.05)
            if message is not None:
                got.append(message.sender)
        assert got == ["peer"] and ours.num_refused == 2
    finally:
        for channel in channels.values():
            channel.close()


def test_ranks_sharing_the_deployment_key_move_kv_over_the_signed_channel(cleanup: list[Any]) -> None:
    kind = "mooncake"
    _skip_without(kind)
    service = BootstrapService(ParallelLayout(1))
    cleanup.append(service)
    info = RankInfo(0, 1, control_key="deploy-1")
    prefill = PrefillRank(kind, info, service.address, SHAPE, TIMEOUTS, OPTIONS[kind])
    cleanup.append(prefill)
    decode = DecodeRank(kind, info, SHAPE, TIMEOUTS, OPTIONS[kind])
    cleanup.append(decode)
    decode.start(service.host, service.port, 11, DST_PAGES, 0)
    prefill.start(11, CHUNKS, (42, -1.0))
    run_until([prefill, decode], lambda: decode.result(11) is not None and prefill.result(11) is not None)
    assert decode.result(11) == ("Success", None, (42, -1.0)) and prefill.result(11) == ("Success", None)
    check_destination(decode, {d: (0, s) for s, d in zip(SRC_PAGES, DST_PAGES, strict=True)})
    assert prefill.manager.channel.num_refused == 0 and decode.manager.channel.num_refused == 0


# --- protocol edge cases: both ranks in this process (Mooncake: an engine is made in milliseconds) -------


def run_until(ranks: list[Any], done: Any, timeout_s: float = 5) -> None:
    """Step every in-process rank until `done()` holds (a bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        for rank in ranks:
            rank.step()
        time.sleep(0.001)


def in_process_pair(cleanup: list[Any], timeouts: KVTimeouts = TIMEOUTS) -> tuple[BootstrapService, PrefillRank, DecodeRank]:
    kind = "mooncake"
    _skip_without(kind)
    service = BootstrapService(ParallelLayout(1))
    cleanup.append(service)
    prefill = PrefillRank(kind, RankInfo(0, 1), service.address, SHAPE, timeouts, OPTIONS[kind])
    cleanup.append(prefill)
    (decode,) = [DecodeRank(kind, RankInfo(0, 1), SHAPE, timeouts, OPTIONS[kind])]
    cleanup.append(decode)
    return service, prefill, decode


def test_chunks_sent_before_the_decode_side_asks_are_queued_then_written(cleanup: list[Any]) -> None:
    service, prefill, decode = in_process_pair(cleanup)
    decode.start(service.host, service.port, 7, None, 1)  # looked up, no pages reserved yet
    prefill.start(7, CHUNKS, (42, -1.0))
    run_until([prefill], lambda: not prefill.plans[7])  # every chunk and the aux handed over
    assert prefill.senders[7].poll() is KVPoll.Bootstrapping and prefill.senders[7].is_dummy is None
    decode.receivers[7].init(DST_PAGES, 1)
    run_until([prefill, decode], lambda: decode.result(7) is not None)
    assert decode.result(7) == ("Success", None, (42, -1.0)) and prefill.result(7) == ("Success", None)
    check_destination(decode, {d: (0, s) for s, d in zip(SRC_PAGES, DST_PAGES, strict=True)})
    assert prefill.counts()["live_rooms"] == 0 and decode.counts()["live_rooms"] == 0


def test_pages_the_decode_rank_holds_already_are_not_written(cleanup: list[Any]) -> None:
    """Decode-side prefix reuse: the decode rank holds the prompt's first 5 pages (a chunk and a half), so
    the prefill rank writes only pages 5.. of the prompt, into the pages reserved for them, and counts them."""
    service, prefill, decode = in_process_pair(cleanup)
    held = 5
    decode.start(service.host, service.port, 13, DST_PAGES[held:], 0, held_pages=held)
    prefill.start(13, CHUNKS, (42, -1.0))
    run_until([prefill, decode], lambda: decode.result(13) is not None and prefill.result(13) is not None)
    assert decode.result(13) == ("Success", None, (42, -1.0)) and prefill.result(13) == ("Success", None)
    pairs = list(zip(SRC_PAGES, DST_PAGES, strict=True))[held:]
    check_destination(decode, {d: (0, s) for s, d in pairs})  # the held pages' places stay untouched
    page_size_bytes = SHAPE.nbytes // SHAPE.num_pages
    assert prefill.manager.pages_written == len(pairs)
    assert prefill.manager.bytes_written == len(pairs) * page_size_bytes
    with pytest.raises(ValueError, match="held_pages"):
        decode.start(service.host, service.port, 14, DST_PAGES, 0, held_pages=-1)
    decode.abort(14)
    run_until([decode], lambda: decode.result(14) is not None)
    assert prefill.counts()["live_rooms"] == 0 and decode.counts()["live_rooms"] == 0


def test_chunk_beyond_the_decode_pages_fails_both_sides_clearly(cleanup: list[Any]) -> None:
    service, prefill, decode = in_process_pair(cleanup)
    decode.start(service.host, service.port, 8, DST_PAGES[:3], 0)
    prefill.start(8, [(SRC_PAGES[:4], 0)], (1, 0.0))
    run_until([prefill, decode], lambda: decode.result(8) is not None and prefill.result(8) is not None)
    state, reason = prefill.result(8)
    assert state == "Failed" and "does not fit the 3 pages" in reason
    assert decode.result(8)[0] == "Failed" and "does not fit" in decode.result(8)[1]
    assert prefill.counts() == {"live_rooms": 0, "inflight_handles": 0, "registrations": 2,
                                "free_pages": SHAPE.num_pages, "free_aux_slots": 8}
    assert decode.counts()["free_pages"] == SHAPE.num_pages


def test_bootstrap_waits_are_bounded_on_both_sides(cleanup: list[Any]) -> None:
    short = KVTimeouts(bootstrap_s=0.3, transfer_s=8, heartbeat_interval_s=0.1, peer_timeout_s=1.0, fence_s=1.0)
    service, prefill, decode = in_process_pair(cleanup, short)
    prefill.start(9, CHUNKS, (1, 0.0))  # the decode side never asks
    decode.start(service.host, service.port, 10, None, 0)  # the decode worker never reserves pages
    run_until([prefill, decode], lambda: prefill.result(9) is not None and decode.result(10) is not None)
    assert prefill.result(9)[0] == "Failed" and "every decode rank to ask" in prefill.result(9)[1]
    assert decode.result(10)[0] == "Failed" and "init" in decode.result(10)[1]
    assert prefill.counts()["live_rooms"] == 0 and decode.counts()["live_rooms"] == 0


def test_misuse_is_refused_with_clear_errors(cleanup: list[Any]) -> None:
    service, prefill, decode = in_process_pair(cleanup)
    decode.start(service.host, service.port, 11, DST_PAGES, 0)
    with pytest.raises(ValueError, match="already has a receiver"):
        decode.start(service.host, service.port, 11, DST_PAGES, 0)
    with pytest.raises(RuntimeError, match="init called twice"):
        decode.receivers[11].init(DST_PAGES, 0)
    refused = decode.manager.create_receiver(service.host, service.port, 12)
    decode.receivers[12] = refused
    with pytest.raises(ValueError, match="out of range"):
        refused.init([SHAPE.num_pages], 0)
    sender = prefill.manager.create_sender(11)
    with pytest.raises(ValueError, match="already has a sender"):
        prefill.manager.create_sender(11)
    with pytest.raises(ValueError, match="names a page twice"):
        sender.send([1, 1], 0)
    sender.send(SRC_PAGES, 0, last=True)
    with pytest.raises(RuntimeError, match="after the last chunk"):
        sender.send([1], 0)
    with pytest.raises(RuntimeError, match="aux data is only there after Success"):
        decode.receivers[11].aux()
    sender.send_aux(5, 0.0)
    run_until([decode], lambda: sender.poll().is_terminal and decode.result(11) is not None)
    assert decode.result(11)[:2] == ("Success", None)
    decode.abort(12)
    run_until([decode], lambda: decode.result(12) is not None)
    assert decode.counts()["live_rooms"] == 0 and prefill.counts()["live_rooms"] == 0


def test_restarted_prefill_rank_fails_its_old_rooms_and_is_looked_up_again(cleanup: list[Any]) -> None:
    service, prefill, decode = in_process_pair(cleanup)
    # The decode rank keeps its lookup until the peer's death invalidates it (a refresh after the usual 1 s
    # would already see the restarted rank's registration: room 14 is about a lookup older than the restart).
    decode.manager.client.CACHE_TTL_S = 600.0
    decode.start(service.host, service.port, 13, DST_PAGES, 0)
    prefill.start(13, CHUNKS, (13, 0.0))
    run_until([prefill, decode], lambda: decode.result(13) is not None)
    assert decode.result(13)[0] == "Success"
    prefill.close()  # the rank goes away; a new process takes its place (new session, new endpoint)
    restarted = PrefillRank("mooncake", RankInfo(0, 1), service.address, SHAPE, TIMEOUTS, OPTIONS["mooncake"])
    cleanup.append(restarted)
    decode.start(service.host, service.port, 14, DST_PAGES, 1)  # still the cached lookup: the old rank
    run_until([decode], lambda: decode.result(14) is not None, timeout_s=TIMEOUTS.transfer_s)
    assert decode.result(14)[0] == "Failed" and "silent" in decode.result(14)[1]
    decode.start(service.host, service.port, 15, DST_PAGES, 2)  # looked up afresh
    restarted.start(15, CHUNKS, (15, 0.0))
    run_until([restarted, decode], lambda: decode.result(15) is not None)
    assert decode.result(15) == ("Success", None, (15, 0.0))
    assert restarted.counts()["live_rooms"] == 0 and decode.counts()["live_rooms"] == 0
    for rank in (restarted, decode):
        assert rank.close() == {"inflight_handles": 0, "registrations": 0, "peers": 0}
    assert not [t for t in threading.enumerate() if t.name.startswith("kv-control")]  # every manager joined
