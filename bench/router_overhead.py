"""Router overhead: CPU microseconds per request and added latency of tandem's router and its peers.

Mock prefill and decode servers (a lean asyncio HTTP/1.1 server, one process pinned to its own core)
sit behind each router; the router under test is pinned to one core; a closed-loop load generator
(keep-alive connections, `concurrency` requests always outstanding) drives it for a fixed time per
cell, in slices taken in rotation over the routers (all running at once), so that a shared machine's
load falls on every router alike. Router CPU per request is the utime+stime delta of the router's
process tree (/proc/PID/stat) divided by the requests completed; added latency is the router's p50/p99 minus the same load sent
straight to the decode mock. Peers: `sglang-router` 0.3.2 and `vllm-router` 0.1.17, when installed.

    python bench/router_overhead.py                  # all routers found, c = 1, 16, 64, ~80 s
    python bench/router_overhead.py --routers tandem --duration 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Explain prefill/decode disaggregation for mixture-of-experts models in one paragraph. " * 3
TOKENS = 8  # SSE events per streamed answer (plus [DONE])
TOKEN_GAP_S = 0.001  # between streamed events, like a (very fast) decode step
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------
# Mock workers: the cheapest HTTP/1.1 server that answers what the routers send, so that the core the
# mocks share with the load generator is not what limits the measurement.
# ---------------------------------------------------------------------------------------------------
def _json_response(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


_CHAT_ANSWER = json.dumps({
    "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": "mock",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "t " * TOKENS},
                 "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 64, "completion_tokens": TOKENS, "total_tokens": 64 + TOKENS},
    "kv_transfer_params": {"remote_engine_id": "mock", "remote_block_ids": [1], "remote_host": "127.0.0.1",
                           "remote_port": 1, "do_remote_decode": False, "do_remote_prefill": True},
}).encode()
_GET_ANSWER = json.dumps({"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "x"}],
                          "model_path": "mock", "is_generation": True, "status": "ok"}).encode()
_EVENT = [b"data: " + json.dumps({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1,
                                  "model": "mock", "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                                                "finish_reason": None}]}).encode() + b"\n\n"
          for i in range(TOKENS)] + [b"data: [DONE]\n\n"]
_CHUNKS = [f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in _EVENT]
_STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class _MockProtocol(asyncio.Protocol):
    def __init__(self, stream_gap_s: float) -> None:
        self._buf = b""
        self._gap = stream_gap_s
        self._t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._t = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            if len(buf) < end + 4 + n:
                break
            body, buf = buf[end + 4 : end + 4 + n], buf[end + 4 + n :]
            self._answer(head, body)
        self._buf = buf

    def _answer(self, head: bytes, body: bytes) -> None:
        t = self._t
        if t is None:
            return
        if head.startswith(b"get"):
            t.write(_json_response(_GET_ANSWER))
        elif b'"stream":true' in body.replace(b" ", b"") and b"max_tokens\":1," not in body:
            t.write(_STREAM_HEAD)
            self._stream(0)
        else:
            t.write(_json_response(_CHAT_ANSWER))

    def _stream(self, i: int) -> None:
        if self._t is None:
            return
        self._t.write(_CHUNKS[i] + (b"0\r\n\r\n" if i == len(_CHUNKS) - 1 else b""))
        if i + 1 < len(_CHUNKS):
            asyncio.get_running_loop().call_later(self._gap, self._stream, i + 1)


async def _serve_mocks(ports: list[int], gap_s: float) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_server(lambda: _MockProtocol(gap_s), "127.0.0.1", port, reuse_address=True, backlog=1024)
    print("mocks ready", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------------
# Load generation and CPU accounting
# ---------------------------------------------------------------------------------------------------
def _tree_cpu_s(root: int) -> float:
    """utime+stime (s) of `root` and its descendants (threads included: /proc/PID/stat sums them)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


@dataclass
class Cell:
    router: str
    mode: str  # "non_stream" | "stream"
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


def _pct(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))] if sorted_ms else float("nan")


async def _load(port: int, stream: bool, concurrency: int, duration_s: float) -> tuple[list[float], int]:
    from router.upstream import UpstreamError, UpstreamPool, build_request

    body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS,
                       "stream": stream}).encode()
    req = build_request("POST", "/v1/chat/completions", f"127.0.0.1:{port}", body)
    pool = UpstreamPool(connect_timeout_s=5.0, idle_ttl_s=3600.0)
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + duration_s  # not loop.time(): uvloop's clock has 1 ms resolution

    async def one_client() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                conn = await pool.request("127.0.0.1", port, req, loop.time() + 30.0)
                while await conn.read_chunk():
                    pass
                if conn.status != 200:
                    errors += 1
                    continue
            except UpstreamError:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            lat.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    pool.close()
    return lat, errors


@dataclass
class _Tally:
    """One cell's measurements summed over its rounds."""

    lat: list[float]
    errors: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0


async def _measure_slice(tally: _Tally, port: int, pid: int | None, stream: bool, c: int, duration_s: float) -> None:
    await _load(port, stream, c, min(0.2, duration_s / 4))  # warm-up: connections, caches
    cpu0 = _tree_cpu_s(pid) if pid else 0.0
    t0 = time.perf_counter()
    lat, errors = await _load(port, stream, c, duration_s)
    tally.wall_s += time.perf_counter() - t0
    tally.cpu_s += (_tree_cpu_s(pid) - cpu0) if pid else 0.0
    tally.lat += lat
    tally.errors += errors


def _cell(name: str, stream: bool, c: int, tally: _Tally, has_cpu: bool) -> Cell:
    lat = sorted(tally.lat)
    n = len(lat)
    return Cell(name, "stream" if stream else "non_stream", c, n, tally.errors, n / tally.wall_s, _pct(lat, 0.5),
                _pct(lat, 0.99), cpu_us_per_req=(tally.cpu_s * 1e6 / n) if has_cpu and n else None)


# ---------------------------------------------------------------------------------------------------
# Routers under test
# ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _router_command(name: str, port: int, prefill: str, decode: str) -> list[str] | None:
    if name == "tandem":
        return [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port), "--prefill", prefill,
                "8998", "--decode", decode, "--policy", "random", "--log-level", "warning"]
    if name == "sglang-router":
        try:
            import sglang_router  # noqa: F401
        except ImportError:
            return None
        return [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host", "127.0.0.1",
                "--port", str(port), "--prefill", prefill, "8998", "--decode", decode, "--policy", "random",
                "--prometheus-port", str(_free_port()), "--log-level", "warn"]
    if name == "vllm-router":
        exe = shutil.which("vllm-router")
        if exe is None:
            return None
        return [exe, "--vllm-pd-disaggregation", "--host", "127.0.0.1", "--port", str(port), "--prefill", prefill,
                "8998", "--decode", decode, "--policy", "random", "--prometheus-port", str(_free_port()),
                "--log-level", "warning"]
    raise ValueError(name)


def _machine() -> str:
    """What ran the bench, for the JSON: CPU model, cores, load at the start (a shared machine is noisy)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{socket.gethostname()}: {model}, {os.cpu_count()} cores, load average {load:.1f} at start"


def _peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sglang-router", "vllm-router"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _pin(cpu: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        os.sched_setaffinity(0, {cpu})

    return apply


async def _wait_ready(port: int, timeout_s: float = 30.0) -> bool:
    from router.upstream import UpstreamError, UpstreamPool, build_request

    pool = UpstreamPool(connect_timeout_s=1.0)
    end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < end:
            try:
                body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]}).encode()
                conn = await pool.request("127.0.0.1", port, build_request(
                    "POST", "/v1/chat/completions", f"127.0.0.1:{port}", body), asyncio.get_running_loop().time() + 5)
                await conn.read_all()
                if conn.status == 200:
                    return True
            except UpstreamError:
                pass
            await asyncio.sleep(0.2)
        return False
    finally:
        pool.close()


async def _bench(args: argparse.Namespace) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    # Router alone on one core; mocks and load generator on others (one each when there are enough).
    router_cpu, other_cpu = cpus[0], cpus[-1]
    load_cpu = cpus[-2] if len(cpus) >= 3 else other_cpu
    os.sched_setaffinity(0, {load_cpu})
    p_port, d_port = _free_port(), _free_port()
    mocks = subprocess.Popen([sys.executable, __file__, "--serve-mocks", str(p_port), str(d_port)],
                             stdout=subprocess.PIPE, preexec_fn=_pin(other_cpu), cwd=ROOT)
    assert mocks.stdout is not None and b"ready" in mocks.stdout.readline()
    prefill, decode = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
    cells: list[Cell] = []
    skipped: dict[str, str] = {}
    try:
        baseline = {}
        for stream in (False, True):
            for c in args.concurrency:
                tally = _Tally([])
                await _measure_slice(tally, d_port, None, stream, c, args.duration)
                cell = _cell("direct", stream, c, tally, has_cpu=False)
                baseline[(cell.mode, c)] = cell
                cells.append(cell)
                print(f"  direct {cell.mode:10s} c={c:<3d} p50 {cell.p50_ms:.3f} ms", flush=True)
        # Every router runs at once (pinned to the same core, idle but for the one under load), and each
        # cell is measured in `rounds` slices taken in rotation over the routers: load from other jobs on
        # a shared machine then falls on all routers alike instead of on whichever ran at that moment.
        procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            for name in args.routers:
                port = _free_port()
                cmd = _router_command(name, port, prefill, decode)
                if cmd is None:
                    skipped[name] = "not installed"
                    print(f"{name}: not installed, skipped", flush=True)
                    continue
                env = dict(os.environ, PYTHONPATH=str(ROOT), RUST_LOG="warn")
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                        preexec_fn=_pin(router_cpu), cwd=ROOT, start_new_session=True)
                procs[name] = (proc, port)
                if not await _wait_ready(port):
                    err = proc.stderr.read1(4000).decode(errors="replace") if proc.poll() is not None else ""
                    skipped[name] = f"did not answer a request in 30 s {err[-300:]}"
                    print(f"{name}: {skipped[name]}", flush=True)
            live = [n for n in procs if n not in skipped]
            for stream in (False, True):
                for c in args.concurrency:
                    tallies = {n: _Tally([]) for n in live}
                    for _ in range(args.rounds):
                        for name in live:
                            proc, port = procs[name]
                            await _measure_slice(tallies[name], port, proc.pid, stream, c,
                                                 args.duration / args.rounds)
                    for name in live:
                        cell = _cell(name, stream, c, tallies[name], has_cpu=True)
                        base = baseline[(cell.mode, c)]
                        cell.added_p50_ms = cell.p50_ms - base.p50_ms
                        cell.added_p99_ms = cell.p99_ms - base.p99_ms
                        cells.append(cell)
                        print(f"  {name} {cell.mode:10s} c={c:<3d} {cell.rps:8.0f} req/s  cpu "
                              f"{cell.cpu_us_per_req:6.0f} us/req  +p50 {cell.added_p50_ms:.3f} ms  "
                              f"errors {cell.errors}", flush=True)
        finally:
            for proc, _ in procs.values():
                os.killpg(proc.pid, signal.SIGTERM)
            for proc, _ in procs.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    finally:
        mocks.terminate()
        mocks.wait()
    return {
        "machine": args.machine or _machine(),
        "peer_versions": _peer_versions(),
        "settings": {"duration_s": args.duration, "rounds": args.rounds, "concurrency": args.concurrency, "tokens_per_stream": TOKENS,
                     "token_gap_ms": TOKEN_GAP_S * 1e3, "router_cpu": router_cpu, "mock_cpu": other_cpu,
                     "load_cpu": load_cpu, "clk_tck": CLK_TCK,
                     "cpus": os.cpu_count()},
        "skipped": skipped,
        "cells": [asdict(c) for c in cells],
    }


def _table(result: dict) -> str:
    rows = sorted((c for c in result["cells"] if c["router"] != "direct"),
                  key=lambda c: (c["router"] != "tandem", c["router"], c["mode"], c["concurrency"]))
    lines = [f"{'router':14s} {'mode':10s} {'c':>3s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
             f"{'+p50 ms':>8s} {'+p99 ms':>8s} {'cpu us/req':>10s} {'err':>4s}"]
    for c in rows:
        lines.append(f"{c['router']:14s} {c['mode']:10s} {c['concurrency']:3d} {c['rps']:8.0f} {c['p50_ms']:8.3f} "
                     f"{c['p99_ms']:8.3f} {c['added_p50_ms']:8.3f} {c['added_p99_ms']:8.3f} "
                     f"{c['cpu_us_per_req']:10.0f} {c['errors']:4d}")
    return "\n".join(lines)


def _ratios(result: dict) -> dict[str, float]:
    """tandem's router CPU per request over the best peer's, per "mode c=N" cell (< 1: tandem cheaper)."""
    cpu = {(c["router"], c["mode"], c["concurrency"]): c["cpu_us_per_req"] for c in result["cells"]
           if c["router"] != "direct" and c["cpu_us_per_req"]}
    out = {}
    for (router, mode, conc), value in sorted(cpu.items()):
        peers = [v for (r, m, k), v in cpu.items() if r != "tandem" and m == mode and k == conc]
        if router == "tandem" and peers:
            out[f"{mode} c={conc}"] = round(value / min(peers), 3)
    return out


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in result["cells"] if c["router"] != "direct"]
    routers = sorted({c["router"] for c in rows}, key=lambda r: (r != "tandem", r))
    conc = result["settings"]["concurrency"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, mode in enumerate(("non_stream", "stream")):
        for row, (key, label) in enumerate((("cpu_us_per_req", "router CPU µs / request"),
                                            ("added_p50_ms", "added p50 latency (ms)"))):
            ax = axes[row][col]
            width = 0.8 / max(1, len(routers))
            for i, r in enumerate(routers):
                vals = [next((c[key] for c in rows if c["router"] == r and c["mode"] == mode
                              and c["concurrency"] == k), 0) for k in conc]
                ax.bar([x + i * width for x in range(len(conc))], vals, width, label=r)
            ax.set_xticks([x + width * (len(routers) - 1) / 2 for x in range(len(conc))], [f"c={k}" for k in conc])
            ax.set_title(f"{label}, {mode.replace('_', '-')}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", nargs="+", default=["tandem", "sglang-router", "vllm-router"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--duration", type=float, default=2.5, help="seconds of measured load per cell and router")
    p.add_argument("--rounds", type=int, default=3, help="slices per cell, taken in rotation over the routers")
    p.add_argument("--machine", default=None, help="label for the JSON (default: CPU model, cores, load)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "router_overhead.json")
    p.add_argument("--serve-mocks", nargs=2, type=int, metavar=("PREFILL_PORT", "DECODE_PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.serve_mocks:
        asyncio.run(_serve_mocks(args.serve_mocks, TOKEN_GAP_S))
        return
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    result = asyncio.run(_bench(args))
    result["wall_s"] = time.perf_counter() - started
    print(_table(result))
    result["cpu_ratio_vs_best_peer"] = _ratios(result)
    print("tandem CPU/req over the best peer's:", result["cpu_ratio_vs_best_peer"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    png = args.out.with_suffix(".png")
    _plot(result, png)
    print(f"wrote {args.out} and {png} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
