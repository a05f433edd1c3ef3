"""`python -m router` as a real process: starts fast without torch, serves, shares a port, stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from router_mocks import MockWorker

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def two_process_router(prefill: MockWorker, decode: MockWorker) -> AsyncIterator[str]:
    """`python -m router --workers 2` in front of the mocks; yields its URL once both processes are ready,
    then stops it with SIGTERM and checks it exited cleanly."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port), "--prefill", prefill.url,
         "8998", "--decode", decode.url, "--workers", "2", "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = [proc.stdout.readline() for _ in range(2)]  # one line per process
        assert all("router ready" in line for line in ready), ready
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(proc.wait, 10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, proc.stderr.read() if proc.stderr else ""


def test_router_imports_neither_torch_nor_a_worker_package() -> None:
    code = ("import sys, router.app, router.server; "
            "bad = [m for m in ('torch', 'engine', 'prefill_worker', 'decode_worker', 'kernels') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_loads_no_web_stack_so_it_starts_at_once() -> None:
    # Start-up time is kept small by what --help imports (no aiohttp, no prometheus_client), checked
    # here without timing anything.
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "router", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "--short-prompt-threshold" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "router.config" in imported
    assert not {"aiohttp", "prometheus_client", "torch"} & imported


def test_router_process_serves_requests_from_two_processes_on_one_port_and_stops_on_sigterm() -> None:
    async def body() -> None:
        prefill, decode = MockWorker("prefill"), MockWorker("decode")
        await prefill.start()
        await decode.start()
        try:
            async with two_process_router(prefill, decode) as url:
                pids = set()
                for _ in range(24):  # a fresh connection each time: the kernel spreads them over both
                    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
                        pids.add((await r.json())["pid"])
                assert len(pids) == 2
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/v1/completions", json={"prompt": "hello " * 30, "stream": True}) as r:
                        assert r.status == 200
                        text = await r.text()
                assert text.endswith("data: [DONE]\n\n")
                assert decode.bodies[0]["bootstrap_port"] == 8998
        finally:
            await prefill.stop()
            await decode.stop()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_router_processes_share_admin_changes_and_sum_their_metrics() -> None:
    """`--workers 2`: a worker added (removed) through either process is added (removed) in both before the
    admin call returns, and /metrics from either process counts every request of both."""

    async def on_one_connection(url: str, *paths: str) -> list[tuple[int, object]]:
        # One connection: both answers come from the same router process.
        out: list[tuple[int, object]] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            for path in paths:
                async with s.get(url + path) as r:
                    out.append((r.status, await (r.json() if path != "/metrics" else r.text())))
        return out

    def requests_counted(metrics: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("router_requests_total{"))  # fmt: skip

    async def body() -> None:
        prefill, decode, extra = MockWorker("prefill"), MockWorker("decode"), MockWorker("decode")
        for worker in (prefill, decode, extra):
            await worker.start()
        try:
            async with two_process_router(prefill, decode) as url:
                for _ in range(10):  # fresh connections: spread over both processes
                    async with aiohttp.ClientSession() as s:
                        async with s.post(url + "/generate", json={"text": "hi", "sampling_params": {}}) as r:
                            assert r.status == 200
                seen: dict[int, float] = {}
                for _ in range(24):
                    (_, health), (_, metrics) = await on_one_connection(url, "/health", "/metrics")
                    seen[health["pid"]] = requests_counted(metrics)  # type: ignore[index,arg-type]
                    assert "router_processes 2.0" in metrics  # type: ignore[operator]
                assert len(seen) == 2 and set(seen.values()) == {10.0}, seen

                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/workers", json={"url": extra.url, "role": "decode"}) as r:
                        assert r.status == 201 and (await r.json())["router_processes_updated"] == 2
                listed: dict[int, bool] = {}
                for _ in range(24):
                    (_, health), (_, workers) = await on_one_connection(url, "/health", "/workers")
                    urls = {w["url"] for w in workers["workers"]}  # type: ignore[index]
                    listed[health["pid"]] = listed.get(health["pid"], True) and extra.url in urls  # type: ignore[index]
                assert len(listed) == 2 and all(listed.values()), listed

                async with aiohttp.ClientSession() as s, s.delete(url + "/workers", params={"url": extra.url}) as r:
                    assert r.status == 200 and (await r.json())["router_processes_updated"] == 2
                gone: dict[int, bool] = {}
                for _ in range(24):
                    (_, health), (_, workers) = await on_one_connection(url, "/health", "/workers")
                    urls = {w["url"] for w in workers["workers"]}  # type: ignore[index]
                    gone[health["pid"]] = gone.get(health["pid"], True) and extra.url not in urls  # type: ignore[index]
                assert len(gone) == 2 and all(gone.values()), gone
        finally:
            for worker in (prefill, decode, extra):
                await worker.stop()

    asyncio.run(asyncio.wait_for(body(), 90))
