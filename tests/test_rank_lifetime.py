"""A worker's rank processes end with its HTTP process, however that ends: SIGKILL of the HTTP process alone
(no clean-up runs) leaves no rank behind, frees the instance's ports, and an instance restarted on the same
ports comes up with its ranks registered at the new bootstrap service. While it runs, no process of the
instance listens beyond its --host (127.0.0.1). Real processes, real NIXL."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from pd_system import free_port, http, skip_unless_backend, start_server, wait_healthy, worker_flags

from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: a prefill worker and its ranks, twice

RANKS_GONE_S = 5.0


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc: each task lists the children it forked)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = {int(c) for c in f.read().split()}
            except FileNotFoundError:
                continue
            todo.extend(children - found)
            found |= children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a reparented zombie waits for init, it holds no port)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses (kernel hex, as /proc/net/tcp{,6} writes them) of every TCP socket the
    processes `pids` listen on."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (FileNotFoundError, PermissionError):
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                    found.add(fields[1])
    return found


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind theirs
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_tp2_instance_listens_on_its_host_only_and_its_ranks_end_with_its_http_process(tmp_path: Path) -> None:
    skip_unless_backend("nixl")
    model = write_tiny_model(tmp_path / "tiny-v3")
    port, bootstrap_port = free_port(), free_port()
    args = [*worker_flags(model, "nixl", port), "--tp", "2", "--bootstrap-port", str(bootstrap_port)]
    first = start_server("prefill", "prefill_worker", args, port, tmp_path)
    restarted = None
    try:
        wait_healthy([first])
        ranks = descendants(first.proc.pid)
        assert len([p for p in ranks if running(p)]) >= 2, ranks  # tp 2: two rank processes at least
        addresses = listening_addresses(ranks | {first.proc.pid})
        assert addresses and {a.rsplit(":", 1)[0] for a in addresses} <= LOOPBACK, addresses
        os.kill(first.proc.pid, signal.SIGKILL)  # the HTTP process alone, not its process group
        first.proc.wait(10)
        deadline = time.monotonic() + RANKS_GONE_S
        while alive := [p for p in ranks if running(p)]:
            assert time.monotonic() < deadline, f"rank processes {alive} outlived their HTTP process"
            time.sleep(0.1)
        assert port_free(port) and port_free(bootstrap_port)
        restarted = start_server("prefill-restarted", "prefill_worker", args, port, tmp_path)
        wait_healthy([restarted])
        status, body = http("GET", f"http://127.0.0.1:{bootstrap_port}/health", timeout_s=5)
        assert status == 200 and json.loads(body)["registered"] == 2, body
    finally:
        first.stop()
        if restarted is not None:
            restarted.stop()
