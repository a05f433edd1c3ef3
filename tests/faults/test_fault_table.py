"""Faults injected one at a time into router + prefill + decode (real processes on loopback, tiny model,
CPU, NIXL and Mooncake) under concurrent load. For each: every client request ends (a result or an
OpenAI-style error, never a hang), none is an HTTP 500, the system serves again soon after the repair, and
every pool (pages, aux slots, transfer handles, rooms) is back at idle. Prints the table
scenario | sent | ok | clean error | hung | HTTP 500 | recovered after s | leaks."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pd_system import Case, PDSystem, backend_missing, mixed_cases, run_case, wait_healthy, wait_idle

from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

PEER_TIMEOUT_S = 3.0
CLIENT_TIMEOUT_S = 60.0  # a request not ended by then is "hung"
LOAD = 8  # concurrent requests while the fault hits
RECOVERY_LIMIT_S = 5.0  # after the repaired worker is healthy
VOCAB = 1000  # the tiny model's vocabulary is larger; prompts stay inside it
PROBE = Case([3, 1, 4, 1, 5], 3, "/generate", stream=False)


@dataclass
class Row:
    scenario: str
    sent: int = 0
    ok: int = 0
    clean_error: int = 0
    hung: int = 0
    http_500: int = 0
    recovered_s: float = float("nan")
    leaks: str = "-"

    def add(self, result: dict) -> None:
        self.sent += 1
        if result.get("status") == "hung":
            self.hung += 1
        elif result.get("status") == 500:
            self.http_500 += 1
        elif "error" in result:
            self.clean_error += 1
        else:
            self.ok += 1


def _run(url: str, case: Case) -> dict:
    try:
        return run_case(url, case, timeout_s=CLIENT_TIMEOUT_S)
    except TimeoutError:
        return {"status": "hung"}
    except OSError as exc:  # the connection was refused or reset: an error the client saw at once
        return {"status": 0, "error": str(exc)}


def _recover(system: PDSystem) -> float:
    started = time.monotonic()
    while "error" in _run(system.router.url, PROBE):
        if time.monotonic() - started > 60:
            return float("inf")
        time.sleep(0.1)
    return time.monotonic() - started


def _restart_prefill(system: PDSystem) -> None:
    system.servers.servers.remove(system.prefill)
    system.prefill.stop(grace_s=1)
    system.prefill = system.servers.start("prefill", "prefill_worker", system.prefill_args, system.prefill_port)
    wait_healthy([system.prefill])


def _kill_prefill_instance(system: PDSystem) -> None:
    system.prefill.signal(signal.SIGKILL)


def _kill_prefill_http_process(system: PDSystem) -> None:
    os.kill(system.prefill.proc.pid, signal.SIGKILL)  # its ranks must follow it on their own


def _under_load(system: PDSystem, row: Row, fault: Callable[[PDSystem], None], seed: int) -> None:
    cases = mixed_cases(LOAD, seed=seed, vocab=VOCAB, max_prompt=200)
    with cf.ThreadPoolExecutor(LOAD) as pool:
        futures = [pool.submit(_run, system.router.url, c) for c in cases]
        time.sleep(0.3)
        fault(system)
        for future in futures:
            row.add(future.result())


def _disconnect_clients(system: PDSystem, row: Row) -> None:
    """Many streaming clients hang up after sending their requests."""
    import json

    for i in range(16):
        body = {"input_ids": [5 + i] * 50, "stream": True, "sampling_params": {"max_new_tokens": 64}}
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", int(system.router.url.rsplit(":", 1)[1])), timeout=5) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            s.recv(64)  # the response has begun
        row.sent += 1
        row.clean_error += 1  # ended by the client; what counts is that nothing leaks


def _leaks(system: PDSystem) -> str:
    problems = []
    for worker in (system.prefill, system.decode):
        try:
            wait_idle(worker.url, timeout_s=3 * PEER_TIMEOUT_S + 10)
        except AssertionError as exc:
            problems.append(str(exc))
    return "; ".join(problems) or "0"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("faults-model") / "tiny-v3")


@pytest.fixture(scope="module", params=["nixl", "mooncake"])
def system(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PDSystem]:
    missing = backend_missing(request.param)
    if missing:
        pytest.skip(missing)
    pd = PDSystem(tiny_model, tmp_path_factory.mktemp(f"faults-{request.param}"), request.param,
                  peer_timeout_s=PEER_TIMEOUT_S)
    yield pd
    pd.close()


def test_every_request_ends_cleanly_and_the_system_recovers_from_each_fault(system: PDSystem) -> None:
    rows = []
    for name, fault in (("prefill SIGKILL (instance)", _kill_prefill_instance),
                        ("prefill SIGKILL (HTTP process alone)", _kill_prefill_http_process)):
        row = Row(name)
        _under_load(system, row, fault, seed=len(rows))
        _restart_prefill(system)
        row.recovered_s = _recover(system)
        row.leaks = _leaks(system)
        rows.append(row)
    row = Row("many clients disconnecting")
    _disconnect_clients(system, row)
    row.recovered_s = _recover(system)
    row.leaks = _leaks(system)
    rows.append(row)
    print(f"\ntransfer engine {system.backend}")
    print("scenario | sent | ok | clean error | hung | HTTP 500 | recovered after s | leaks")
    for r in rows:
        print(f"{r.scenario} | {r.sent} | {r.ok} | {r.clean_error} | {r.hung} | {r.http_500} | "
              f"{r.recovered_s:.2f} | {r.leaks}")
    for r in rows:
        assert r.hung == 0 and r.http_500 == 0 and r.leaks == "0", r
        assert r.recovered_s < RECOVERY_LIMIT_S, r
