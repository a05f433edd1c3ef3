"""Faults injected one at a time into router + prefill + decode (real processes on loopback, tiny model,
CPU) under steady concurrent load, per transfer engine (NIXL, Mooncake; SCENARIOS says what CI runs on
each). For each: every client
request ends (a result or an OpenAI-style error, never a hang), none is an HTTP 500 or a 4xx (the load is
valid), every request the fault did not meet succeeds, the system serves again within 5 s of the repair,
and every pool (pages, aux slots, transfer handles, rooms) is back at idle. Prints the table
scenario | sent | ok | clean error | hung | HTTP 500 | recovered after s | leaks (| 4xx | failed unhit).

Covered elsewhere: a worker answering 500s or garbage (tests/test_router_upstream.py,
tests/test_router_operations.py, mock workers), hostile input (tests/test_router_fuzz.py,
tests/test_protocol_fuzz.py, tests/test_worker_http.py), a prefill stalled mid-transfer whose pages decode
reuses (test_stalled_prefill.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    DEPLOYMENT_ENV,
    FULL,
    HEADER,
    PEER_TIMEOUT_S,
    disconnect_clients,
    kill_and_restart,
    kill_prefill_http_process,
    measure,
    slowed,
    stop_for,
    unreachable_bootstrap,
)
from pd_system import PDSystem, skip_unless_backend

from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

NIXL, BOTH = ("nixl",), ("nixl", "mooncake")
# (scenario, fault, whether it may fail the requests it meets, whether it adds its own requests, the engines
# CI runs it on). TANDEM_FAULTS_FULL=1 runs every scenario on both engines. CI keeps to its time budget:
# on Mooncake the faults that cut transfers from either side; on NIXL also those that meet the same code
# whatever the engine; neither runs the HTTP-process kill (CI: test_rank_lifetime.py, without load) or
# the slow prefill (the soak's stall under the peer timeout is its kin).
SCENARIOS = [
    ("prefill SIGKILL (instance) + restart", kill_and_restart("prefill"), True, False, BOTH),
    ("prefill SIGKILL (HTTP process alone) + restart", kill_prefill_http_process, True, False, ()),
    ("decode SIGKILL mid-stream + restart", kill_and_restart("decode"), True, False, NIXL),
    ("router SIGKILL + restart", kill_and_restart("router"), True, False, NIXL),
    (f"prefill SIGSTOP {PEER_TIMEOUT_S + 1:.0f} s (past the peer timeout), SIGCONT",
     stop_for("prefill", PEER_TIMEOUT_S + 1), True, False, BOTH),
    (f"decode SIGSTOP {PEER_TIMEOUT_S + 1:.0f} s (past the peer timeout), SIGCONT",
     stop_for("decode", PEER_TIMEOUT_S + 1), True, False, BOTH),
    ("prefill slow (half speed for 2 s)", slowed("prefill", 2.0), False, False, ()),
    ("decode slow (half speed for 2 s)", slowed("decode", 2.0), False, False, NIXL),
    ("bootstrap service unreachable (refused, blackholed)", unreachable_bootstrap, False, True, NIXL),
    ("16 streaming clients disconnecting at once", disconnect_clients, False, True, NIXL),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("faults-model") / "tiny-v3")


@pytest.fixture(scope="module", params=["nixl", "mooncake"])
def system(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PDSystem]:
    skip_unless_backend(request.param)
    pd = PDSystem(tiny_model, tmp_path_factory.mktemp(f"faults-{request.param}"), request.param,
                  peer_timeout_s=PEER_TIMEOUT_S, env=DEPLOYMENT_ENV)
    yield pd
    pd.close()


def test_every_request_ends_cleanly_and_the_system_recovers_from_each_fault(system: PDSystem) -> None:
    rows = []
    for seed, (scenario, fault, hits, with_row, ci_engines) in enumerate(SCENARIOS):
        if system.backend not in ci_engines and not FULL:
            continue
        began = time.monotonic()
        rows.append(measure(system, scenario, fault, seed=seed, hits=hits, with_row=with_row))
        print(f"{rows[-1].line()}   ({time.monotonic() - began:.1f} s)", flush=True)
    print(f"\ntransfer engine {system.backend}\n{HEADER}")
    for row in rows:
        print(row.line())
    bad = [(row.line(), row.failures) for row in rows if not row.healthy()]
    assert not bad, bad
