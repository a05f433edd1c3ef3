"""A bounded soak: requests through 1P1D (real processes, NIXL) with a random fault every few hundred
requests; every request ends (result or clean error), none is an HTTP 500, none hangs, and the pools end
idle. Short in CI (300 requests); TANDEM_FAULTS_FULL=1 runs the full 10,000."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from pd_system import PDSystem, backend_missing, mixed_cases, wait_idle
from test_fault_table import VOCAB, Row, _disconnect_clients, _recover, _restart_prefill, _run

from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

FULL = os.environ.get("TANDEM_FAULTS_FULL") == "1"
TOTAL = 10_000 if FULL else 300
FAULT_EVERY = 300 if FULL else 100
BATCH = 8
PEER_TIMEOUT_S = 3.0


def _fault(system: PDSystem, kind: str, row: Row) -> None:
    if kind == "clients disconnecting":
        _disconnect_clients(system, row)
    elif kind == "prefill stalled under the peer timeout":
        system.prefill.signal(signal.SIGSTOP)
        time.sleep(PEER_TIMEOUT_S / 3)
        system.prefill.signal(signal.SIGCONT)
    elif kind == "prefill SIGKILL + restart":
        system.prefill.signal(signal.SIGKILL)
        _restart_prefill(system)


@pytest.mark.xfail(reason="open defect: in a clean-clone CI run (2026-12-02) 307 of 320 soak requests ended in "
                          "clean errors, not only those a fault hit (no hang, no 500); under investigation",
                   strict=False)
def test_a_soak_with_random_faults_ends_every_request_cleanly_and_leaks_nothing(tmp_path: Path) -> None:
    missing = backend_missing("nixl")
    if missing:
        pytest.skip(missing)
    model = write_tiny_model(tmp_path / "tiny-v3")
    rng = random.Random(23)
    kinds = ["clients disconnecting", "prefill stalled under the peer timeout", "prefill SIGKILL + restart"]
    system = PDSystem(model, tmp_path / "logs", "nixl", peer_timeout_s=PEER_TIMEOUT_S)
    row, faults = Row("soak"), Counter()
    try:
        sent = 0
        with cf.ThreadPoolExecutor(BATCH) as pool:
            while sent < TOTAL:
                if sent and sent % FAULT_EVERY < BATCH:
                    kind = rng.choice(kinds)
                    faults[kind] += 1
                    with cf.ThreadPoolExecutor(1) as side:
                        side.submit(_fault, system, kind, row).result()
                    assert _recover(system) < 10, kind
                cases = mixed_cases(BATCH, seed=sent, vocab=VOCAB, max_prompt=120)
                for result in pool.map(lambda c: _run(system.router.url, c), cases):
                    row.add(result)
                sent += BATCH
        for worker in (system.prefill, system.decode):
            wait_idle(worker.url, timeout_s=3 * PEER_TIMEOUT_S + 10)
        print(f"\nsoak: sent {row.sent} ok {row.ok} clean error {row.clean_error} hung {row.hung} "
              f"HTTP 500 {row.http_500}; faults {dict(faults)}; leaks 0")
        assert row.hung == 0 and row.http_500 == 0
        assert row.ok >= TOTAL * 0.8, row  # faults fail only the requests they hit
    finally:
        system.prefill.signal(signal.SIGCONT)
        system.close()
