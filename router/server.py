"""Serving the router: one process, or N processes sharing the port through SO_REUSEPORT.

Each process is a full router with its own worker registry, health checker, upstream connections and
counters; `router.group` joins their control plane: an admin change made on one reaches all before the
admin call returns, and /metrics on any of them sums all. Load-aware policies see their own process's
in-flight counts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace

from router.app import RouterApp
from router.config import GroupSpec, RouterConfig

log = logging.getLogger("router")


async def serve(config: RouterConfig, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled (SIGINT/SIGTERM in `run`)."""
    app = RouterApp(config)
    await app.start()
    # What start-up made lives as long as the process: keep it out of every later GC pass.
    gc.freeze()
    log.info("router (pid %d) listening on http://%s:%d", os.getpid(), config.host, config.port)
    # One write() of one line: lines of several processes sharing the pipe never interleave.
    sys.stdout.write(f"router ready on http://{config.host}:{config.port} pid={os.getpid()}\n")
    sys.stdout.flush()
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await app.close()


def _run_one(config: RouterConfig) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if config.use_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            log.info("uvloop not installed: using asyncio's default loop")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(serve(config))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        loop.run_until_complete(main)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()


def run(config: RouterConfig) -> None:
    if config.processes == 1:
        _run_one(config)
        return
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SystemExit("--workers > 1 needs SO_REUSEPORT (Linux, BSD)")
    ctx = multiprocessing.get_context("fork")
    socket_dir = tempfile.mkdtemp(prefix="tandem-router-")  # each process's control socket (router.group)
    procs = [
        ctx.Process(target=_run_one, args=(replace(config, group=GroupSpec(i, config.processes, socket_dir)),),
                    name=f"router-{i}")
        for i in range(config.processes)
    ]  # fmt: skip
    for p in procs:
        p.start()

    def stop(signum: int, frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for p in procs:
            p.join()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
