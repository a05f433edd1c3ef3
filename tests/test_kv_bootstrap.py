"""The bootstrap service: registration, conflicts, lookup with a per-instance cache, health, clear errors."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest

from kvtransfer.bootstrap import BootstrapService
from kvtransfer.bootstrap_client import BootstrapClient
from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.mapping import ParallelLayout
from kvtransfer.messages import RankRegistration
from kvtransfer.state import KVBootstrapError

LAYOUT = PageLayout(num_pages=8, num_layers=3, page_size=4, token_dim=16, itemsize=2, dtype="bfloat16", base_ptr=4096)
AUX = AuxLayout(base_ptr=8192, slot_bytes=16, num_slots=4)


def _registration(rank: int, **overrides: object) -> RankRegistration:
    fields: dict[str, object] = dict(
        rank=rank, tp_size=2, dp_size=1, session=f"s{rank}", control_endpoint=f"tcp://127.0.0.1:{7000 + rank}",
        engine_kind="nixl", engine_name=f"p{rank}", engine_metadata=b"meta", page_layout=LAYOUT, aux_layout=AUX,
    )
    fields.update(overrides)
    return RankRegistration(**fields)  # type: ignore[arg-type]


@pytest.fixture
def service() -> Iterator[BootstrapService]:
    service = BootstrapService(ParallelLayout(2))
    yield service
    service.close()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_decode_sees_every_rank_once_all_have_registered(service: BootstrapService) -> None:
    client = BootstrapClient(timeout_s=2)
    client.register(service.address, _registration(0))
    with pytest.raises(KVBootstrapError, match="1 of 2 ranks registered"):
        client.lookup(service.host, service.port)
    assert client.num_cached == 0  # an incomplete instance is never cached
    client.register(service.address, _registration(1))
    info = client.lookup(service.host, service.port)
    assert [r.rank for r in info.ranks] == [0, 1] and info.rank(1).engine_name == "p1"
    assert info.instance_id == service.instance_id


def test_a_lookup_that_may_wait_waits_for_ranks_still_registering(service: BootstrapService) -> None:
    """An elastic scale switches the service's layout as the ranks switch; a new rank's registration may come a
    moment later. ``lookup_ready`` (the decode worker's admission check) polls through that window, and
    still refuses an instance that never completes."""
    import threading

    client = BootstrapClient(timeout_s=2)
    client.register(service.address, _registration(0))
    with pytest.raises(KVBootstrapError, match="1 of 2 ranks registered"):
        client.lookup_ready(service.host, service.port, wait_s=0.2)
    late = threading.Timer(0.3, client.register, (service.address, _registration(1)))
    late.start()
    started = time.monotonic()
    info = client.lookup_ready(service.host, service.port, wait_s=5.0)
    late.join()
    assert [r.rank for r in info.ranks] == [0, 1] and 0.25 < time.monotonic() - started < 5.0


def test_health_reports_starting_until_every_rank_registered(service: BootstrapService) -> None:
    client = BootstrapClient(timeout_s=2)
    status, body = _get(f"http://{service.address}/health")
    assert (status, body["status"], body["registered"]) == (503, "starting", 0)
    client.register(service.address, _registration(0))
    client.register(service.address, _registration(1))
    status, body = _get(f"http://{service.address}/health")
    assert (status, body["status"], body["registered"]) == (200, "ok", 2)


@pytest.mark.parametrize(
    "conflicting,message",
    [
        (_registration(1, tp_size=4), "the instance is tp_size 2"),
        (_registration(2, tp_size=2), "out of range"),
        (_registration(1, page_layout=replace(LAYOUT, page_size=8)), "page_size differs"),
        (_registration(1, page_layout=replace(LAYOUT, dtype="float16")), "dtype differs"),
        (_registration(1, engine_kind="mooncake"), "mooncake engine"),
        (_registration(1, aux_layout=replace(AUX, slot_bytes=32)), "aux slots"),
        (_registration(1, control_endpoint="tcp://127.0.0.1:7000"), "control endpoint"),
        (_registration(1, model_fingerprint="config=a weights=b dtype=bfloat16"), "serves model"),
    ],
)
def test_conflicting_registration_is_refused_with_409(
    service: BootstrapService, conflicting: RankRegistration, message: str
) -> None:
    client = BootstrapClient(timeout_s=2)
    client.register(service.address, _registration(0))
    with pytest.raises(KVBootstrapError, match=f"409.*{message}"):
        client.register(service.address, conflicting)
    assert service.num_registered == 1


def test_restarted_rank_replaces_its_entry_and_only_its_session_may_leave(service: BootstrapService) -> None:
    client = BootstrapClient(timeout_s=2)
    client.register(service.address, _registration(0))
    client.register(service.address, _registration(0, session="restarted", engine_name="p0-new"))
    assert service.num_registered == 1
    with pytest.raises(KVBootstrapError, match="409.*another session"):
        client.deregister(service.address, 0, "s0")
    client.deregister(service.address, 0, "restarted")
    assert service.num_registered == 0
    with pytest.raises(KVBootstrapError, match="404"):
        client.deregister(service.address, 0, "restarted")


def test_lookup_is_cached_per_instance_until_invalidated(service: BootstrapService) -> None:
    client = BootstrapClient(timeout_s=2)
    for rank in (0, 1):
        client.register(service.address, _registration(rank))
    first = client.lookup(service.host, service.port)
    client.register(service.address, _registration(1, session="restarted"))
    assert client.lookup(service.host, service.port) is first
    client.invalidate(service.host, service.port)
    assert client.lookup(service.host, service.port).rank(1).session == "restarted"


def test_malformed_registration_gets_400_with_an_openai_error_body(service: BootstrapService) -> None:
    request = urllib.request.Request(f"http://{service.address}/v1/ranks", data=b'{"rank": 0}', method="PUT")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert error["code"] == "bad_registration" and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nothing", 404), ("POST", "/v1/ranks", 405)])
def test_unknown_routes_and_wrong_methods_get_the_json_error_body(
        service: BootstrapService, method: str, path: str, status: int) -> None:
    request = urllib.request.Request(f"http://{service.address}{path}", data=b"{}", method=method)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == status and caught.value.headers["Content-Type"].startswith("application/json")
    error = json.loads(caught.value.read())["error"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error") and path in error["message"]


def _send(address: str, method: str, body: bytes, token: str | None) -> int:
    request = urllib.request.Request(f"http://{address}/v1/ranks", data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        want = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}[exc.code]
        assert json.loads(exc.read())["error"]["type"] == want
        return exc.code


def test_only_holders_of_the_instance_token_may_register_or_remove_ranks() -> None:
    """A stranger's well-formed registration or deletion is refused (401 without a token, 403 with a wrong
    one) and changes nothing; the instance's own ranks, whose client carries the token, get through."""
    from kvtransfer.messages import Deregistration, encode_json

    service = BootstrapService(ParallelLayout(2), auth_token="instance-secret")
    try:
        stranger = encode_json(_registration(0, session="intruder"))
        assert _send(service.address, "PUT", stranger, None) == 401
        assert _send(service.address, "PUT", stranger, "guess") == 403
        assert service.num_registered == 0
        own = BootstrapClient(auth_token="instance-secret")
        own.register(service.address, _registration(0))
        own.register(service.address, _registration(1))
        leave = encode_json(Deregistration(rank=0, session="s0"))  # the session GET /v1/instance publishes
        assert _send(service.address, "DELETE", leave, None) == 401
        assert _send(service.address, "DELETE", leave, "guess") == 403
        assert _get(f"http://{service.address}/health")[0] == 200 and service.num_registered == 2
        with pytest.raises(KVBootstrapError, match="401"):
            BootstrapClient().deregister(service.address, 0, "s0")
        own.deregister(service.address, 0, "s0")
        assert service.num_registered == 1
    finally:
        service.close()


def test_a_blackholed_bootstrap_address_costs_one_timeout_per_failure_ttl_not_one_per_lookup() -> None:
    """A host that accepts and never answers: the first lookup waits out the timeout, the next ones within
    the failure TTL fail at once (they would each stall a decode rank's loop otherwise)."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # connections complete in the backlog; nothing ever reads or answers
        client = BootstrapClient(timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(KVBootstrapError):
            client.lookup("127.0.0.1", hole.getsockname()[1])
        assert time.monotonic() - started >= 0.4
        started = time.monotonic()
        with pytest.raises(KVBootstrapError, match="ago"):
            client.lookup("127.0.0.1", hole.getsockname()[1])
        assert time.monotonic() - started < 0.1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_bootstrap_gives_a_clear_error_within_the_timeout() -> None:
    client = BootstrapClient(timeout_s=0.3)
    port = _free_port()
    with pytest.raises(KVBootstrapError, match=f"127.0.0.1:{port}.*unreachable"):
        client.lookup("127.0.0.1", port)
    with pytest.raises(KVBootstrapError, match="unreachable"):
        client.register(f"127.0.0.1:{port}", _registration(0))


def test_service_refuses_a_port_in_use_and_closes_idempotently(service: BootstrapService) -> None:
    with pytest.raises(KVBootstrapError, match="cannot listen"):
        BootstrapService(ParallelLayout(2), port=service.port)
    service.close()
    service.close()
