"""Transfer engines (NIXL, Mooncake) moving real bytes between two processes, and the page layout math."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import kv_engine_peer
import numpy as np
import pytest
import torch

from kvtransfer.engines import BackendUnavailable, TransferEngine, TransferError, TransferStatus, make_engine
from kvtransfer.engines.base import SMALL_WRITE
from kvtransfer.engines.regions import EngineMetadata, Region
from kvtransfer.layout import AuxLayout, PageLayout, coalesce_pairs, layer_descriptors, page_descriptors

SHAPE = (32, 4, 4, 16)  # pages, layers, tokens per page, values per token: 512 B per layer, 2 KiB per page
# Engine options per case: small batches so one write spans several NIXL requests / Mooncake batches.
CHUNKED = {
    "nixl": {"max_descs_per_request": 2, "split_bytes": 1536},
    "mooncake": {"max_descs_per_batch": 2, "transfer_timeout_s": 5},
}
PLAIN: dict[str, dict[str, Any]] = {"nixl": {}, "mooncake": {"transfer_timeout_s": 5}}
KINDS = ["nixl", "mooncake"]


def new_engine(kind: str, name: str, **options: Any) -> TransferEngine:
    try:
        return make_engine(kind, name, **options)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


class Receiver:
    """A child process running kv_engine_peer.serve; `call` sends a command and returns the answer."""

    def __init__(
        self,
        kind: str,
        name: str,
        options: dict[str, Any],
        shape: tuple[int, int, int, int] = SHAPE,
        drive_progress: bool = True,
    ):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        args = (child_conn, kind, name, shape, options, drive_progress)
        self.process = ctx.Process(target=kv_engine_peer.serve, args=args)
        self.process.start()
        child_conn.close()
        if not self.conn.poll(60):
            raise TimeoutError("receiver did not start")
        self.metadata, self.layout, self.aux = self.conn.recv()
        self.name = name
        self.closed = False

    def call(self, *command: Any, timeout_s: float = 30) -> Any:
        self.closed |= command[0] == "close"
        self.conn.send(command)
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"receiver did not answer {command[0]!r}")
        answer = self.conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive() and not self.closed:
            try:
                self.call("close", timeout_s=30)
            except (TimeoutError, EOFError, OSError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.kill()
        self.conn.close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.stop()


def start_receiver(receivers: list[Receiver], kind: str, options: dict[str, Any], **kw: Any) -> Receiver:
    receiver = Receiver(kind, f"{kind}-receiver-{len(receivers)}", options, **kw)
    receivers.append(receiver)
    return receiver


def source_pool() -> tuple[torch.Tensor, PageLayout]:
    generator = torch.Generator().manual_seed(7)
    pool = torch.randn(SHAPE, generator=generator).to(torch.bfloat16)
    return pool, PageLayout.from_tensor(pool)


def page_bytes(pool: bytes, layout: PageLayout) -> np.ndarray:
    return np.frombuffer(pool, dtype=np.uint8).reshape(layout.num_pages, layout.page_bytes)


# --- layout -----------------------------------------------------------------------------------------


def test_coalesce_pairs_merges_only_runs_consecutive_on_both_sides() -> None:
    assert coalesce_pairs([3, 4, 5, 9, 10], [10, 11, 20, 21, 22]) == [(3, 10, 2), (5, 20, 1), (9, 21, 2)]
    assert coalesce_pairs([], []) == []
    with pytest.raises(ValueError, match="destination pages"):
        coalesce_pairs([1, 2], [1])


def test_page_layout_addresses_follow_the_cross_layer_shape() -> None:
    pool = torch.zeros(SHAPE, dtype=torch.bfloat16)
    layout = PageLayout.from_tensor(pool)
    assert (layout.num_pages, layout.num_layers, layout.page_size, layout.token_dim) == SHAPE
    assert (layout.dtype, layout.itemsize, layout.device) == ("bfloat16", 2, "cpu")
    assert layout.page_bytes == 4 * 4 * 16 * 2 and layout.pool_bytes == pool.numel() * 2
    assert layout.layer_addr(3, 2) == pool[3, 2].data_ptr()
    assert layout.coalesce([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    with pytest.raises(IndexError):
        layout.page_addr(SHAPE[0])
    with pytest.raises(ValueError, match="contiguous"):
        PageLayout.from_tensor(pool.transpose(0, 1))
    with pytest.raises(ValueError, match="4-D"):
        PageLayout.from_tensor(pool[0])


def test_page_descriptors_refuse_layouts_that_differ_in_page_size() -> None:
    src = PageLayout(8, 2, 16, 576, 2, "bfloat16", 4096)
    dst = PageLayout(8, 2, 64, 576, 2, "bfloat16", 1 << 20)
    assert "page_size" in (src.compatible_with(dst) or "")
    with pytest.raises(ValueError, match="page_size"):
        page_descriptors(src, [0], dst, [0])
    same = PageLayout(4, 2, 16, 576, 2, "bfloat16", 1 << 20)
    src_descs, dst_descs = page_descriptors(src, [1, 2, 5], same, [0, 1, 3])
    assert src_descs == [(src.page_addr(1), 2 * src.page_bytes), (src.page_addr(5), src.page_bytes)]
    assert dst_descs == [(same.page_addr(0), 2 * same.page_bytes), (same.page_addr(3), same.page_bytes)]


# --- engine construction ------------------------------------------------------------------------------


def test_unknown_engine_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown transfer engine"):
        make_engine("carrier-pigeon", "x")


@pytest.mark.parametrize("kind,modules", [("nixl", ["nixl", "nixl._api"]), ("mooncake", ["mooncake"])])
def test_missing_backend_package_raises_backend_unavailable(
    kind: str, modules: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(BackendUnavailable, match=kind):
        make_engine(kind, "x")


# --- two processes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_scattered_pages_and_aux_arrive_exactly_and_other_bytes_stay_untouched(
    kind: str, receivers: list[Receiver]
) -> None:
    receiver = start_receiver(receivers, kind, PLAIN[kind])
    pool, layout = source_pool()
    aux = np.arange(8 * 16, dtype=np.uint8)
    aux_layout = AuxLayout(aux.ctypes.data, 16, 8, "cpu")
    engine = new_engine(kind, f"{kind}-sender", **CHUNKED[kind])
    try:
        engine.register(layout.base_ptr, layout.pool_bytes, "cpu")
        engine.register(aux_layout.base_ptr, aux_layout.pool_bytes, "cpu")
        engine.connect(receiver.name, receiver.metadata)
        engine.connect(receiver.name, receiver.metadata)  # idempotent
        assert (engine.num_registrations, engine.num_peers) == (2, 1)

        src_pages = [3, 4, 5, 10, 20, 21, 22, 31, 12, 14, 16, 18, 19]
        dst_pages = [7, 8, 9, 0, 28, 29, 30, 1, 11, 13, 15, 17, 18]
        handles = []
        for chunk in (slice(0, 4), slice(4, 8)):  # two prefill chunks, then the aux slot with a notice
            src, dst = page_descriptors(layout, src_pages[chunk], receiver.layout, dst_pages[chunk])
            handles.append(engine.write(receiver.name, src, dst))
        # A third chunk as one descriptor per layer per page: past the engines' small-write path.
        src, dst = layer_descriptors(layout, src_pages[8:], receiver.layout, dst_pages[8:])
        assert len(src) == 5 * SHAPE[1] > SMALL_WRITE
        handles.append(engine.write(receiver.name, src, dst))
        aux_src = [(aux_layout.slot_addr(2), 16)]
        aux_dst = [(receiver.aux.slot_addr(5), 16)]
        handles.append(engine.write(receiver.name, aux_src, aux_dst, notify=b"room-42:done"))
        assert engine.num_inflight_handles == 4
        assert handles[0].num_descriptors == 2  # pages 3-5 -> 7-9 coalesce into one descriptor
        for handle in handles:
            assert engine.wait(handle, timeout_s=30) is TransferStatus.DONE, handle.error
            engine.release(handle)
        assert engine.num_inflight_handles == 0

        assert receiver.call("notifications", 1, 10) == [(engine.name, b"room-42:done")]
        got_pool, got_aux = receiver.call("dump")
        got = page_bytes(got_pool, receiver.layout)
        sent = page_bytes(pool.view(torch.uint8).numpy().tobytes(), layout)
        for src_page, dst_page in zip(src_pages, dst_pages, strict=True):
            assert np.array_equal(got[dst_page], sent[src_page]), f"page {src_page} -> {dst_page}"
        untouched = sorted(set(range(SHAPE[0])) - set(dst_pages))
        assert (got[untouched] == kv_engine_peer.SENTINEL).all()
        got_slots = np.frombuffer(got_aux, dtype=np.uint8).reshape(8, 16)
        assert np.array_equal(got_slots[5], aux[32:48])
        assert (np.delete(got_slots, 5, axis=0) == kv_engine_peer.SENTINEL).all()
    finally:
        engine.close()
    assert (engine.num_inflight_handles, engine.num_registrations, engine.num_peers) == (0, 0, 0)
    assert receiver.call("close") == (0, 0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_write_outside_the_peers_registered_memory_is_refused_and_leaks_nothing(
    kind: str, receivers: list[Receiver]
) -> None:
    receiver = start_receiver(receivers, kind, PLAIN[kind])
    pool, layout = source_pool()
    engine = new_engine(kind, f"{kind}-sender", **PLAIN[kind])
    try:
        engine.register(layout.base_ptr, layout.pool_bytes, "cpu")
        with pytest.raises(TransferError, match="not connected"):
            engine.write(receiver.name, [(layout.base_ptr, 64)], [(receiver.layout.base_ptr, 64)])
        engine.connect(receiver.name, receiver.metadata)
        end_of_peer_pool = receiver.layout.base_ptr + receiver.layout.pool_bytes
        with pytest.raises(TransferError, match="outside every registered region"):
            engine.write(receiver.name, [(layout.base_ptr, 4096)], [(end_of_peer_pool - 2048, 4096)])
        with pytest.raises(TransferError, match="source range"):
            engine.write(receiver.name, [(layout.base_ptr - 64, 64)], [(receiver.layout.base_ptr, 64)])
        many = SMALL_WRITE + 4  # the same refusal past the small-write path
        src_many = [(layout.base_ptr + 64 * i, 64) for i in range(many)]
        with pytest.raises(TransferError, match="outside every registered region"):
            engine.write(receiver.name, src_many, [(end_of_peer_pool - 64 * (many - i) + 32, 64) for i in range(many)])
        with pytest.raises(ValueError, match="sizes differ"):
            engine.write(receiver.name, src_many, [(receiver.layout.base_ptr, 32)] * many)
        with pytest.raises(ValueError, match="pair up"):
            engine.write(receiver.name, [(layout.base_ptr, 64)], [])
        with pytest.raises(ValueError, match="sizes differ"):
            engine.write(receiver.name, [(layout.base_ptr, 64)], [(receiver.layout.base_ptr, 32)])
        assert engine.num_inflight_handles == 0
        with pytest.raises(ValueError, match="overlaps"):
            engine.register(layout.base_ptr + 64, 64, "cpu")
        assert engine.num_registrations == 1
    finally:
        engine.close()
    assert (engine.num_inflight_handles, engine.num_registrations, engine.num_peers) == (0, 0, 0)
    engine.close()  # idempotent
    with pytest.raises(TransferError, match="closed"):
        engine.metadata()


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_or_foreign_peer_metadata_is_refused_with_a_clear_error(kind: str) -> None:
    engine = new_engine(kind, f"{kind}-lonely", **PLAIN[kind])
    other = "mooncake" if kind == "nixl" else "nixl"
    try:
        with pytest.raises(TransferError, match="not .* engine metadata"):
            engine.connect("peer", b"\x00garbage\xff")
        with pytest.raises(TransferError, match=f"is a {other} engine"):
            engine.connect("peer", EngineMetadata(kind=other, name="peer", native=b"").encode())
        with pytest.raises(TransferError, match="not 'peer'"):
            engine.connect("peer", EngineMetadata(kind=kind, name="someone-else", native=b"").encode())
        # Right shape, useless content: NIXL cannot parse the blob, Mooncake cannot reach the address.
        native = b"not nixl metadata" if kind == "nixl" else b"127.0.0.1:1"
        bad = EngineMetadata(kind=kind, name="peer", native=native, regions=[Region(4096, 4096, "cpu")])
        with pytest.raises(TransferError, match="peer"):
            engine.connect("peer", bad.encode())
        assert engine.num_peers == 0
    finally:
        engine.close()


@pytest.mark.parametrize("kind", KINDS)
def test_killed_peer_fails_writes_within_a_bounded_wait_instead_of_hanging(
    kind: str, receivers: list[Receiver]
) -> None:
    big = (64, 4, 64, 64)  # 8 MiB pool: a write long enough to be in flight when the peer dies
    receiver = start_receiver(receivers, kind, PLAIN[kind], shape=big)
    source = np.ones(receiver.layout.pool_bytes, dtype=np.uint8)
    engine = new_engine(kind, f"{kind}-sender", **PLAIN[kind])
    try:
        engine.register(source.ctypes.data, source.nbytes, "cpu")
        engine.connect(receiver.name, receiver.metadata)
        # Descriptor lists may be N x 2 arrays as well as lists of tuples.
        whole = np.array([[source.ctypes.data, source.nbytes]], dtype=np.int64)
        dst = np.array([[receiver.layout.base_ptr, source.nbytes]], dtype=np.int64)
        warm = engine.write(receiver.name, whole, dst)
        assert engine.wait(warm, timeout_s=30) is TransferStatus.DONE
        engine.release(warm)

        in_flight = engine.write(receiver.name, whole, dst)
        receiver.kill()
        # Either it landed before the kill or it fails; what it must not do is hang.
        assert engine.wait(in_flight, timeout_s=60) in (TransferStatus.DONE, TransferStatus.FAILED)
        engine.release(in_flight)

        after = engine.write(receiver.name, whole, dst)
        assert engine.wait(after, timeout_s=60) is TransferStatus.FAILED
        assert after.error
        engine.release(after)
        assert engine.num_inflight_handles == 0
    finally:
        engine.close()
    assert (engine.num_inflight_handles, engine.num_registrations, engine.num_peers) == (0, 0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_target_progressed_only_by_its_owner_gets_the_write_and_keeps_the_notice(kind: str) -> None:
    # Both engines in this process, no progress thread (the default): the write completes because the loop
    # below progresses the target, and a notice that progress() collected is handed out once.
    pool, layout = source_pool()
    target_pool = torch.zeros(SHAPE, dtype=torch.bfloat16)
    target_layout = PageLayout.from_tensor(target_pool)
    writer = new_engine(kind, f"{kind}-writer", **PLAIN[kind])
    target = new_engine(kind, f"{kind}-target", **PLAIN[kind])
    try:
        writer.register(layout.base_ptr, layout.pool_bytes, "cpu")
        target.register(target_layout.base_ptr, target_layout.pool_bytes, "cpu")
        writer.connect(target.name, target.metadata())
        src, dst = page_descriptors(layout, [1, 2], target_layout, [5, 6])
        notice = b"room-7:done" if kind == "nixl" else None
        handle = writer.write(target.name, src, dst, notify=notice)
        for _ in range(200_000):  # bounded: a write of 4 KiB ends within a few hundred turns
            if writer.poll(handle) is not TransferStatus.PENDING:
                break
            target.progress()
        assert handle.status is TransferStatus.DONE, handle.error
        writer.release(handle)
        assert torch.equal(target_pool[5:7], pool[1:3])
        if kind == "nixl":
            for _ in range(200_000):  # the notice rides behind the bytes: progress until it is in
                target.progress()
                received = target.notifications()
                if received:
                    break
            assert received == [(writer.name, notice)]
        assert target.notifications() == []
    finally:
        writer.close()
        target.close()
    for engine in (writer, target):
        assert (engine.num_inflight_handles, engine.num_registrations, engine.num_peers) == (0, 0, 0)
    target.progress()  # a closed engine's progress() is a harmless no-op


def test_nixl_target_with_its_own_progress_thread_needs_no_progress_calls(receivers: list[Receiver]) -> None:
    # The GPU-deployment setting (`progress_thread=True`): the target process never calls progress().
    receiver = Receiver("nixl", "nixl-threaded-receiver", {"progress_thread": True}, drive_progress=False)
    receivers.append(receiver)
    pool, layout = source_pool()
    engine = new_engine("nixl", "nixl-sender", **PLAIN["nixl"])
    try:
        engine.register(layout.base_ptr, layout.pool_bytes, "cpu")
        engine.connect(receiver.name, receiver.metadata)
        src, dst = page_descriptors(layout, [0, 1, 2], receiver.layout, [10, 11, 12])
        handle = engine.write(receiver.name, src, dst)
        assert engine.wait(handle, timeout_s=30) is TransferStatus.DONE, handle.error
        engine.release(handle)
        got = page_bytes(receiver.call("dump")[0], receiver.layout)
        sent = page_bytes(pool.view(torch.uint8).numpy().tobytes(), layout)
        assert np.array_equal(got[10:13], sent[0:3])
    finally:
        engine.close()
    assert receiver.call("close") == (0, 0, 0)


# --- staging and the benchmark --------------------------------------------------------------------------


def test_stager_gathers_fragmented_pages_in_order_and_scatters_them_back() -> None:
    from kvtransfer.engines.staging import PageStager

    pool, layout = source_pool()
    staging = torch.zeros(4 * layout.page_bytes, dtype=torch.uint8)
    stager = PageStager(pool, layout, staging)
    addr, nbytes = stager.gather([9, 2, 3, 30])
    assert (addr, nbytes) == (staging.data_ptr(), 4 * layout.page_bytes)
    rows = staging.view(4, layout.page_bytes)
    flat = pool.view(torch.uint8).view(layout.num_pages, layout.page_bytes)
    assert torch.equal(rows, flat[[9, 2, 3, 30]])

    target = torch.zeros_like(pool)
    PageStager(target, PageLayout.from_tensor(target), staging).scatter([0, 1, 5, 6])
    assert torch.equal(target.view(torch.uint8).view(layout.num_pages, -1)[[0, 1, 5, 6]], rows)
    assert int(target.view(torch.uint8).view(layout.num_pages, -1)[[2, 3, 4]].count_nonzero()) == 0
    with pytest.raises(ValueError, match="do not fit"):
        stager.gather([0, 1, 2, 3, 4])
    with pytest.raises(IndexError):
        stager.gather([SHAPE[0]])


def test_benchmark_runs_a_tiny_case_end_to_end_and_writes_json(tmp_path: Any) -> None:
    import json

    from bench import kv_transfer

    out = tmp_path / "kv.json"
    argv = ["--engine", "nixl", "--layers", "2", "--token-dim", "64", "--prompts", "256", "--page-sizes", "16",
            "--variants", "default", "--repeats", "2", "--json", str(out)]
    try:
        kv_transfer.main(argv)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    cases = json.loads(out.read_text())["cases"]
    assert {(c["pattern"], c["layout"]) for c in cases} == {
        ("contiguous", "cross-layer"), ("contiguous", "per-layer"),
        ("fragmented", "cross-layer"), ("fragmented", "per-layer"), ("fragmented", "staged"),
    }
    assert all(c["verified"] and c["ratio_to_memcpy"] > 0 for c in cases)
    assert out.with_suffix(".png").stat().st_size > 0
