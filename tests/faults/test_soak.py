"""A bounded soak: steady mixed load through router + 1P1D (real processes, tiny model) with a random fault
every FAULT_EVERY requests, injected while requests are in flight. Every request ends (a result or a
clean error), none hangs, none is an HTTP 500 or a 4xx (the load is valid), every request no fault met
succeeds, the system serves again within 5 s of each repair, and every pool ends idle. Prints the
totals, the faults by kind, the errors by status and the idle counters at the end.

Short in CI (300 requests, 2 faults, NIXL); TANDEM_FAULTS_FULL=1 runs 10,000 per transfer engine."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import (
    DEPLOYMENT_ENV,
    FULL,
    PEER_TIMEOUT_S,
    RECOVERY_LIMIT_S,
    Load,
    Row,
    disconnect_clients,
    kill_and_restart,
    kill_prefill_http_process,
    leaks,
    recover,
    slowed,
    stop_for,
)
from pd_system import PDSystem, get_json, skip_unless_backend

from engine.tiny_model import write_tiny_model

TOTAL = 10_000 if FULL else 300
FAULT_EVERY = 300 if FULL else 100

# name -> (fault, whether it may fail the requests in flight when it hits)
FAULTS = {
    "prefill SIGKILL (instance) + restart": (kill_and_restart("prefill"), True),
    "prefill SIGKILL (HTTP process alone) + restart": (kill_prefill_http_process, True),
    "decode SIGKILL + restart": (kill_and_restart("decode"), True),
    "router SIGKILL + restart": (kill_and_restart("router"), True),
    "prefill SIGSTOP past the peer timeout": (stop_for("prefill", PEER_TIMEOUT_S + 1), True),
    "decode SIGSTOP past the peer timeout": (stop_for("decode", PEER_TIMEOUT_S + 1), True),
    "prefill stalled under the peer timeout": (stop_for("prefill", PEER_TIMEOUT_S / 3), False),
    "decode slow (half speed for 2 s)": (slowed("decode", 2.0), False),
    "clients disconnecting": (disconnect_clients, False),
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600 if FULL else 300)]


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_a_soak_with_random_faults_ends_every_request_cleanly_and_leaks_nothing(backend: str, tmp_path: Path) -> None:
    if backend != "nixl" and not FULL:
        pytest.skip("the CI soak runs NIXL; TANDEM_FAULTS_FULL=1 runs every transfer engine")
    skip_unless_backend(backend)
    model = write_tiny_model(tmp_path / "tiny-v3")
    rng = random.Random(23)
    # The full soak draws at random; CI meets different faults without a restart (the fault table
    # restarts every server in CI, and restarts are most of the time a soak takes).
    order = rng.sample(sorted(FAULTS), len(FAULTS))
    if not FULL:
        order = [kind for kind in order if "restart" not in kind]
    system = PDSystem(model, tmp_path / "logs", backend, peer_timeout_s=PEER_TIMEOUT_S, env=DEPLOYMENT_ENV)
    faults: Counter[str] = Counter()
    windows: list[tuple[float, float]] = []  # (fault began, served again) of faults that may fail requests
    disconnected = Row("clients disconnecting")
    try:
        load = Load(system.router.url, system.vocab_size, seed=23, max_prompt=120)
        try:
            next_fault = FAULT_EVERY
            while len(load.sent) < TOTAL:
                if len(load.sent) >= next_fault:
                    kind = order[len(faults) % len(order)] if not FULL else rng.choice(order)
                    fault, hits = FAULTS[kind]
                    faults[kind] += 1
                    began = time.monotonic()
                    if fault is disconnect_clients:
                        disconnect_clients(system, disconnected)
                    else:
                        fault(system)
                    recovered_s = recover(system)
                    assert recovered_s < RECOVERY_LIMIT_S, (kind, recovered_s)
                    if hits:
                        windows.append((began, time.monotonic()))
                    next_fault += FAULT_EVERY
                time.sleep(0.05)
        finally:
            sent = load.stop()
        row = Row("soak")
        for s in sent:
            row.add(s.result, hit=any(s.ended >= a and s.started <= b for a, b in windows))
        row.leaks = leaks(system)
        errors = Counter(str(s.result.get("status")) for s in sent if "error" in s.result)
        idle = {w.name: {k: get_json(w.url + "/server_info").get(k) for k in
                         ("free_pages", "total_pages", "free_aux_slots", "total_aux_slots", "live_rooms",
                          "inflight_handles", "active_requests")} for w in (system.prefill, system.decode)}
        print(f"\nsoak ({backend}): sent {row.sent} ok {row.ok} clean error {row.clean_error} hung {row.hung} "
              f"HTTP 500 {row.http_500} 4xx {row.http_4xx} failed unhit {row.unhit_failed}; "
              f"+{disconnected.sent} clients that hung up; faults {dict(faults)}; errors by status "
              f"{dict(errors)}; leaks {row.leaks}; idle counts {idle}")
        assert row.sent >= TOTAL and sum(faults.values()) >= TOTAL // FAULT_EVERY - 1
        assert row.hung == 0 and row.http_500 == 0 and row.http_4xx == 0, (row.line(), row.failures)
        assert row.unhit_failed == 0, (row.line(), row.failures)  # faults fail only the requests they meet
        assert row.leaks == "0", row.leaks
    finally:
        system.close()
