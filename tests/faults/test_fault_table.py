"""Faults injected one at a time into router + prefill + decode (real processes on loopback, tiny model,
CPU) under steady concurrent load, per transfer engine (NIXL, Mooncake; see SCENARIOS for what CI runs on
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
from pd_system import PDSystem, backend_missing

from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

# (scenario, fault, whether it may fail the requests it meets, whether it adds its own requests, whether
# the transfer engine is in its path). CI runs every scenario on NIXL and those in the engine's path on
# Mooncake too (the others meet the same code whatever the engine); TANDEM_FAULTS_FULL=1 runs all on both.
SCENARIOS = [
    ("prefill SIGKILL (instance) + restart", kill_and_restart("prefill"), True, False, True),
    ("prefill SIGKILL (HTTP process alone) + restart", kill_prefill_http_process, True, False, False),
    ("decode SIGKILL mid-stream + restart", kill_and_restart("decode"), True, False, True),
    ("router SIGKILL + restart", kill_and_restart("router"), True, False, False),
    (f"prefill SIGSTOP {PEER_TIMEOUT_S + 1:.0f} s (past the peer timeout), SIGCONT",
     stop_for("prefill", PEER_TIMEOUT_S + 1), True, False, True),
    (f"decode SIGSTOP {PEER_TIMEOUT_S + 1:.0f} s (past the peer timeout), SIGCONT",
     stop_for("decode", PEER_TIMEOUT_S + 1), True, False, True),
    ("prefill slow (half speed for 2 s)", slowed("prefill", 2.0), False, False, False),
    ("decode slow (half speed for 2 s)", slowed("decode", 2.0), False, False, False),
    ("bootstrap service unreachable (refused, blackholed)", unreachable_bootstrap, False, True, False),
    ("16 streaming clients disconnecting at once", disconnect_clients, False, True, False),
]


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
                  peer_timeout_s=PEER_TIMEOUT_S, env=DEPLOYMENT_ENV)
    yield pd
    pd.close()


def test_every_request_ends_cleanly_and_the_system_recovers_from_each_fault(system: PDSystem) -> None:
    rows = []
    for seed, (scenario, fault, hits, with_row, engine_bound) in enumerate(SCENARIOS):
        if system.backend != "nixl" and not (engine_bound or FULL):
            continue
        began = time.monotonic()
        rows.append(measure(system, scenario, fault, seed=seed, hits=hits, with_row=with_row))
        print(f"{rows[-1].line()}   ({time.monotonic() - began:.1f} s)", flush=True)
    print(f"\ntransfer engine {system.backend}\n{HEADER}")
    for row in rows:
        print(row.line())
    bad = [(row.line(), row.failures) for row in rows if not row.healthy()]
    assert not bad, bad
