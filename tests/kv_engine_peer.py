"""Child-process side of the transfer engine tests: a receiving rank with a KV pool and an aux buffer.

Run through multiprocessing (spawn) with `serve`; it answers commands on a Pipe. Torch-free so a child
starts in a fraction of a second.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kvtransfer.engines import make_engine
from kvtransfer.layout import AuxLayout, PageLayout

# What an untouched byte of the receiver's pool holds: any write shows up against it.
SENTINEL = 0xA5


# How long the idle loop waits for a command between two `engine.progress()` calls.
PROGRESS_EVERY_S = 0.001


def serve(
    conn: Connection,
    kind: str,
    name: str,
    shape: tuple[int, int, int, int],
    options: dict[str, Any],
    drive_progress: bool = True,
) -> None:
    """Own one engine, a pool of `shape` bf16 values and an 8-slot aux buffer; answer commands until close.

    While waiting for a command it calls `engine.progress()` every millisecond, as a decode rank's loop does
    (writes into a NIXL engine without a progress thread complete only then); `drive_progress=False`
    leaves the engine alone between commands.

    Commands (tuples): ("dump",) -> (pool bytes, aux bytes); ("notifications", count, timeout_s) ->
    list received; ("connect", peer_name, metadata) -> None; ("close",) -> idle counters, then exit.
    """
    engine = make_engine(kind, name, **options)
    num_pages, num_layers, page_size, token_dim = shape
    pool = np.full(num_pages * num_layers * page_size * token_dim * 2, SENTINEL, dtype=np.uint8)
    aux = np.full(8 * 16, SENTINEL, dtype=np.uint8)
    layout = PageLayout(num_pages, num_layers, page_size, token_dim, 2, "bfloat16", pool.ctypes.data, "cpu")
    aux_layout = AuxLayout(aux.ctypes.data, 16, 8, "cpu")
    engine.register(layout.base_ptr, layout.pool_bytes, "cpu")
    engine.register(aux_layout.base_ptr, aux_layout.pool_bytes, "cpu")
    conn.send((engine.metadata(), layout, aux_layout))
    while True:
        while drive_progress and not conn.poll(PROGRESS_EVERY_S):
            engine.progress()
        command = conn.recv()
        if command[0] == "dump":
            conn.send((pool.tobytes(), aux.tobytes()))
        elif command[0] == "notifications":
            _, count, timeout_s = command
            received: list[tuple[str, bytes]] = []
            deadline = time.monotonic() + timeout_s
            while len(received) < count and time.monotonic() < deadline:
                received += engine.notifications()
                time.sleep(0.001)
            conn.send(received)
        elif command[0] == "connect":
            engine.connect(command[1], command[2])
            conn.send(None)
        elif command[0] == "close":
            engine.close()
            conn.send((engine.num_inflight_handles, engine.num_registrations, engine.num_peers))
            return
        else:
            conn.send(ValueError(f"unknown command {command[0]!r}"))
