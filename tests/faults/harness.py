"""The fault harness: steady client load through a served PD system (`pd_system.PDSystem`), faults injected
into its real processes, and the table row each fault gets.

A fault runs while `Load` keeps `clients` requests in flight back to back, so it meets requests at every
stage (queued, mid-prefill, mid-transfer, mid-stream). A request counts as *hit* when it was in flight
between the fault's start and the moment the system served again; every other request must succeed. The
workload is valid (prompt ids inside the model's vocabulary, sane sampling), so a 4xx is a defect too.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client as http_client
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pd_system import Case, PDSystem, http, mixed_cases, run_case, wait_idle

FULL = os.environ.get("TANDEM_FAULTS_FULL") == "1"  # every scenario on every engine, the soak at length
PEER_TIMEOUT_S = 3.0
CLIENT_TIMEOUT_S = 60.0  # a request not ended by then is "hung"
LOAD = 6  # concurrent clients while a fault hits
RECOVERY_LIMIT_S = 5.0  # from the repair (a restarted server healthy, a stopped one resumed)
PROBE = Case([3, 1, 4, 1, 5], 3, "/generate", stream=False)
# The systems under fault run as a deployment with a shared token: signed control channel, bootstrap
# registrations with the token (other end-to-end tests cover the open default).
DEPLOYMENT_ENV = {"TANDEM_KV_AUTH_TOKEN": "faults-deployment-token"}
ERROR_PAUSE_S = 1.0  # a client whose request failed waits this long (the router's Retry-After), not a busy loop


@dataclass
class Sent:
    """One request of the load: when it was sent and ended (time.monotonic) and how it ended."""

    started: float
    ended: float
    result: dict[str, Any]


@dataclass
class Row:
    """One line of the fault table. `unhit_failed` and `http_4xx` must stay 0 (see the module docstring)."""

    scenario: str
    sent: int = 0
    ok: int = 0
    clean_error: int = 0
    hung: int = 0
    http_500: int = 0
    http_4xx: int = 0
    unhit_failed: int = 0
    recovered_s: float = math.nan
    leaks: str = "-"
    failures: list[str] = field(default_factory=list)  # a few of the errors seen, for the assertion message

    def add(self, result: dict[str, Any], hit: bool = True) -> None:
        self.sent += 1
        status = result.get("status")
        if status == "hung":
            self.hung += 1
        elif status == 500:
            self.http_500 += 1
        elif "error" in result:
            self.clean_error += 1
        else:
            self.ok += 1
            return
        if isinstance(status, int) and 400 <= status < 500:
            self.http_4xx += 1
        if not hit:
            self.unhit_failed += 1
        if len(self.failures) < 5:
            self.failures.append(f"{status}: {str(result.get('error'))[:200]}")

    def healthy(self) -> bool:
        return (self.hung == 0 and self.http_500 == 0 and self.http_4xx == 0 and self.unhit_failed == 0
                and self.leaks == "0" and self.recovered_s < RECOVERY_LIMIT_S)

    def line(self) -> str:
        return (f"{self.scenario} | {self.sent} | {self.ok} | {self.clean_error} | {self.hung} | {self.http_500} | "
                f"{self.recovered_s:.2f} | {self.leaks} | {self.http_4xx} | {self.unhit_failed}")


HEADER = ("scenario | sent | ok | clean error | hung | HTTP 500 | recovered after s | leaks | 4xx | "
          "failed unhit")


def run(url: str, case: Case) -> dict[str, Any]:
    try:
        return run_case(url, case, timeout_s=CLIENT_TIMEOUT_S)
    except TimeoutError:
        return {"status": "hung"}
    except (OSError, http_client.HTTPException) as exc:  # refused, reset or cut off (a killed router)
        return {"status": 0, "error": repr(exc)}


class Load:
    """`clients` threads sending mixed requests back to back through `url` until `stop()`."""

    def __init__(self, url: str, vocab: int, clients: int = LOAD, seed: int = 0, max_prompt: int = 200) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sent: list[Sent] = []
        self._threads = [threading.Thread(target=self._client, args=(url, vocab, seed * 1000 + i, max_prompt),
                                          daemon=True) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, url: str, vocab: int, seed: int, max_prompt: int) -> None:
        batch = 0
        while not self._stop.is_set():
            for case in mixed_cases(8, seed=seed * 7919 + batch, vocab=vocab, max_prompt=max_prompt):
                if self._stop.is_set():
                    return
                started = time.monotonic()
                result = run(url, case)
                with self._lock:
                    self.sent.append(Sent(started, time.monotonic(), result))
                if "error" in result:
                    time.sleep(ERROR_PAUSE_S)
            batch += 1

    def stop(self) -> list[Sent]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_S + 10)
            assert not thread.is_alive(), "a client thread outlived its request timeout"
        return self.sent


def recover(system: PDSystem, limit_s: float = 60) -> float:
    """Seconds until a probe request succeeds through the router (inf after `limit_s`)."""
    started = time.monotonic()
    while "error" in run(system.router.url, PROBE):
        if time.monotonic() - started > limit_s:
            return math.inf
        time.sleep(0.05)
    return time.monotonic() - started


def leaks(system: PDSystem) -> str:
    problems = []
    for worker in (system.prefill, system.decode):
        try:
            wait_idle(worker.url, timeout_s=3 * PEER_TIMEOUT_S + 10)
        except AssertionError as exc:
            problems.append(str(exc))
    return "; ".join(problems) or "0"


# --- faults: each returns once the repair is done (restarted server healthy, stopped one resumed) -------
Fault = Callable[[PDSystem], None]


def kill_and_restart(role: str) -> Fault:
    def fault(system: PDSystem) -> None:
        getattr(system, role).signal(signal.SIGKILL)  # the whole session: HTTP process and ranks
        system.restart(role)
    return fault


def kill_prefill_http_process(system: PDSystem) -> None:
    os.kill(system.prefill.proc.pid, signal.SIGKILL)  # its ranks must follow it on their own
    system.restart("prefill")


def stop_for(role: str, seconds: float) -> Fault:
    def fault(system: PDSystem) -> None:
        server = getattr(system, role)
        server.signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            server.signal(signal.SIGCONT)
    return fault


def slowed(role: str, seconds: float, period_s: float = 0.2) -> Fault:
    """`role` runs at half speed for `seconds` (stopped and resumed every `period_s`): slow, not dead."""
    def fault(system: PDSystem) -> None:
        server = getattr(system, role)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                server.signal(signal.SIGSTOP)
                time.sleep(period_s)
                server.signal(signal.SIGCONT)
                time.sleep(period_s)
        finally:
            server.signal(signal.SIGCONT)
    return fault


def disconnect_clients(system: PDSystem, row: Row | None = None, n: int = 16) -> None:
    """`n` streaming clients hang up once their answers have begun (counted in `row` as clean errors:
    ended by the client; what counts is that nothing leaks and nobody else notices)."""
    port = int(system.router.url.rsplit(":", 1)[1])
    for i in range(n):
        body = {"input_ids": [5 + i] * 50, "stream": True, "sampling_params": {"max_new_tokens": 64}}
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            s.recv(64)  # the response has begun
        if row is not None:
            row.sent += 1
            row.clean_error += 1


# A request served while decode looks up a blackholed prefill must not wait for that lookup (5 s): well
# under it even on a loaded 2-core machine.
STALL_LIMIT_S = 2.5


def unreachable_bootstrap(system: PDSystem, row: Row | None = None) -> None:
    """Requests sent straight to decode naming a prefill whose bootstrap service refuses connections or
    accepts and never answers (a blackholed host): each must end in a clean 5xx, and a request served
    meanwhile must not wait for the blackholed lookup (the lookup stays off decode's rank loop)."""
    results: list[dict[str, Any]] = []

    def bogus(port: int) -> dict[str, Any]:
        body = {"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 2, "temperature": 0},
                "bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 1000 + port}
        status, raw = http("POST", system.decode.url + "/generate", body, timeout_s=CLIENT_TIMEOUT_S)
        return ({"status": status, "error": raw.decode(errors="replace")} if status != 200
                else {"status": status, "unexpected": raw.decode(errors="replace")})

    with socket.socket() as blackhole, socket.socket() as closed:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)  # the kernel completes connections; nobody ever reads or answers
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        refused_port, blackholed_port = closed.getsockname()[1], blackhole.getsockname()[1]
        results.append(bogus(refused_port))
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(bogus, blackholed_port)
            time.sleep(0.5)  # its lookup is under way
            began = time.monotonic()
            probe = run(system.router.url, PROBE)
            stall_s = time.monotonic() - began
            results.append(pending.result())
        results += [bogus(refused_port), bogus(blackholed_port)]  # remembered failures: answered at once
    for result in results:
        if row is not None:
            if "unexpected" in result:  # a 200 without a prefill to take the KV from is wrong
                row.sent += 1
                row.unhit_failed += 1
                row.failures.append(f"200 for an unreachable prefill: {result['unexpected'][:200]}")
            else:
                row.add(result)
        assert "unexpected" not in result and 500 < result["status"] < 600, result
    assert "error" not in probe and stall_s < STALL_LIMIT_S, (probe, stall_s)


def measure(system: PDSystem, scenario: str, fault: Callable[[PDSystem], None] | Callable[[PDSystem, Row], None],
            seed: int, hits: bool = True, warm_s: float = 0.5, after_s: float = 0.5, with_row: bool = False) -> Row:
    """Run `fault` under `Load`; the row of what the load saw. `hits`: whether the fault may fail the
    requests it meets (False: latency or a neighbour's trouble alone, so every request must succeed).
    `with_row`: the fault adds its own requests to the row (disconnecting clients, bogus bootstrap)."""
    row = Row(scenario)
    load = Load(system.router.url, system.vocab_size, seed=seed)
    try:
        time.sleep(warm_s)  # requests at every stage when the fault hits
        began = time.monotonic()
        if with_row:
            fault(system, row)  # type: ignore[call-arg]
        else:
            fault(system)  # type: ignore[call-arg]
        row.recovered_s = recover(system)
        served = time.monotonic()
        time.sleep(after_s)  # requests sent now must all succeed
    finally:
        sent = load.stop()
    for s in sent:
        row.add(s.result, hit=hits and s.ended >= began and s.started <= served)
    row.leaks = leaks(system)
    return row
