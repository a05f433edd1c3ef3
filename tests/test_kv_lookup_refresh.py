"""A decode loop never waits on a bootstrap lookup it has a usable cached answer for: a lookup older than the
client's TTL comes back at once and is refreshed on a thread (stale-while-revalidate), against a real
bootstrap service behind a front that holds its answers back (a slow prefill host). The old rules hold:
`invalidate` forces a fetch begun after it, a dead instance fails (and is remembered), an elastic instance's
new ranks show up in a refresh, an instance left unused past the stale limit is fetched by the caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from test_kv_bootstrap import _registration

from bench.slow_bootstrap import SlowBootstrapFront
from kvtransfer.bootstrap import BootstrapService
from kvtransfer.bootstrap_client import BootstrapClient
from kvtransfer.mapping import ParallelLayout
from kvtransfer.messages import InstanceInfo
from kvtransfer.state import KVBootstrapError

TTL_S = 0.1  # the client's CACHE_TTL_S here: short, so that lookups go stale within a test
SLOW_S = 0.8  # how long the slow host holds an answer back


@pytest.fixture
def service() -> Iterator[BootstrapService]:
    service = BootstrapService(ParallelLayout(2))
    for rank in (0, 1):
        BootstrapClient(timeout_s=2).register(service.address, _registration(rank))
    yield service
    service.close()


@pytest.fixture
def front(service: BootstrapService) -> Iterator[SlowBootstrapFront]:
    front = SlowBootstrapFront(service.address)
    yield front
    front.close()


@pytest.fixture
def client() -> Iterator[BootstrapClient]:
    client = BootstrapClient(timeout_s=3)
    client.CACHE_TTL_S = TTL_S
    yield client
    client.close()
    assert client.num_refreshing == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("kv-lookup-refresh")]


def _timed(lookup: Callable[[], InstanceInfo]) -> tuple[InstanceInfo, float]:
    started = time.monotonic()
    info = lookup()
    return info, time.monotonic() - started


def _wait_refreshed(client: BootstrapClient, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.num_refreshing and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.num_refreshing == 0, "the refresh never ended"


def test_a_stale_lookup_returns_at_once_while_its_refresh_waits_on_a_slow_host(
        service: BootstrapService, front: SlowBootstrapFront, client: BootstrapClient) -> None:
    def lookup() -> InstanceInfo:
        return client.lookup(front.host, front.port)

    first = lookup()
    client.register(service.address, _registration(1, session="restarted"))
    front.delay_s = SLOW_S
    time.sleep(TTL_S * 1.5)
    stale, waited = _timed(lookup)
    assert stale is first and waited < SLOW_S / 4  # the old answer, without waiting for the host
    assert client.num_refreshing == 1
    for _ in range(20):  # every lookup while the refresh runs: at once, and no second refresh
        again, waited = _timed(lookup)
        assert again is first and waited < SLOW_S / 4
    _wait_refreshed(client)
    refreshed, waited = _timed(lookup)
    assert refreshed.rank(1).session == "restarted" and waited < SLOW_S / 4  # the refresh landed
    assert front.requests == 2


def test_a_refresh_that_finds_nothing_changed_keeps_the_cached_object(
        front: SlowBootstrapFront, client: BootstrapClient) -> None:
    first = client.lookup(front.host, front.port)
    time.sleep(TTL_S * 1.5)
    assert client.lookup(front.host, front.port) is first
    _wait_refreshed(client)
    assert client.lookup(front.host, front.port) is first and front.requests == 2


def test_invalidate_forces_a_fetch_begun_after_it_and_a_refresh_under_way_stores_nothing(
        service: BootstrapService, front: SlowBootstrapFront, client: BootstrapClient) -> None:
    first = client.lookup(front.host, front.port)
    front.delay_s = SLOW_S
    time.sleep(TTL_S * 1.5)
    assert client.lookup(front.host, front.port) is first  # starts a refresh: the host answered, held back
    time.sleep(0.2)  # the service answered the refresh already: the old session
    client.register(service.address, _registration(1, session="restarted"))
    client.invalidate(front.host, front.port)  # e.g. the peer's death was noticed
    front.delay_s = 0.0
    fetched, waited = _timed(lambda: client.lookup(front.host, front.port))
    assert fetched.rank(1).session == "restarted" and client.num_refreshing == 1  # fetched, not the old one
    assert waited < SLOW_S / 2  # its own fetch, not the refresh held back
    _wait_refreshed(client)
    assert client.lookup(front.host, front.port) is fetched  # the late refresh's old answer was dropped


def test_a_dead_instance_fails_after_its_stale_lookup_was_refreshed(
        service: BootstrapService, front: SlowBootstrapFront, client: BootstrapClient) -> None:
    first = client.lookup(front.host, front.port)
    front.close()  # the host is gone: connections refused
    time.sleep(TTL_S * 1.5)
    assert client.lookup(front.host, front.port) is first  # at once; the refresh finds it dead
    _wait_refreshed(client)
    assert client.num_cached == 0
    with pytest.raises(KVBootstrapError, match="unreachable"):
        client.lookup(front.host, front.port)
    started = time.monotonic()
    with pytest.raises(KVBootstrapError, match="ago"):  # remembered: fails without trying again
        client.lookup(front.host, front.port)
    assert time.monotonic() - started < 0.1


def test_an_instance_that_stops_being_ready_fails_the_lookup_after_the_refresh(
        service: BootstrapService, front: SlowBootstrapFront, client: BootstrapClient) -> None:
    client.lookup(front.host, front.port)
    client.deregister(service.address, 1, "s1")
    time.sleep(TTL_S * 1.5)
    client.lookup(front.host, front.port)  # the stale answer; the refresh hears "not ready" and drops it
    _wait_refreshed(client)
    with pytest.raises(KVBootstrapError, match="1 of 2 ranks registered"):
        client.lookup(front.host, front.port)


def test_an_elastic_instance_s_new_ranks_arrive_with_a_refresh_without_an_invalidate(
        service: BootstrapService, front: SlowBootstrapFront, client: BootstrapClient) -> None:
    new = ParallelLayout(4, 2)
    assert [r.rank for r in client.lookup(front.host, front.port).ranks] == [0, 1]
    service.expect(new)
    for rank in (2, 3):
        client.register(service.address, _registration(rank, tp_size=4, dp_size=2))
    service.relayout(new)
    time.sleep(TTL_S * 1.5)
    client.lookup(front.host, front.port)
    _wait_refreshed(client)
    info = client.lookup(front.host, front.port)
    assert (info.tp_size, info.dp_size, [r.rank for r in info.ranks]) == (4, 2, [0, 1, 2, 3])


def test_a_lookup_unused_past_the_stale_limit_is_fetched_by_its_caller(
        service: BootstrapService, front: SlowBootstrapFront, client: BootstrapClient) -> None:
    client.STALE_LIMIT_S = 0.3
    client.lookup(front.host, front.port)
    client.register(service.address, _registration(1, session="restarted"))
    time.sleep(0.4)
    front.delay_s = 0.3
    fetched, waited = _timed(lambda: client.lookup(front.host, front.port))
    assert fetched.rank(1).session == "restarted" and waited >= 0.25 and client.num_refreshing == 0


def test_threads_looking_up_a_stale_instance_at_once_start_one_refresh(
        front: SlowBootstrapFront, client: BootstrapClient) -> None:
    first = client.lookup(front.host, front.port)
    front.delay_s = 0.3
    time.sleep(TTL_S * 1.5)
    seen: list[InstanceInfo] = []
    threads = [threading.Thread(target=lambda: seen.append(client.lookup(front.host, front.port)))
               for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 16 and all(info is first for info in seen)
    _wait_refreshed(client)
    assert front.requests == 2


def test_a_closed_client_joins_its_refreshes_and_fetches_for_itself(
        service: BootstrapService, front: SlowBootstrapFront, client: BootstrapClient) -> None:
    client.lookup(front.host, front.port)
    front.delay_s = 0.3
    time.sleep(TTL_S * 1.5)
    client.lookup(front.host, front.port)
    assert client.num_refreshing == 1
    client.close()  # waits for the refresh held back
    assert client.num_refreshing == 0
    client.register(service.address, _registration(1, session="restarted"))
    time.sleep(TTL_S * 1.5)
    fetched, waited = _timed(lambda: client.lookup(front.host, front.port))
    assert fetched.rank(1).session == "restarted" and waited >= 0.25 and client.num_refreshing == 0
