"""Prefill first on a GPU that a prefill instance and a decode instance share (one-GPU 1P1D).

Both instances map one small file (`--prefill-turn-file PATH`, the same path on both; /dev/shm keeps it in
memory). While a prefill forward runs, the file holds the time it began; the decode instance launches no
forward meanwhile, so the prefill has the GPU to itself and the decode resumes the moment it is done.

Why: on one H100 under MPS, a 4096-token V2-Lite prefill forward beside a decode instance that launches step
after step took 126-140 ms where it takes 52 ms alone, and the decode's step ~9.7 ms where ~7: the two
contend for SMs, and the prefill's GEMMs, which expect every SM, wait on the decode's CTAs at each
kernel. Together they did about what taking turns does, while every prompt waited longer for its first
token, so fewer requests decoded at once. MPS's below-normal client priority for the decode changed little
(it only orders pending CTAs; running ones are never preempted). Taking turns outright is this module.

The times are CLOCK_MONOTONIC (`time.monotonic`), which every process on a Linux host shares. A flag left
set by a prefill instance that died mid-forward is ignored once it is older than `STALE_S`.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

PREFILL_TURN_KEY = "prefill_turn_file"  # the workers' role_args entry: the flag's path, or None
STALE_S = 2.0  # a forward "running" longer than this is taken for one whose instance died holding the flag
POLL_S = 0.0002  # the decode's nap between looks at the flag: it resumes within about this of the prefill


class PrefillTurn:
    """The shared flag: `running()` on the prefill side around each forward, `wait()` on the decode side before
    each of its forwards. Either side may create the file; both map the same 8 bytes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        self._began = memoryview(self._map).cast("d")  # one aligned 8-byte store: a reader never sees half

    @contextmanager
    def running(self) -> Iterator[None]:
        """Holds the turn for the block: the caller's forward, up to its results on the host (a CUDA caller
        synchronises inside the block, or the decode would resume while the prefill's kernels still run)."""
        self._began[0] = time.monotonic()
        try:
            yield
        finally:
            self._began[0] = 0.0

    def busy(self) -> bool:
        """Whether a prefill forward runs now (one begun more than `STALE_S` ago does not count)."""
        began = self._began[0]
        return began != 0.0 and time.monotonic() - began < STALE_S

    def wait(self) -> float:
        """Until no prefill forward runs; the seconds waited."""
        start = time.monotonic()
        while self.busy():
            time.sleep(POLL_S)
        return time.monotonic() - start

    def close(self) -> None:
        self._began.release()
        self._map.close()


def add_prefill_turn_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--prefill-turn-file`, the same on a prefill worker and a decode worker that share one GPU."""
    parser.add_argument(
        "--prefill-turn-file", default=None, metavar="PATH",
        help="a prefill and a decode instance on one GPU: the same file on both (e.g. under /dev/shm); the "
             "decode instance launches no forward while the prefill instance runs one (engine.prefill_turn)")


def open_prefill_turn(path: str | None) -> PrefillTurn | None:
    return PrefillTurn(path) if path else None
