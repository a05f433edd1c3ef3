"""Worker and router processes for the serving benchmarks (`compare_pd`, `decode_alone`) and the
end-to-end tests (`tests/pd_system.py` starts its servers with `start_server` / `wait_healthy`).

Each server runs in its own session (process group), so stopping it reaches its rank processes too;
`ServerGroup` is the owner: `close()` stops every server it started, newest first, and the group is a
context manager so a failed start or a Ctrl-C leaves nothing running.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0  # rank processes import torch and maybe a transfer backend: slow on 2 shared cores


def cpu_worker_env(threads: int = 1) -> dict[str, str]:
    """Environment of CPU workers sharing one machine: `threads` torch threads each (more threads than
    cores makes OpenMP spin-wait against the other workers) and UCX over TCP loopback (TRANSPORTS.md:
    its IB module can crash at exit on a machine without an RDMA NIC)."""
    return {"OMP_NUM_THREADS": str(threads), "UCX_MODULES": "^ib", "UCX_NET_DEVICES": "lo"}


# Ports this process has handed out: a port is free until its server binds it, so two draws for one system
# (a prefill's and its router's) could return the same one, and the router then finds it taken while the
# prefill answers on it (a CI run saw requests meant for the router reach a prefill worker).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (workers' own helpers take ephemeral ports), never one
    this process handed out before."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in [20000, 32000)")


def get_json(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


@dataclass
class Server:
    """One started server: its process (the leader of its own session), URL and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the whole session, SIGKILL what is left after `grace_s`."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # rank processes the parent could not reap
        if self.proc.poll() is None:
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False


def start_server(
    name: str, module: str, args: Sequence[str], port: int, log_dir: Path, env: dict[str, str]
) -> Server:
    """`python -m module *args` in its own session, `env` added to os.environ, output to log_dir/name.log."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, proc, f"http://127.0.0.1:{port}", log_path)


def wait_healthy(servers: Sequence[Server], timeout_s: float = START_TIMEOUT_S) -> None:
    """Until each answers /health with 200; RuntimeError with the log of one that died or is late."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.proc.returncode}):\n{server.log_tail()}")
            if server.healthy():
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            raise RuntimeError("not healthy: " + "; ".join(f"{s.name}:\n{s.log_tail()}" for s in pending))
        if pending:
            time.sleep(0.3)


class ServerGroup:
    """The servers of one benchmark setup. Args: log_dir (each server's log), env (added to os.environ)."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.servers: list[Server] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, module: str, args: list[str], port: int, env: dict[str, str] | None = None) -> Server:
        """One server; ``env`` adds to the group's for this server alone."""
        server = start_server(name, module, args, port, self.log_dir, {**self.env, **(env or {})})
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def wait_idle(url: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """/server_info once the worker's pages are all free and nothing is in flight; RuntimeError if not."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = get_json(url + "/server_info")
        # Cached, unreferenced prefix pages count as idle (evicted on demand).
        idle_pages = info.get("free_pages", 0) + info.get("evictable_pages", 0)
        busy = idle_pages != info.get("total_pages") or info.get("active_requests", 0) != 0
        if not busy:
            return info
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not idle after {timeout_s} s: {info}")
        time.sleep(0.2)
