"""A prefill worker with no decode side at all: it refuses requests that lack the bootstrap fields, keeps the
KV it computed only for the bootstrap timeout (then answers an error and frees it), and frees a room at once
when its client goes away."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from http.client import HTTPConnection

import pytest
from pd_system import (
    Server,
    free_port,
    get_json,
    http,
    skip_unless_backend,
    start_server,
    wait_healthy,
    wait_idle,
    worker_flags,
)

from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: a prefill worker with its rank

BOOTSTRAP_TIMEOUT_S = 6.0


@pytest.fixture(scope="module")
def prefill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    skip_unless_backend("nixl")
    model = write_tiny_model(tmp_path_factory.mktemp("prefill-model") / "tiny-v3")
    port, bootstrap_port = free_port(), free_port()
    args = [*worker_flags(model, "nixl", port), "--bootstrap-port", str(bootstrap_port),
            "--kv-bootstrap-timeout", str(BOOTSTRAP_TIMEOUT_S)]
    server = start_server("prefill", "prefill_worker", args, port, tmp_path_factory.mktemp("prefill-logs"))
    try:
        wait_healthy([server])
        yield server, bootstrap_port
    finally:
        server.stop()


def _pd_body(bootstrap_port: int, room: int, rid: str, **extra: object) -> dict[str, object]:
    return {"input_ids": list(range(2, 60)), "rid": rid, "sampling_params": {"max_new_tokens": 4},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap_port, "bootstrap_room": room, **extra}


def test_requests_without_bootstrap_fields_or_naming_a_missing_dp_group_get_a_400(
        prefill: tuple[Server, int]) -> None:
    server, bootstrap_port = prefill
    for path, body in (("/generate", {"text": "hello"}),
                       ("/v1/completions", {"prompt": "hello", "bootstrap_host": "127.0.0.1"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        status, raw = http("POST", server.url + path, body)
        assert status == 400 and "bootstrap_room" in json.loads(raw)["error"]["message"], (path, raw)
    body = _pd_body(bootstrap_port, 1, "dp", disagg_prefill_dp_rank=1)
    status, raw = http("POST", server.url + "/generate", body)
    assert status == 400 and "dp_size 1" in json.loads(raw)["error"]["message"]
    wait_idle(server.url)


def test_kv_that_no_decode_side_asks_for_is_held_until_the_bootstrap_timeout_then_freed(
        prefill: tuple[Server, int]) -> None:
    server, bootstrap_port = prefill
    started = time.monotonic()
    with cf.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(http, "POST", server.url + "/generate", _pd_body(bootstrap_port, 5, "orphan"))
        held = False
        while not reply.done() and not held:  # the prompt's KV is computed and kept for the decode side
            info = get_json(server.url + "/server_info")
            # Held: neither free nor cached and evictable (the prefix cache may keep earlier prompts' pages).
            held = info["free_pages"] + info["evictable_pages"] < info["total_pages"] and info["live_rooms"] == 1
            time.sleep(0.1)
        status, raw = reply.result(timeout=BOOTSTRAP_TIMEOUT_S + 30)
    elapsed = time.monotonic() - started
    assert held
    # A peer (the decode side) that never came: 502, the server's peer failed, not the client.
    assert status == 502 and "timed out waiting for every decode rank" in json.loads(raw)["error"]["message"]
    assert BOOTSTRAP_TIMEOUT_S <= elapsed < BOOTSTRAP_TIMEOUT_S + 20
    wait_idle(server.url)


def test_a_client_that_goes_away_frees_its_room_before_the_timeout(prefill: tuple[Server, int]) -> None:
    server, bootstrap_port = prefill
    host, port = server.url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/generate", json.dumps({**_pd_body(bootstrap_port, 6, "leaver"), "stream": True}),
                 {"Content-Type": "application/json"})
    # A stream's status comes with its first token (an error before it gets its own 4xx/5xx), and that token
    # would come only after the transfer: the client leaves while waiting for it.
    deadline = time.monotonic() + 10
    while get_json(server.url + "/server_info")["live_rooms"] == 0:
        assert time.monotonic() < deadline, "the room never started"
        time.sleep(0.05)
    conn.close()
    left = time.monotonic()
    wait_idle(server.url, timeout_s=BOOTSTRAP_TIMEOUT_S - 1)
    assert time.monotonic() - left < BOOTSTRAP_TIMEOUT_S - 1
