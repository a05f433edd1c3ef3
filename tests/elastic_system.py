"""Helpers of the elastic EP end-to-end tests (decode: test_elastic_scale.py, prefill: test_elastic_prefill.py):
find a worker's rank processes, and post a scale while killing the first new rank as soon as it exists."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from pathlib import Path

from bench.elastic_ep import ScaleStep, post_scale
from bench.pd_servers import Server


def rank_children(pid: int) -> set[int]:
    """The spawned rank processes of worker ``pid`` (multiprocessing's resource tracker left out)."""
    found = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                found.add(int(child))
    return found


def scale_killing_a_new_rank(worker: Server, new_dp: int) -> ScaleStep:
    """POST a scale to ``worker`` and SIGKILL its first new rank process as soon as it exists."""
    before = rank_children(worker.proc.pid)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_scale, worker.url, new_dp)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not pending.done():
            new = rank_children(worker.proc.pid) - before
            if new:
                os.kill(min(new), signal.SIGKILL)
                break
            time.sleep(0.02)
        return pending.result()
