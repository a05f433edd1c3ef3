"""Operating the router: health and ejection, retries, backpressure, API key, admin API, metrics."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
from router_mocks import MockBehavior, cluster

from router import RouterConfig, WorkerSpec
from router.config import Role
from router.health import HealthChecker
from router.state import RouterState

GEN = {"text": "a prompt long enough to be disaggregated " * 4}


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 30))


def test_dead_decode_worker_is_ejected_and_traffic_moves_to_the_live_one() -> None:
    async def body() -> None:
        async with cluster(1, 2, decode_policy="round_robin", health_failure_threshold=1) as c, \
                aiohttp.ClientSession() as s:
            dead, live = c.decode
            await dead.stop()  # the worker process is gone: connections are refused
            for _ in range(6):
                async with s.post(c.router_url + "/generate", json=GEN) as r:
                    assert r.status == 200  # retried on the live worker before any byte was sent
            assert len(live.bodies) == 6
            async with s.get(c.router_url + "/workers") as r:
                state = {w["url"]: w for w in (await r.json())["workers"]}
            assert state[dead.url]["healthy"] is False and state[live.url]["healthy"] is True
            async with s.get(c.router_url + "/health") as r:
                assert r.status == 200 and (await r.json())["decode_healthy"] == 1
            c.assert_idle()

    run(body())


def test_unreachable_prefill_is_replaced_before_anything_is_sent() -> None:
    async def body() -> None:
        async with cluster(2, 1, prefill_policy="round_robin") as c, aiohttp.ClientSession() as s:
            await c.prefill[0].stop()
            c.decode[0].behavior = MockBehavior(delay_s=0.05)  # decode waits for KV, as a real one does
            for _ in range(4):
                async with s.post(c.router_url + "/generate", json=GEN) as r:
                    assert r.status == 200
            await c.wait_until(lambda: len(c.prefill[1].bodies) == 4)
            # Decode requests whose prefill was unreachable were aborted, then resent with a fresh room.
            aborted = set(c.decode[0].disconnects)
            assert len(c.decode[0].bodies) == 4 + len(aborted) and aborted
            decode_rooms = [b["bootstrap_room"] for b in c.decode[0].bodies]
            assert len(set(decode_rooms)) == len(decode_rooms)  # a retry is a new pair: a new room
            assert {b["bootstrap_room"] for b in c.prefill[1].bodies} <= set(decode_rooms)
            await c.wait_until(lambda: c.state.background_tasks == 0)
            c.assert_idle()

    run(body())


def test_all_decode_workers_down_answers_503() -> None:
    async def body() -> None:
        async with cluster(1, 2, health_failure_threshold=1) as c, aiohttp.ClientSession() as s:
            for w in c.decode:
                await w.stop()
            async with s.post(c.router_url + "/v1/completions", json={"prompt": "hello " * 30}) as r:
                assert r.status == 502  # first: every worker tried, none reachable
                assert "could be reached" in (await r.json())["error"]["message"]
            async with s.post(c.router_url + "/v1/completions", json={"prompt": "hello " * 30}) as r:
                assert r.status == 503  # then: all ejected
                assert r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["type"] == "service_unavailable"
            async with s.get(c.router_url + "/health") as r:
                assert r.status == 503
            c.assert_idle()

    run(body())


def test_health_probes_eject_a_failing_worker_and_readmit_it_when_it_recovers() -> None:
    async def body() -> None:
        async with cluster(1, 1, health_interval_s=0.05, health_failure_threshold=2,
                           health_max_backoff_s=0.2) as c, aiohttp.ClientSession() as s:
            d = c.decode[0]
            w = c.state.registry.get(d.url)
            assert w is not None
            d.behavior.health_status = 503
            await c.wait_until(lambda: not w.healthy)
            async with s.post(c.router_url + "/generate", json=GEN) as r:
                assert r.status == 503
            d.behavior.health_status = 200
            await c.wait_until(lambda: w.healthy)
            async with s.post(c.router_url + "/generate", json=GEN) as r:
                assert r.status == 200
            c.assert_idle()

    run(body())


def test_one_crash_under_load_counts_as_one_failure_and_the_restarted_worker_serves_within_5_s() -> None:
    async def body() -> None:
        async with cluster(1, 1, health_interval_s=0.5, health_failure_threshold=1) as c, \
                aiohttp.ClientSession() as s:
            d = c.decode[0]
            w = c.state.registry.get(d.url)
            assert w is not None
            d.behavior = MockBehavior(tokens=10, chunk_delay_s=0.05, die_after=3)  # the crash cuts all 8

            async def stream() -> bytes:
                async with s.post(c.router_url + "/generate", json={**GEN, "stream": True}) as r:
                    return await r.read()

            answers = await asyncio.gather(*(stream() for _ in range(8)))
            assert all(b"failed mid-stream" in a for a in answers)
            assert not w.healthy and w.consecutive_failures == 1  # one outage, not eight failures
            await d.stop()
            await asyncio.sleep(1.0)  # down for a while: the probes in between are refused
            assert w.consecutive_failures >= 2 and not w.healthy
            d.behavior = MockBehavior()
            loop = asyncio.get_running_loop()
            await d.start(d.port)  # restarted on the same port
            restarted = loop.time()
            while True:
                async with s.post(c.router_url + "/generate", json=GEN) as r:
                    if r.status == 200:
                        break
                    assert r.status == 503
                await asyncio.sleep(0.02)
            readmitted_s = loop.time() - restarted
            assert readmitted_s < 5.0, readmitted_s
            c.assert_idle()

    run(body())


def test_a_restarted_worker_that_requests_wait_for_is_readmitted_within_a_second_despite_its_backoff() -> None:
    async def body() -> None:
        # Default interval (5 s) and backoff cap (4 s): without requests waiting, the next probe of the
        # worker ejected below comes up to 4 s after its restart.
        async with cluster(1, 1, health_interval_s=5.0, health_failure_threshold=1) as c, \
                aiohttp.ClientSession() as s:
            d = c.decode[0]
            w = c.state.registry.get(d.url)
            assert w is not None
            await d.stop()
            async with s.post(c.router_url + "/generate", json=GEN) as r:
                assert r.status in (502, 503)  # refused: the decode worker is ejected
            assert not w.healthy
            await asyncio.sleep(2.5)  # down a while: a few probes refused, the backoff at its cap
            loop = asyncio.get_running_loop()
            assert w.next_probe_at > loop.time() + 0.5  # nothing due soon on the backoff alone
            await d.start(d.port)
            restarted = loop.time()
            while True:
                async with s.post(c.router_url + "/generate", json=GEN) as r:
                    if r.status == 200:
                        break
                    assert r.status == 503  # no healthy decode worker (yet)
                await asyncio.sleep(0.05)
            readmitted_s = loop.time() - restarted
            assert readmitted_s < 1.0, readmitted_s  # a probe every 0.5 s while requests are refused
            c.assert_idle()

    run(body())


def test_by_default_a_worker_down_for_long_is_still_probed_every_4_s_at_most() -> None:
    async def body() -> None:
        cfg = RouterConfig(decode=[WorkerSpec("http://127.0.0.1:9", Role.DECODE)], health_interval_s=0)
        state = RouterState(cfg)
        w = state.registry.all_workers()[0]
        checker = HealthChecker(state.registry, state.pool, replace(cfg, health_interval_s=5.0))
        loop = asyncio.get_running_loop()
        try:
            for _ in range(12):  # a long outage: 12 refused probes in a row
                assert not await checker.probe(w)
            assert not w.healthy and loop.time() < w.next_probe_at <= loop.time() + 4.0
        finally:
            await state.close()

    run(body())


def test_backpressure_answers_503_with_retry_after_above_max_inflight() -> None:
    async def body() -> None:
        async with cluster(1, 1, max_inflight=1) as c, aiohttp.ClientSession() as s:
            c.decode[0].behavior = MockBehavior(delay_s=0.3)
            slow = asyncio.ensure_future(s.post(c.router_url + "/generate", json=GEN))
            await c.wait_until(lambda: c.state.stats.in_flight == 1)
            async with s.post(c.router_url + "/generate", json=GEN) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["code"] == "overloaded"
            async with await slow as r:
                assert r.status == 200
            c.assert_idle()

    run(body())


def test_api_key_is_required_when_configured() -> None:
    async def body() -> None:
        async with cluster(1, 1, api_key="sekret") as c, aiohttp.ClientSession() as s:
            async with s.post(c.router_url + "/generate", json=GEN) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
            async with s.get(c.router_url + "/workers", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with s.post(c.router_url + "/generate", json=GEN, headers={"Authorization": "Bearer sekret"}) as r:
                assert r.status == 200
            async with s.get(c.router_url + "/health") as r:
                assert r.status == 200  # probes need no key
            assert len(c.decode[0].bodies) == 1

    run(body())


def test_admin_api_adds_a_worker_and_removal_drains_it() -> None:
    async def body() -> None:
        async with cluster(1, 1, decode_policy="round_robin") as c, aiohttp.ClientSession() as s:
            from router_mocks import MockWorker

            extra = MockWorker("decode", MockBehavior(delay_s=0.3))
            await extra.start()
            try:
                async with s.post(c.router_url + "/workers", json={"url": extra.url, "role": "decode"}) as r:
                    assert r.status == 201
                async with s.post(c.router_url + "/workers", json={"url": extra.url, "role": "decode"}) as r:
                    assert r.status == 409
                async with s.post(c.router_url + "/workers", json={"url": extra.url, "role": "chef"}) as r:
                    assert r.status == 400
                reqs = [asyncio.ensure_future(s.post(c.router_url + "/generate", json=GEN)) for _ in range(2)]
                await c.wait_until(lambda: extra.bodies)  # one of the two is on the new worker
                async with s.delete(c.router_url + "/workers", params={"url": extra.url}) as r:
                    assert r.status == 202
                    assert (await r.json()) == {"url": extra.url, "draining": True, "removed": False,
                                                "in_flight": 1}
                async with s.post(c.router_url + "/generate", json=GEN) as r:
                    assert r.status == 200  # a new request does not go to the draining worker
                assert len(extra.bodies) == 1
                for fut in reqs:
                    async with await fut as r:
                        assert r.status == 200  # the in-flight one finished on the draining worker
                async with s.get(c.router_url + "/workers") as r:
                    assert extra.url not in {w["url"] for w in (await r.json())["workers"]}
                async with s.delete(c.router_url + "/workers", params={"url": extra.url}) as r:
                    assert r.status == 404
                c.assert_idle()
            finally:
                await extra.stop()

    run(body())


def test_router_abort_request_reaches_both_workers_of_that_request() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            # The decode holds the request until the abort ends it (10 s at most): a fixed 0.3 s let a loaded CI
            # machine finish the request before the abort came, and the router rightly answered 404.
            c.decode[0].behavior = MockBehavior(delay_s=10, honor_aborts=True)
            pending = asyncio.ensure_future(s.post(c.router_url + "/generate", json=GEN,
                                                   headers={"X-Request-ID": "abc"}))
            await c.wait_until(lambda: "abc" in c.state.active)
            async with s.post(c.router_url + "/abort_request", json={"rid": "abc"}) as r:
                assert (await r.json()) == {"rid": "abc", "aborted": True, "requests": 1}
            rid = c.decode[0].bodies[0]["rid"]
            await c.wait_until(lambda: rid in c.decode[0].aborts and rid in c.prefill[0].aborts)
            async with await pending:
                pass
            async with s.post(c.router_url + "/abort_request", json={"rid": "abc"}) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_rid"

    run(body())


def test_metrics_report_requests_errors_and_latency_per_worker() -> None:
    async def body() -> None:
        async with cluster(1, 1) as c, aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(c.router_url + "/generate", json=GEN) as r:
                    assert r.status == 200
            async with s.post(c.router_url + "/generate", data=b"{", headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
            async with s.get(c.router_url + "/metrics") as r:
                assert r.status == 200
                text = await r.text()
            d = c.decode[0].url
            assert 'router_requests_total{endpoint="/generate",mode="pd"} 3.0' in text
            assert 'router_errors_total{kind="client_400"} 1.0' in text
            assert f'router_worker_requests_total{{role="decode",worker="{d}"}} 3.0' in text
            assert f'router_worker_ttft_seconds_count{{role="decode",worker="{d}"}} 3.0' in text
            assert f'router_worker_latency_seconds_bucket{{le="+Inf",role="decode",worker="{d}"}} 3.0' in text
            assert "router_in_flight 0.0" in text

    run(body())
